"""tome-export: deterministic, static-shape Token Merging (ToMe) ViTs that export and deploy."""

from ._version import __version__
from .pipeline import BuildOptions, BuildResult, build
from .errors import UserError, ValidationError
from .export import export_onnx
from .merge import bipartite_soft_matching, merge_wavg
from .models import create_model, model_info, patch
from .schedule import resolve_schedule


__all__ = [
    "BuildOptions",
    "BuildResult",
    "build",
    "export_onnx",
    "UserError",
    "ValidationError",
    "bipartite_soft_matching",
    "create_model",
    "merge_wavg",
    "model_info",
    "patch",
    "resolve_schedule",
    "__version__",
]
