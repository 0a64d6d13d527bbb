"""Steps every reduced-precision target shares: calibration from the recipe, validation with the recipe's
thresholds through the artifact's own runner, and the merge-decision report (with and without protection)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..quantize import Decisions, calibration_batches, merge_decision_agreement, torch_merge_decisions
from ..validate import check_thresholds, validate_against_torch, validation_batches
from . import BuildContext

CALIBRATION_SCHEMA = {"images": int, "batch": int, "augment": bool, "seed": int}
VALIDATION_SCHEMA = {"max_abs_diff": float, "min_cosine": float, "min_top1_agreement": float, "images": int,
                     "compare_unprotected": bool}
KEEP_FP32_CHOICES = ("tome", "match", "none")


def calibration(ctx: BuildContext) -> Tuple[List[np.ndarray], Dict[str, Any]]:
    """Calibration batches from the recipe's ``calibration`` section and ``--calib-data`` (BuildOptions.extra)."""
    cfg = ctx.recipe.calibration
    data_dir = ctx.options.extra.get("calib_data")
    count, augment, seed = int(cfg.get("images", 32)), bool(cfg.get("augment", True)), int(cfg.get("seed", 0))
    batch = ctx.batch if not ctx.dynamic_batch else int(cfg.get("batch", 1))
    batches = calibration_batches(ctx.preprocessing, count, batch, data_dir=data_dir, augment=augment, seed=seed)
    source = str(data_dir) if data_dir else "bundled sample photos (scikit-image)"
    return batches, {"images": sum(len(b) for b in batches), "source": source, "augment": augment, "seed": seed}


def runner_manifest(ctx: BuildContext, runtime: Mapping[str, Any]) -> Dict[str, Any]:
    """What a runner reads from the manifest, so builds validate through the exact code deployments run."""
    batch_dim: Any = "batch" if ctx.dynamic_batch else ctx.batch
    return {"input": {"name": "images", "shape": [batch_dim, *ctx.preprocessing.input_size], "dtype": "float32",
                      "dynamic_batch": ctx.dynamic_batch},
            "preprocessing": ctx.preprocessing.to_dict(), "runtime": dict(runtime)}


def validate(ctx: BuildContext, run: Callable[[np.ndarray], np.ndarray], what: str) -> Dict[str, Any]:
    """Logits of ``run`` vs the PyTorch ToMe model on real photos, against the recipe's thresholds."""
    images = int(ctx.recipe.validation.get("images", ctx.options.validation_images))
    batches = validation_batches(ctx.preprocessing, ctx.batch, ctx.dynamic_batch, images)
    return check_thresholds(validate_against_torch(ctx.model, run, batches), ctx.recipe.validation, what)


def decision_batches(ctx: BuildContext) -> List[np.ndarray]:
    images = int(ctx.recipe.validation.get("images", ctx.options.validation_images))
    return validation_batches(ctx.preprocessing, ctx.batch, False, images)


def merge_decision_report(
    ctx: BuildContext,
    measure: Callable[[bool, List[np.ndarray]], Decisions],
    keep_fp32: str,
    unprotected_differs: bool,
) -> Dict[str, Any]:
    """Agreement of the artifact's merge decisions with the fp32 PyTorch model; with ``compare_unprotected``
    also of the same build without the fp32 protection (built only to be measured).

    ``measure(protected, batches)`` returns the decisions of the artifact (True) or the unprotected variant.
    """
    batches = decision_batches(ctx)
    reference = torch_merge_decisions(ctx.model, batches)
    if not reference:  # nothing merges (r = 0)
        return {"reference": "PyTorch fp32 ToMe", "blocks_merging": 0}
    report: Dict[str, Any] = {"reference": "PyTorch fp32 ToMe", "images": sum(len(b) for b in batches),
                              "keep_fp32": keep_fp32,
                              "as_built": merge_decision_agreement(reference, measure(True, batches))}
    compare = bool(ctx.recipe.validation.get("compare_unprotected", True))
    if keep_fp32 != "none" and compare:
        if unprotected_differs:
            report["without_protection"] = merge_decision_agreement(reference, measure(False, batches))
        else:
            report["without_protection"] = "same graph: this precision step never touches the ToMe nodes"
    return report


def summary_line(report: Mapping[str, Any]) -> Optional[str]:
    """One line for the CLI: decision agreement as built and without protection."""
    built = report.get("as_built")
    if not isinstance(built, dict):
        return None
    line = f"{built['agreement']:.3f} of {built['decisions']} block x image decisions identical"
    other = report.get("without_protection")
    if isinstance(other, dict):
        line += f" ({other['agreement']:.3f} without fp32 protection)"
    return line
