"""What a variant costs in quality: fidelity to fp32 PyTorch without ToMe, accuracy, and merge decisions.

Evaluation images, in order of preference: a labelled ImageFolder (``--data``), the digits test split for the
embedded accuracy case, else the photos bundled with tome-export (fidelity only: they have no labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..errors import UserError
from ..images import MAX_VIEWS, SAMPLE_PHOTOS, sample_views
from ..preprocess import Preprocessing
from ..quality.calibration import IMAGE_SUFFIXES
from ..quality.decisions import (Decisions, artifact_merge_decisions, decision_output_names, decision_tensors,
                                 merge_decision_agreement, torch_merge_decisions)
from ..quality.validate import compare_logits, logit_cosines


@dataclass
class EvalSet:
    name: str
    images: np.ndarray  # preprocessed (N, C, H, W) float32
    labels: Optional[np.ndarray] = None  # class indices, when the images are labelled


def photo_set(pre: Preprocessing, count: int) -> EvalSet:
    """``count`` distinct images: the bundled photos, then fixed views of them (at most :data:`MAX_VIEWS`)."""
    n = min(count, MAX_VIEWS)
    what = "photos" if n <= len(SAMPLE_PHOTOS) else "views of the photos"
    return EvalSet(f"{n} {what} bundled with tome-export (unlabelled)", pre.batch(sample_views(n)))


def digits_set(seed: int) -> EvalSet:
    from .digits import load_digits_split

    split = load_digits_split(seed)
    return EvalSet(f"scikit-learn digits, held-out test split ({len(split.test_y)} images, split seed {seed})",
                   split.test_x, split.test_y)


def imagefolder_classes(directory: Path, num_classes: int) -> List[Tuple[Path, int]]:
    """``(folder, class index)``: folders named by integers use that index, otherwise sorted names = index order.

    Sorted names are how ImageNet's validation folders (n01440764, ...) map to timm's class indices.
    """
    if not directory.is_dir():
        raise UserError(f"--data {str(directory)!r} is not a directory: pass an ImageFolder (one folder per class)")
    folders = sorted(d for d in directory.iterdir() if d.is_dir())
    if not folders:
        raise UserError(f"--data {str(directory)!r} has no class folders: pass an ImageFolder (DIR/<class>/<image>)")
    if all(d.name.isdigit() for d in folders):
        pairs = [(d, int(d.name)) for d in folders]
        if max(i for _, i in pairs) >= num_classes:
            raise UserError(f"--data {str(directory)!r} has a class folder numbered >= {num_classes}, "
                            f"the model's class count")
        return pairs
    if len(folders) != num_classes:
        raise UserError(f"--data {str(directory)!r} has {len(folders)} class folders but the model has {num_classes} "
                        f"classes: sorted folder names must match the class order (or name folders by class index)")
    return [(d, i) for i, d in enumerate(folders)]


def imagefolder_set(directory: Path, pre: Preprocessing, num_classes: int, max_images: int) -> EvalSet:
    files = [(f, label) for folder, label in imagefolder_classes(Path(directory), num_classes)
             for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(f"--data {str(directory)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    total = len(files)
    if max_images and total > max_images:  # evenly spaced over the sorted files: deterministic, every class
        files = [files[i] for i in np.linspace(0, total - 1, max_images).round().astype(int)]
    images = pre.batch([f for f, _ in files])
    labels = np.array([label for _, label in files], dtype=np.int64)
    return EvalSet(f"ImageFolder {directory} ({len(files)} of {total} images)", images, labels)


def fidelity(reference: np.ndarray, logits: np.ndarray) -> Dict[str, float]:
    """Top-1 agreement (with its 95 % interval) and logit cosine of a variant against the fp32 r=0 PyTorch logits."""
    metrics = compare_logits(reference, logits)
    return {"top1_agreement": metrics["top1_agreement"], "top1_interval_95": metrics["top1_interval_95"],
            "mean_cosine": float(logit_cosines(reference, logits).mean()),
            "min_cosine": metrics["min_cosine"], "max_abs_diff": metrics["max_abs_diff"], "images": metrics["images"]}


def headline(fid: Dict[str, Any]) -> Tuple[Optional[float], str]:
    """The fidelity figure a budget is set on, and its name: top-1 agreement of a classifier, the mean feature
    cosine of the other tasks (:mod:`.tasks`)."""
    if "task" in fid:
        what = {"embed": "embedding", "dense": "patch", "tokens": "pooled-token"}.get(fid["task"], fid["task"])
        return fid.get("cosine"), f"mean {what} cosine"
    return fid.get("top1_agreement"), "top-1 agreement"


def task_figure(fid: Dict[str, Any]) -> str:
    """What a task reports beside its cosine: nearest-neighbour agreement (embed), tokens kept (tokens)."""
    if "nn_agreement" in fid:
        return f"nearest neighbour {fid['nn_agreement']:.3f}"
    if "kept" in fid:
        return f"{fid['kept']} tokens ({fid['patches']} patches)"
    if "min_patch_cosine" in fid:
        return f"worst patch {fid['min_patch_cosine']:.4f}"
    return "–"


def accuracy(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    return {"top1": float((top5[:, 0] == labels).mean()), "top5": float((top5 == labels[:, None]).any(1).mean()),
            "images": int(len(labels))}


AGREEMENT = ("agreement", "first_block", "pair_agreement", "group_agreement", "decisions")


def decision_agreement(reference: Decisions, candidate_model: Any, x: np.ndarray,
                       to_tensor: Optional[Callable[[np.ndarray], Any]] = None) -> Dict[str, object]:
    """How often an eager candidate (another precision of the same patched model) merges as the fp32 reference
    decisions on ``x`` (at the same r): every measure of
    :func:`~tome_export.quality.decisions.merge_decision_agreement`."""
    if not reference:
        return {"agreement": None, "reason": "no block merges at this r"}
    result = merge_decision_agreement(reference, torch_merge_decisions(candidate_model, [x], to_tensor))
    return {**{k: result[k] for k in AGREEMENT}, "images": int(len(x)),
            "source": "block merge functions of the eager model vs fp32 PyTorch at the same r"}


def artifact_decision_agreement(artifact: Any, reference_model: Any, x: np.ndarray) -> Dict[str, object]:
    """Merge-decision agreement of a built artifact with fp32 PyTorch at the same r, or why it is not measured.

    Targets that quantize record it at build time (manifest ``merge_decisions``); otherwise it is read from the
    decision tensors of the artifact's graph, run by its own runner with those tensors as extra outputs.
    """
    manifest = artifact.manifest
    recorded = manifest.merge_decisions
    if isinstance(recorded, dict) and isinstance(recorded.get("as_built"), dict):
        built = recorded["as_built"]
        return {**{k: built.get(k) for k in AGREEMENT},
                "source": "measured by the build against fp32 PyTorch at the same r (manifest merge_decisions)"}
    if manifest.r_schedule and not any(manifest.r_schedule):
        return {"agreement": None, "reason": "no block merges at this r"}
    graph = artifact.directory / str(artifact.io.runtime.get("file", ""))
    if graph.suffix != ".onnx" or not graph.is_file():
        return {"agreement": None, "reason": f"the {manifest.target} build recorded no merge decisions"}
    import onnx

    tensors = decision_tensors(onnx.load(str(graph), load_external_data=False))
    with artifact.load(extra_outputs=decision_output_names(tensors)) as runner:
        size = runner.batch_size or len(x)
        if len(x) < size:  # a static batch larger than the decision images: repeat the last image
            x = np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
        batches = [x[i:i + size] for i in range(0, len(x) - size + 1, size)]
        candidate = artifact_merge_decisions(runner.infer, tensors, batches)
    result = merge_decision_agreement(torch_merge_decisions(reference_model, batches), candidate)
    return {**{k: result[k] for k in AGREEMENT},
            "source": "graph decision tensors run by the artifact's runner vs fp32 PyTorch at the same r"}
