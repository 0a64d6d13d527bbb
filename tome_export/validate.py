"""Compare an exported artifact with the PyTorch ToMe model on real photos."""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from .images import sample_photos
from .preprocess import Preprocessing


def validation_batches(pre: Preprocessing, batch: int, dynamic_batch: bool, num_images: int = 8) -> List[np.ndarray]:
    """Batches of preprocessed sample photos: batches of ``batch`` images; for dynamic batch, sizes 1 and 3 too."""
    images = pre.batch(sample_photos(num_images))
    sizes = [batch] if not dynamic_batch else sorted({1, 3, batch})
    batches = []
    for size in sizes:
        reps = -(-num_images // size)
        for i in range(reps):
            idx = [(i * size + j) % num_images for j in range(size)]
            batches.append(images[idx])
    return batches


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> Dict[str, float]:
    """Max abs diff, smallest per-image cosine and top-1 agreement of two ``(N, classes)`` arrays."""
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    cand = candidate.astype(np.float64).reshape(len(candidate), -1)
    cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-30)
    return {
        "max_abs_diff": float(np.abs(ref - cand).max()),
        "min_cosine": float(cos.min()),
        "top1_agreement": float((ref.argmax(1) == cand.argmax(1)).mean()),
        "images": int(len(ref)),
    }


def validate_against_torch(
    model: torch.nn.Module, run: Callable[[np.ndarray], np.ndarray], batches: Sequence[np.ndarray]
) -> Dict[str, float]:
    """Run ``run`` (the artifact) and the PyTorch model on the same batches and compare the logits."""
    refs, outs = [], []
    with torch.no_grad():
        for x in batches:
            refs.append(model(torch.from_numpy(x)).numpy())
            outs.append(np.asarray(run(x)))
    return compare_logits(np.concatenate(refs), np.concatenate(outs))


def onnxruntime_runner(onnx_path: str, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


# recipe validation key -> (metric of compare_logits, whether the metric must stay at most or at least the limit)
THRESHOLDS = {"max_abs_diff": ("max_abs_diff", "at most"), "min_cosine": ("min_cosine", "at least"),
              "min_top1_agreement": ("top1_agreement", "at least")}


def check_thresholds(metrics: Dict[str, float], thresholds: Dict[str, float], what: str) -> Dict[str, object]:
    """Compare ``compare_logits`` metrics with a recipe's thresholds; a miss raises ValidationError.

    Returns the metrics with the thresholds applied and ``passed``, for the manifest.
    """
    from .errors import ValidationError

    applied = {key: float(thresholds[key]) for key in THRESHOLDS if key in thresholds}
    if not applied:
        raise ValueError(f"{what}: the recipe sets no validation threshold ({', '.join(THRESHOLDS)})")
    misses = []
    for key, limit in applied.items():
        metric, sense = THRESHOLDS[key]
        value = metrics[metric]
        if not (value <= limit if sense == "at most" else value >= limit):
            misses.append(f"{metric} {value:.6g} (must be {sense} {limit:g})")
    if misses:
        raise ValidationError(f"{what} differs from PyTorch ToMe on {metrics['images']} photos: "
                              f"{'; '.join(misses)}; nothing was written")
    return {**metrics, "thresholds": applied, "passed": True}
