"""Target ``onnx``: the fp32 static-shape ToMe graph itself, validated in ONNX Runtime.

Artifacts run with :class:`tome_export.runtime.onnxruntime.OnnxRuntimeRunner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..onnx_files import move_onnx
from .base import BuildContext, Settings, Target, TargetResult, Validation
from . import register

RUNTIME = {"file": "model.onnx", "session_optimization": "all"}


@dataclass(frozen=True)
class OnnxValidation(Validation):
    max_abs_diff: Optional[float] = 1e-4  # fp32 logits vs PyTorch ToMe


@dataclass(frozen=True)
class OnnxSettings(Settings):
    validation: OnnxValidation = OnnxValidation()


def build(ctx: BuildContext) -> TargetResult:
    from ..runtime.onnxruntime import OnnxRuntimeRunner
    from ._shared import validate

    move_onnx(ctx.onnx_path, ctx.workdir / RUNTIME["file"])  # the artifact is the export itself (and its data)
    with OnnxRuntimeRunner(ctx.artifact_io(RUNTIME)) as runner:
        validation = validate(ctx, runner, "ONNX Runtime fp32")
    return TargetResult(runtime=dict(RUNTIME),
                        validation={"backend": "onnxruntime", "precision_ran": "fp32", **validation})


TARGET = register(Target(
    name="onnx",
    description="static-shape ONNX (opset >= 18), fp32, validated in ONNX Runtime",
    precisions=("fp32",),
    default_merge_impl="gather",
    runner="tome_export.runtime.onnxruntime:OnnxRuntimeRunner",
    build=build,
    settings=OnnxSettings,
    runtime_extra="onnxruntime",
    requires=("onnxruntime",),
    install_hint="pip install 'tome-export[onnxruntime]'",
    version_modules=("onnxruntime",),
))
