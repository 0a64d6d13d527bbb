"""What a variant costs in quality: fidelity to fp32 PyTorch without ToMe, accuracy, and merge decisions.

Evaluation images, in order of preference: a labelled ImageFolder (``--data``), the digits test split for the
embedded accuracy case, else the photos bundled with scikit-image (fidelity only: they have no labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import UserError
from ..images import sample_photos
from ..preprocess import Preprocessing
from ..quantize import block_order
from ..validate import compare_logits

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class EvalSet:
    name: str
    images: np.ndarray  # preprocessed (N, C, H, W) float32
    labels: Optional[np.ndarray] = None  # class indices, when the images are labelled


def photo_set(pre: Preprocessing, count: int) -> EvalSet:
    n = min(count, 8)  # sample_photos cycles beyond the photos that ship; repeats add nothing
    return EvalSet(f"{n} photos bundled with scikit-image (unlabelled)", pre.batch(sample_photos(n)))


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
    """Top-1 agreement and logit cosine of a variant against the fp32 r=0 PyTorch logits."""
    metrics = compare_logits(reference, logits)
    ref, cand = reference.astype(np.float64), logits.astype(np.float64)
    cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-30)
    return {"top1_agreement": metrics["top1_agreement"], "mean_cosine": float(cos.mean()),
            "min_cosine": metrics["min_cosine"], "max_abs_diff": metrics["max_abs_diff"], "images": metrics["images"]}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    return {"top1": float((top5[:, 0] == labels).mean()), "top5": float((top5 == labels[:, None]).any(1).mean()),
            "images": int(len(labels))}


def _merged_groups(rows: np.ndarray) -> set:
    """The sets of input tokens that one block merged together (output rows holding more than one input)."""
    groups: Dict[int, list] = {}
    for token, row in enumerate(rows.tolist()):
        groups.setdefault(row, []).append(token)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def decision_agreement(reference: Dict[str, np.ndarray], candidate: Dict[str, np.ndarray]) -> Dict[str, object]:
    """How often a candidate merges exactly as the reference.

    ``agreement``: fraction of (block, image) decisions that are identical; ``first_block``: the same for the first
    merging block (later blocks see tokens that earlier differences already changed); ``group_agreement``: fraction
    of the reference's merged token groups that the candidate merges identically.
    """
    if set(reference) != set(candidate):
        raise ValueError(f"merging blocks differ: {sorted(reference)} vs {sorted(candidate)}")
    if not reference:
        return {"agreement": None, "reason": "no block merges at this r"}
    blocks = sorted(reference, key=block_order)
    same = [(reference[k] == candidate[k]).all(axis=1) for k in blocks]
    kept = total = 0
    for k in blocks:
        for ref_rows, cand_rows in zip(reference[k], candidate[k]):
            ref_groups = _merged_groups(ref_rows)
            kept += len(ref_groups & _merged_groups(cand_rows))
            total += len(ref_groups)
    return {"agreement": float(np.concatenate(same).mean()), "first_block": float(same[0].mean()),
            "group_agreement": kept / total if total else 1.0,
            "decisions": int(sum(len(s) for s in same)), "images": int(len(same[0])),
            "source": "block merge functions of the eager model vs fp32 PyTorch at the same r"}


def artifact_decision_agreement(manifest: Dict, directory: Path, reference_model: torch.nn.Module,
                                x: np.ndarray, batch: Optional[int]) -> Dict[str, object]:
    """Merge-decision agreement of a built artifact with fp32 PyTorch at the same r, or why it is not measured.

    Targets that quantize record it at build time (manifest ``merge_decisions``); for the plain fp32 ``onnx`` target
    it is read from the graph's decision tensors with :mod:`tome_export.quantize` where that module exists.
    """
    recorded = manifest.get("merge_decisions")
    if isinstance(recorded, dict) and isinstance(recorded.get("as_built"), dict):
        built = recorded["as_built"]
        return {"agreement": built.get("agreement"), "first_block": built.get("first_block"),
                "group_agreement": built.get("pair_agreement"), "decisions": built.get("decisions"),
                "source": "measured by the build against fp32 PyTorch at the same r (manifest merge_decisions)"}
    if manifest.get("r_schedule") and not any(manifest["r_schedule"]):
        return {"agreement": None, "reason": "no block merges at this r"}
    if manifest.get("target") != "onnx":
        return {"agreement": None, "reason": f"the {manifest.get('target')} build recorded no merge decisions"}
    try:
        from .. import quantize
    except ImportError:
        return {"agreement": None, "reason": "reading decisions from a graph needs tome_export.quantize, "
                                             "which this installation lacks"}
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(directory / "model.onnx"))
    tensors = quantize.decision_tensors(proto)
    session = ort.InferenceSession(quantize.with_decision_outputs(proto, tensors).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    size = batch or len(x)
    if len(x) < size:  # a static batch larger than the decision images: repeat the last image
        x = np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
    batches = [x[i:i + size] for i in range(0, len(x) - size + 1, size)]
    run = lambda b: dict(zip(names, session.run(None, {session.get_inputs()[0].name: b})))  # noqa: E731
    candidate = quantize.artifact_merge_decisions(run, tensors, batches)
    result = quantize.merge_decision_agreement(quantize.torch_merge_decisions(reference_model, batches), candidate)
    return {"agreement": result["agreement"], "first_block": result["first_block"],
            "group_agreement": result.get("pair_agreement"), "decisions": result["decisions"],
            "source": "graph decision tensors in ONNX Runtime vs fp32 PyTorch at the same r (tome_export.quantize)"}
