"""Compare an artifact with the PyTorch ToMe model on real photos, and check the result against thresholds.

One checker (:func:`check_thresholds`) serves every target and task: a recipe's ``validation`` section names limits
on the metrics of :func:`compare_outputs` (logits: :func:`compare_logits`; embeddings, dense features and merged
tokens: :func:`compare_features` over the vectors of :func:`vectors`) and, where the graph has a ``source`` output,
on the final token grouping (:func:`source_agreement`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ValidationError
from ..graph_names import FEATURES_NAME, OUTPUT_NAME, SOURCE_NAME, TOKEN_OWNERS_NAME, TOKEN_SIZES_NAME, TOKENS_NAME
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


def vectors(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """What validation compares of a non-classify task's outputs, per image ``(N, V, C)``: the embedding
    (``V = 1``), every patch's features, or every patch's token (``tokens`` unmerged through ``token_owners``,
    so that two runs whose merges differ are compared patch by patch)."""
    if TOKENS_NAME in outputs:
        owners = np.asarray(outputs[TOKEN_OWNERS_NAME]).astype(np.int64)
        return np.take_along_axis(np.asarray(outputs[TOKENS_NAME]), owners[..., None], axis=1)
    name, value = next(iter(outputs.items()))
    value = np.asarray(value)
    if name == FEATURES_NAME and value.ndim == 4:  # (N, C, H, W): one vector per patch, row-major over the grid
        return value.reshape(value.shape[0], value.shape[1], -1).transpose(0, 2, 1)
    return value[:, None, :] if value.ndim == 2 else value


def vector_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The cosine of every vector ``(N, V)`` between two ``(N, V, C)`` arrays (in float64)."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    return (ref * cand).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1) + 1e-30)


def pooled_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per image ``(N,)``, the cosine of its vectors' mean: the embedding itself, or every patch's features pooled
    as a mean-pooling head would pool them."""
    return vector_cosines(reference.mean(axis=1, keepdims=True), candidate.mean(axis=1, keepdims=True))[:, 0]


def compare_features(reference: np.ndarray, candidate: np.ndarray,
                     image_ids: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """The metrics of two ``(N, V, C)`` arrays of vectors (one embedding, or one per patch), as :func:`compare_logits`
    measures logits: the max abs diff over every vector (fp32 recipes limit it: every patch must match), and
    ``min_cosine``, the smallest per-image cosine of the pooled vectors (:func:`pooled_cosines`), which a matching
    that reduced precision flips moves little; then, reported, the cosines of single vectors (a patch that another
    token holds after a flip shows there)."""
    cosines = vector_cosines(reference, candidate)
    ids = np.arange(len(reference)) if image_ids is None else np.asarray(image_ids)
    metrics: Dict[str, Any] = {
        "max_abs_diff": float(np.abs(reference.astype(np.float64) - candidate).max()),
        "min_cosine": float(pooled_cosines(reference, candidate).min()),
        "mean_vector_cosine": float(cosines.mean()), "min_vector_cosine": float(cosines.min()),
        "min_image_vector_cosine": float(cosines.mean(axis=1).min()),
        "vectors_per_image": int(reference.shape[1]), "images": int(len(np.unique(ids))),
    }
    if len(reference) != metrics["images"]:
        metrics["runs"] = int(len(reference))
    return metrics


def token_figures(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                  what: str) -> Dict[str, Any]:
    """The exact facts of a ``tokens`` artifact: as many tokens as PyTorch, sizes that count the patches each token
    holds (a ValidationError otherwise), the fraction of images whose sizes equal PyTorch's, and over those images
    (which merged as PyTorch did) the smallest cosine of one token with PyTorch's, ``aligned_token_cosine``, which
    the recipe's ``min_cosine`` limits too."""
    for name in (TOKENS_NAME, TOKEN_SIZES_NAME, TOKEN_OWNERS_NAME):
        if np.shape(reference[name]) != np.shape(candidate[name]):
            raise ValidationError(f"{what}: {name} has shape {np.shape(candidate[name])}, PyTorch ToMe "
                                  f"{np.shape(reference[name])}; nothing was written")
    sizes, owners = np.asarray(candidate[TOKEN_SIZES_NAME]), np.asarray(candidate[TOKEN_OWNERS_NAME]).astype(np.int64)
    counted = np.stack([np.bincount(o, minlength=sizes.shape[1]) for o in owners])
    if not np.array_equal(np.where(counted > 0, counted, 1), sizes):  # prefix tokens hold no patch, size 1
        raise ValidationError(f"{what}: token_sizes do not count the patches token_owners puts in each token; "
                              f"nothing was written")
    same = (np.asarray(reference[TOKEN_SIZES_NAME]) == sizes).all(axis=1)
    figures = {"tokens": int(sizes.shape[1]), "patches": int(owners.shape[1]),
               "token_sizes_identical": float(same.mean())}
    if same.any():
        aligned = vector_cosines(np.asarray(reference[TOKENS_NAME])[same], np.asarray(candidate[TOKENS_NAME])[same])
        figures["aligned_token_cosine"] = float(aligned.min())
    return figures


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                    image_ids: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """The metrics of one task's outputs (by name, concatenated over batches): logits or :func:`vectors`."""
    if OUTPUT_NAME in reference:
        return compare_logits(reference[OUTPUT_NAME], candidate[OUTPUT_NAME], image_ids)
    return compare_features(vectors(reference), vectors(candidate), image_ids)


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
# Further metrics a threshold limits where they are measured: the tokens of images that merged as PyTorch did.
ALSO_LIMITS: Dict[str, Tuple[str, ...]] = {"min_cosine": ("aligned_token_cosine",)}


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
        for name in (metric, *(m for m in ALSO_LIMITS.get(key, ()) if m in metrics)):
            value = metrics[name]
            if not (value <= limit if sense == "at most" else value >= limit):
                misses.append(f"{name} {value:.6g} (must be {sense} {limit:g})")
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
    the margin, and excusing all of them would leave few images checked.

    ``reference`` and ``candidate``: logits ``(N, classes)``, or the ``(N, V, C)`` vectors of another task."""
    compare = compare_logits if np.ndim(reference) == 2 else compare_features
    ids = np.arange(len(reference)) if image_ids is None else np.asarray(image_ids)
    metrics = {**compare(reference, candidate, ids), **(extra or {})}
    try:
        return check_thresholds(metrics, thresholds, what)
    except ValidationError:
        excused = (np.asarray(margins) < TIE_MARGIN) & rows_missing(reference, candidate, thresholds)
        if not excused.any() or 2 * int(excused.sum()) > len(excused):
            raise
    rest = {**compare(reference[~excused], candidate[~excused], ids[~excused]), **(extra or {})}
    checked = check_thresholds(rest, thresholds, f"{what} (without {int(excused.sum())} near-tie images)")
    return {**checked, "near_tie_images": np.flatnonzero(excused).tolist(), "tie_margin": TIE_MARGIN,
            "all_images": metrics}


def rows_missing(reference: np.ndarray, candidate: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """Per row, whether it alone misses a per-image limit: its largest difference, its cosine, or (logits, where
    top-1 agreement is limited) its top-1 class."""
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    cand = candidate.astype(np.float64).reshape(len(candidate), -1)
    missing = np.zeros(len(ref), dtype=bool)
    if thresholds.max_abs_diff is not None:
        missing |= np.abs(ref - cand).max(1) > thresholds.max_abs_diff
    if thresholds.min_cosine is not None and np.ndim(reference) == 3:  # an encoder task's vectors
        missing |= pooled_cosines(reference, candidate) < thresholds.min_cosine
    elif thresholds.min_cosine is not None:
        missing |= logit_cosines(ref, cand) < thresholds.min_cosine
    if thresholds.min_top1_agreement is not None and np.ndim(reference) == 2:
        missing |= ref.argmax(1) != cand.argmax(1)
    return missing


def torch_outputs(model: Any, batches: Sequence[np.ndarray], with_source: bool = False
                  ) -> Tuple[Dict[str, np.ndarray], List[np.ndarray]]:
    """The PyTorch model's outputs by name (its task's, concatenated over the batches) and, ``with_source``,
    per-batch source maps."""
    import torch

    names = list(model.tome_task.outputs)
    outputs: Dict[str, List[np.ndarray]] = {name: [] for name in names}
    sources = []
    with torch.no_grad():
        for x in batches:
            values = model.tome_outputs(torch.from_numpy(x), trace_source=with_source)
            for name, value in zip(names, values):
                outputs[name].append(value.numpy())
            if with_source:
                sources.append(values[-1].numpy())
    return {name: np.concatenate(parts) for name, parts in outputs.items()}, sources


Infer = Callable[[np.ndarray], Mapping[str, np.ndarray]]  # a runner's named outputs of one batch


def validate_against_torch(model: Any, infer: Infer, batches: Sequence[np.ndarray], thresholds: Thresholds,
                           what: str, with_source: bool = False) -> Dict[str, Any]:
    """The build gate: an artifact's outputs (``infer``: its named outputs; those of the model's task are
    compared) vs the PyTorch model's against ``thresholds``, images whose merge decisions rest on a near-tie
    reported apart (:func:`check_with_near_ties`); ``with_source`` also compares the final token grouping (the
    artifact has a ``source`` output). A ``tokens`` artifact must also have PyTorch's token count and sizes that
    count its patches (:func:`token_figures`)."""
    from .decisions import matching_margins

    reference, ref_sources = torch_outputs(model, batches, with_source)
    outputs = [infer(x) for x in batches]
    candidate = {name: np.concatenate([o[name] for o in outputs]) for name in reference}
    extra = source_agreement(ref_sources, [o[SOURCE_NAME] for o in outputs]) if with_source else {}
    if TOKENS_NAME in reference:
        extra.update(token_figures(reference, candidate, what))
    ids = input_ids(batches)
    metrics = {**compare_outputs(reference, candidate, ids), **extra}
    try:
        return check_thresholds(metrics, thresholds, what)
    except ValidationError:  # margins cost one more PyTorch pass: only when the plain check fails
        return check_with_near_ties(*_compared(reference, candidate), matching_margins(model, batches), thresholds,
                                    what, extra=extra, image_ids=ids)


def _compared(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
              ) -> Tuple[np.ndarray, np.ndarray]:
    """The arrays :func:`compare_outputs` compares: logits, or the task's :func:`vectors`."""
    if OUTPUT_NAME in reference:
        return reference[OUTPUT_NAME], candidate[OUTPUT_NAME]
    return vectors(reference), vectors(candidate)
