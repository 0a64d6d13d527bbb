"""Target ``onnx``: the fp32 static-shape ToMe graph itself, validated in ONNX Runtime."""

from __future__ import annotations

from typing import Any, Dict

from ..errors import ValidationError
from ..validate import onnxruntime_runner, validate_against_torch, validation_batches
from . import BuildContext, Target, register

FP32_MAX_ABS_DIFF = 1e-4  # when the recipe sets none


def build(ctx: BuildContext) -> Dict[str, Any]:
    limit = float(ctx.recipe.validation.get("max_abs_diff", FP32_MAX_ABS_DIFF))
    images = int(ctx.recipe.validation.get("images", ctx.options.validation_images))
    batches = validation_batches(ctx.preprocessing, ctx.batch, ctx.dynamic_batch, images)
    metrics = validate_against_torch(ctx.model, onnxruntime_runner(ctx.onnx_path), batches)
    validation = {"backend": "onnxruntime", "precision_ran": "fp32", **metrics,
                  "threshold_max_abs_diff": limit, "passed": metrics["max_abs_diff"] <= limit}
    if not validation["passed"]:
        raise ValidationError(
            f"ONNX Runtime output differs from PyTorch ToMe by {metrics['max_abs_diff']:.3g} "
            f"(allowed {limit:g}); the export is wrong and was not written"
        )
    return {"validation": validation}


TARGET = register(Target(
    name="onnx",
    description="static-shape ONNX (opset >= 18), fp32, validated in ONNX Runtime",
    precisions=("fp32",),
    default_merge_impl="gather",
    build=build,
    recipe_schema={"validation": {"max_abs_diff": float, "images": int}},
))
