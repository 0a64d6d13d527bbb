"""Build targets, one module per backend. Each registers a :class:`Target` in ``TARGETS``.

A target turns the exported fp32 ToMe ONNX (already in the work directory) into its artifacts,
validates them against the PyTorch model and returns what goes into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..models import ModelSpec
from ..models.base import ModelInfo
from ..preprocess import Preprocessing
from ..recipes import Recipe
from ..schedule import Schedule


@dataclass
class BuildContext:
    """Everything a target needs; ``workdir`` becomes the output directory when the build succeeds."""

    workdir: Path
    onnx_path: Path
    model: torch.nn.Module  # patched, eval, fp32: the reference every artifact is validated against
    spec: ModelSpec
    info: ModelInfo
    schedule: Schedule
    preprocessing: Preprocessing
    precision: str
    batch: int
    dynamic_batch: bool
    merge_impl: str
    recipe: Recipe  # the recipe's sections: build settings, quantization, calibration, validation thresholds
    options: Any  # the BuildOptions
    log: Callable[[str], None] = print


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    precisions: Tuple[str, ...]
    default_merge_impl: str
    build: Callable[[BuildContext], Dict[str, Any]]
    requires: Tuple[str, ...] = field(default=())  # importable modules the target needs
    # Allowed keys of each recipe section -> type, tuple of types, or tuple of allowed strings.
    recipe_schema: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # BuildOptions.extra keys (target-specific CLI options) the target understands; others are an error.
    options: Tuple[str, ...] = field(default=())
    # Cheap checks of (resolved BuildOptions, Recipe) before any model is loaded; raise UserError.
    check: Optional[Callable[[Any, Recipe], None]] = None


TARGETS: Dict[str, Target] = {}


def register(target: Target) -> Target:
    TARGETS[target.name] = target
    return target


from . import onnx as _onnx  # noqa: E402,F401  (registers the target)
from . import onnxruntime as _onnxruntime  # noqa: E402,F401
from . import openvino as _openvino  # noqa: E402,F401
from . import tensorrt as _tensorrt  # noqa: E402,F401
from . import tensorrt_rtx as _tensorrt_rtx  # noqa: E402,F401
