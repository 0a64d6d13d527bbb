"""Compare an artifact with the PyTorch ToMe model on real photos, and check the result against thresholds.

One checker (:func:`check_thresholds`) serves every target: a recipe's ``validation`` section names limits
on the logit metrics of :func:`compare_logits` and, where the graph has a ``source`` output, on the final
token grouping (:func:`source_agreement`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ValidationError
from ..images import SAMPLE_PHOTOS, sample_views
from ..preprocess import Preprocessing


DEFAULT_IMAGES = 32  # 8 photos x 4 views: one disagreeing image moves top-1 agreement by 3 points, not 12.5


def validation_batches(pre: Preprocessing, batch: int, dynamic_batch: bool,
                       num_images: int = DEFAULT_IMAGES) -> List[np.ndarray]:
    """``num_images`` distinct views of the sample photos (:func:`~tome_export.images.sample_views`), preprocessed,
    in batches of ``batch`` (the last one filled up from the first images). A dynamic-batch build also runs
    sizes 1 and 3, on the first views only (one per photo), so the extra sizes do not triple the cost."""
    images = pre.batch(sample_views(num_images))
    sizes = [batch] if not dynamic_batch else sorted({1, 3, batch})
    batches = []
    for size in sizes:
        count = num_images if size == batch else min(num_images, len(SAMPLE_PHOTOS))
        for start in range(0, count, size):
            batches.append(images[[(start + j) % count for j in range(size)]])
    return batches


def input_ids(batches: Sequence[np.ndarray]) -> np.ndarray:
    """For every row of the concatenated ``batches``, the index of the distinct input it is (by first
    occurrence): a view run at several batch sizes, or repeated to fill a batch, counts once."""
    seen: Dict[bytes, int] = {}
    return np.array([seen.setdefault(np.ascontiguousarray(row).tobytes(), len(seen))
                     for b in batches for row in b], dtype=np.int64)


Z95 = 1.959963984540054  # the standard normal quantile of 0.975


def wilson_interval(successes: int, trials: int, z: float = Z95) -> Tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default): unlike the normal approximation it
    stays inside [0, 1] and is not empty at 0 or ``trials`` successes."""
    if trials <= 0:
        return (0.0, 1.0)
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * np.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return (max(0.0, float(centre - half)), min(1.0, float(centre + half)))


def logit_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The cosine of each image's logits ``(N,)`` between two ``(N, classes)`` arrays (in float64)."""
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    cand = candidate.astype(np.float64).reshape(len(candidate), -1)
    return (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-30)


def compare_logits(reference: np.ndarray, candidate: np.ndarray,
                   image_ids: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Max abs diff, smallest per-image cosine and top-1 agreement of two ``(N, classes)`` arrays, with the 95 %
    Wilson interval of the agreement. ``image_ids`` (:func:`input_ids`) names the distinct input of each row:
    agreement then counts distinct inputs, each agreeing only if all its rows do; ``images`` counts them."""
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    cand = candidate.astype(np.float64).reshape(len(candidate), -1)
    ids = np.arange(len(ref)) if image_ids is None else np.unique(np.asarray(image_ids), return_inverse=True)[1]
    images = int(ids.max()) + 1 if len(ids) else 0
    disagree = np.zeros(images, dtype=bool)
    np.logical_or.at(disagree, ids, ref.argmax(1) != cand.argmax(1))
    agreeing = images - int(disagree.sum())
    metrics: Dict[str, Any] = {
        "max_abs_diff": float(np.abs(ref - cand).max()),
        "min_cosine": float(logit_cosines(ref, cand).min()),
        "top1_agreement": agreeing / images,
        "top1_interval_95": [round(v, 4) for v in wilson_interval(agreeing, images)],
        "images": images,
    }
    if len(ref) != images:
        metrics["runs"] = int(len(ref))  # rows run: views at several batch sizes, or repeated to fill a batch
    return metrics


def token_groups(source: np.ndarray) -> List[frozenset]:
    """One image's final tokens as the sets of input tokens they hold (``source`` ``(T_final, T_in)``)."""
    return [frozenset(np.flatnonzero(row > 0.5).tolist()) for row in source]


def source_agreement(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> Dict[str, float]:
    """How far the final token grouping agrees: images whose grouping is identical, and final tokens
    (groups of input tokens) that also exist in the reference grouping of the same image."""
    same_images, same_groups, groups = 0, 0, 0
    for ref_batch, cand_batch in zip(reference, candidate):
        for ref, cand in zip(ref_batch, cand_batch):
            ref_groups, cand_groups = token_groups(ref), set(token_groups(cand))
            same_images += int(set(ref_groups) == cand_groups)
            same_groups += sum(g in cand_groups for g in ref_groups)
            groups += len(ref_groups)
    images = sum(len(b) for b in reference)
    return {"source_images_identical": same_images / images if images else 1.0,
            "token_group_agreement": same_groups / groups if groups else 1.0}


@dataclass(frozen=True)
class Thresholds:
    """Limits a validation must meet; None: not checked. Names are those of the recipe's ``validation`` keys."""

    max_abs_diff: Optional[float] = None
    min_cosine: Optional[float] = None
    min_top1_agreement: Optional[float] = None
    min_token_group_agreement: Optional[float] = None  # checked only where the final token grouping is measured

    def applied(self) -> Dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items() if value is not None}


# threshold -> (the measured metric it limits, whether the metric must stay at most or at least the limit)
LIMITS: Dict[str, Tuple[str, str]] = {
    "max_abs_diff": ("max_abs_diff", "at most"),
    "min_cosine": ("min_cosine", "at least"),
    "min_top1_agreement": ("top1_agreement", "at least"),
    "min_token_group_agreement": ("token_group_agreement", "at least"),
}


def confidence(metrics: Mapping[str, Any]) -> str:
    """How many images a figure rests on and, where measured, the 95 % interval of its top-1 agreement."""
    text = f"{metrics['images']} images"
    if "top1_interval_95" in metrics:
        low, high = metrics["top1_interval_95"]
        text += f" (top-1 agreement {metrics['top1_agreement']:.3f}, 95% interval {low:.3f}-{high:.3f})"
    return text


def check_thresholds(metrics: Mapping[str, Any], thresholds: Thresholds, what: str) -> Dict[str, Any]:
    """Compare measured ``metrics`` with ``thresholds``; a miss raises ValidationError naming every miss.

    A limit on a metric that was not measured (the token grouping of a graph without a ``source`` output) is
    not applied. Returns the metrics with the thresholds applied and ``passed``, for the manifest.
    """
    applied = {key: limit for key, limit in thresholds.applied().items() if LIMITS[key][0] in metrics}
    if not applied:
        raise ValueError(f"{what}: the recipe sets no validation threshold ({', '.join(LIMITS)})")
    misses = []
    for key, limit in applied.items():
        metric, sense = LIMITS[key]
        value = metrics[metric]
        if not (value <= limit if sense == "at most" else value >= limit):
            misses.append(f"{metric} {value:.6g} (must be {sense} {limit:g})")
    if misses:
        missed = [key for key, limit in applied.items() if any(m.startswith(LIMITS[key][0] + " ") for m in misses)]
        raise ValidationError(f"{what} differs from PyTorch ToMe on {confidence(metrics)}: "
                              f"{'; '.join(misses)}; nothing was written",
                              report={**metrics, "thresholds": applied, "missed": missed, "passed": False})
    return {**metrics, "thresholds": applied, "passed": True}


# A score gap below this may round either way between two backends' fp32 arithmetic after a dozen blocks.
TIE_MARGIN = 1e-4


def check_with_near_ties(reference: np.ndarray, candidate: np.ndarray, margins: np.ndarray, thresholds: Thresholds,
                         what: str, extra: Optional[Mapping[str, Any]] = None,
                         image_ids: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """:func:`check_thresholds` on the logits of every image; when that fails, again without the images that
    miss a limit and whose matching rests on a near-tie (``margins`` below :data:`TIE_MARGIN`), which two
    correct backends may merge differently. Those images are reported apart; every other image (near-tie images
    that match included) must meet the thresholds, and the excused ones must be a minority, so a wrong graph
    (wrong on images without ties too) still fails. ``margins`` and ``image_ids`` (:func:`input_ids`) have one
    entry per row.

    Only the images that miss are excused: with random weights most images have some decision with a gap below
    the margin, and excusing all of them would leave few images checked."""
    ids = np.arange(len(reference)) if image_ids is None else np.asarray(image_ids)
    metrics = {**compare_logits(reference, candidate, ids), **(extra or {})}
    try:
        return check_thresholds(metrics, thresholds, what)
    except ValidationError:
        excused = (np.asarray(margins) < TIE_MARGIN) & rows_missing(reference, candidate, thresholds)
        if not excused.any() or 2 * int(excused.sum()) > len(excused):
            raise
    rest = {**compare_logits(reference[~excused], candidate[~excused], ids[~excused]), **(extra or {})}
    checked = check_thresholds(rest, thresholds, f"{what} (without {int(excused.sum())} near-tie images)")
    return {**checked, "near_tie_images": np.flatnonzero(excused).tolist(), "tie_margin": TIE_MARGIN,
            "all_images": metrics}


def rows_missing(reference: np.ndarray, candidate: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """Per row, whether it alone misses a per-image limit: its largest logit difference, its cosine, or (where
    top-1 agreement is limited) its top-1 class."""
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    cand = candidate.astype(np.float64).reshape(len(candidate), -1)
    missing = np.zeros(len(ref), dtype=bool)
    if thresholds.max_abs_diff is not None:
        missing |= np.abs(ref - cand).max(1) > thresholds.max_abs_diff
    if thresholds.min_cosine is not None:
        missing |= logit_cosines(ref, cand) < thresholds.min_cosine
    if thresholds.min_top1_agreement is not None:
        missing |= ref.argmax(1) != cand.argmax(1)
    return missing


def torch_outputs(model: Any, batches: Sequence[np.ndarray], with_source: bool = False
                  ) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Logits (concatenated) and, ``with_source``, per-batch source maps of the PyTorch model."""
    import torch

    logits, sources = [], []
    with torch.no_grad():
        for x in batches:
            t = torch.from_numpy(x)
            if with_source:
                out, source = model.forward_with_source(t)
                sources.append(source.numpy())
            else:
                out = model(t)
            logits.append(out.numpy())
    return np.concatenate(logits), sources


Infer = Callable[[np.ndarray], Mapping[str, np.ndarray]]  # a runner's named outputs of one batch


def validate_against_torch(model: Any, infer: Infer, batches: Sequence[np.ndarray], thresholds: Thresholds,
                           what: str, with_source: bool = False) -> Dict[str, Any]:
    """The build gate: an artifact's logits (``infer``: its named outputs) vs the PyTorch model's against
    ``thresholds``, images whose merge decisions rest on a near-tie reported apart (:func:`check_with_near_ties`);
    ``with_source`` also compares the final token grouping (the artifact has a ``source`` output)."""
    from ..graph_names import OUTPUT_NAME, SOURCE_NAME
    from .decisions import matching_margins

    reference, ref_sources = torch_outputs(model, batches, with_source)
    outputs = [infer(x) for x in batches]
    candidate = np.concatenate([o[OUTPUT_NAME] for o in outputs])
    grouping = source_agreement(ref_sources, [o[SOURCE_NAME] for o in outputs]) if with_source else {}
    ids = input_ids(batches)
    metrics = {**compare_logits(reference, candidate, ids), **grouping}
    try:
        return check_thresholds(metrics, thresholds, what)
    except ValidationError:  # margins cost one more PyTorch pass: only when the plain check fails
        return check_with_near_ties(reference, candidate, matching_margins(model, batches), thresholds, what,
                                    extra=grouping, image_ids=ids)
