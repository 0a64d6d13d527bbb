"""tome-export: deterministic, static-shape Token Merging (ToMe) ViTs that export and deploy.

Attributes load lazily so that ``tome_export.runtime`` works in deployment environments without torch (the base
install is that runtime; the build stack is the ``build`` extra).
"""

from importlib import import_module
from typing import Any

from ._version import __version__
from .errors import BUILD_STACK, UserError, ValidationError, build_stack_missing

_LAZY = {
    "BuildRequest": "pipeline",
    "BuildOptions": "pipeline",
    "BuildResult": "pipeline",
    "build": "pipeline",
    "export_onnx": "export",
    "bipartite_soft_matching": "merge",
    "merge_wavg": "merge",
    "create_model": "models",
    "model_info": "models",
    "patch": "models",
    "resolve_schedule": "schedule",
    "tune": "tuning",
    "TuneRequest": "tuning",
}

__all__ = ["UserError", "ValidationError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = import_module(f".{_LAZY[name]}", __name__)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in BUILD_STACK:
                raise
            raise ModuleNotFoundError(build_stack_missing(exc.name, f"tome_export.{name}"), name=exc.name) from None
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tome_export' has no attribute {name!r}")
