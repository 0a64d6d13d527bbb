"""Build steps the reduced-precision targets share: validation through the artifact's own runner, calibration
from the recipe, and the merge-decision report (as built and, where it differs, without fp32 protection)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..quality.calibration import calibrate
from ..quality.decisions import Decisions, merge_decision_report, torch_merge_decisions
from ..quality.validate import validate_against_torch
from ..runtime.base import Runner
from .base import BuildContext

SAME_GRAPH = "same graph: this precision step never touches the ToMe nodes"


def validate(ctx: BuildContext, runner: Runner, what: str) -> Dict[str, Any]:
    """The task's outputs of the artifact's runner vs the PyTorch ToMe model on the photos, against the recipe's
    thresholds (images whose merge decisions rest on a near-tie reported apart)."""
    outputs = list(ctx.plan.task.outputs)
    return validate_against_torch(ctx.model, lambda x: runner.infer(x, outputs), ctx.validation_batches(),
                                  ctx.settings.validation.thresholds(), what)


def calibration(ctx: BuildContext) -> Tuple[List[np.ndarray], Dict[str, Any]]:
    """Calibration batches of the recipe's ``calibration`` section (``--calib-data`` wins over its folder)."""
    static = None if ctx.plan.dynamic_batch else ctx.plan.batch
    return calibrate(ctx.settings.calibration, ctx.preprocessing, static, getattr(ctx.options, "calib_data", None))


MeasureWithout = Callable[[List[np.ndarray]], Tuple[Decisions, Dict[str, Any]]]


def merge_decisions(ctx: BuildContext, as_built: Callable[[List[np.ndarray]], Decisions], keep_fp32: str,
                    protection_changes_graph: bool, without_protection: Optional[MeasureWithout]) -> Dict[str, Any]:
    """The manifest's ``merge_decisions``: the artifact's decisions against the fp32 PyTorch model's, and (recipe
    ``compare_unprotected``) those of the same build without protection, which ``without_protection`` builds and
    measures, returning its decisions and facts about it."""
    batches = ctx.validation_batches(dynamic=False)
    reference = torch_merge_decisions(ctx.model, batches)
    images = sum(len(b) for b in batches)
    if not reference:
        return merge_decision_report(reference, {}, images, keep_fp32)
    other: Any = None
    facts: Dict[str, Any] = {}
    if keep_fp32 != "none" and ctx.settings.validation.compare_unprotected:
        if protection_changes_graph and without_protection is not None:
            other, facts = without_protection(batches)
        else:
            other = SAME_GRAPH
    report = merge_decision_report(reference, as_built(batches), images, keep_fp32, other)
    if isinstance(report.get("without_protection"), dict):
        report["without_protection"].update(facts)
    return report
