"""tome-export: deterministic, static-shape Token Merging (ToMe) ViTs that export and deploy.

Attributes load lazily so that ``tome_export.runtime`` works in deployment environments without torch.
"""

from importlib import import_module
from typing import Any

from ._version import __version__
from .errors import UserError, ValidationError

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
}

__all__ = ["UserError", "ValidationError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tome_export' has no attribute {name!r}")
