"""Merge-aware quantization, shared by every backend that quantizes ToMe graphs.

Quantizing the token-matching path (the similarity MatMul, max/argmax, TopK, the ranking) changes *which*
tokens merge, and quantizing the size arithmetic (x·size, /size, log size) skews every merged token. So by
default both stay in fp32: the exported graph names those nodes ``tome_match/<block>/...`` and
``tome_merge/<block>/...`` (:func:`tome_export.export.tome_nodes`), and quantizers exclude them by name.

This module holds the backend-independent pieces:

* calibration data: real photos (a user folder, else the bundled ones) with seeded augmentation;
* which nodes to keep in fp32 (:func:`protected_node_names`) and a check that a quantized graph really left
  them alone (:func:`quantized_protected_nodes`);
* ONNX Runtime quantizers: static Q/DQ (:func:`quantize_qdq`, what TensorRT consumes too) and dynamic
  (:func:`quantize_dynamic_int8`);
* merge decisions: which A token merged into which B token, per block and image, read from the PyTorch model
  (:func:`torch_merge_decisions`) or from an artifact whose decision tensors are exposed as extra outputs
  (:func:`decision_tensors`, :func:`with_decision_outputs`, :func:`decisions_from_outputs`), and their
  agreement (:func:`merge_decision_agreement`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from PIL import Image, ImageEnhance, ImageOps

from .errors import UserError
from .export import MATCH_PREFIX, MERGE_PREFIX
from .images import sample_photos
from .preprocess import Preprocessing, open_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# What a recipe's ``keep_fp32`` names -> the node-name prefixes kept out of quantization / precision conversion.
KEEP_FP32 = {"tome": (MATCH_PREFIX, MERGE_PREFIX), "match": (MATCH_PREFIX,), "none": ()}

# A merge decision of one block: for every image, the (A index, B index) pairs of the merged tokens, sorted by
# A index, shape (images, r, 2). Keys are block names as in the graph ("blocks.3").
Decisions = Dict[str, np.ndarray]


# --- calibration data ----------------------------------------------------------------------------------------


def image_files(directory: Union[str, os.PathLike]) -> List[Path]:
    """Image files under ``directory`` (recursively, sorted), or a one-line UserError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--calib-data {str(directory)!r} is not a directory: pass a folder of JPEG/PNG images")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--calib-data {str(directory)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                        f"pass a folder of representative photos")
    return files


def _augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (30-100% of the area, aspect 3:4-4:3), a horizontal flip half the time, colour jitter."""
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(0.3, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.crop((left, top, left + cw, top + ch))
            break
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.7, 1.3)))
    return image


def calibration_images(count: int, data_dir: Optional[os.PathLike] = None, augment: bool = True,
                       seed: int = 0) -> List[Image.Image]:
    """``count`` real RGB photos: from ``data_dir`` (a seeded sample when it holds more), else the bundled photos.

    With ``augment`` every image but the first pass over the originals is a random crop/flip/jitter of one, so
    a handful of bundled photos still give varied activation ranges. Never random noise.
    """
    if count < 1:
        raise UserError(f"calibration needs at least one image, got {count}")
    rng = np.random.default_rng(seed)
    if data_dir is not None:
        files = image_files(data_dir)
        if len(files) > count:
            files = [files[i] for i in sorted(rng.choice(len(files), count, replace=False))]
        originals = [open_image(f).convert("RGB") for f in files]
    else:
        originals = sample_photos()
    images = []
    for i in range(count):
        image = originals[i % len(originals)]
        images.append(_augment(image, rng) if augment and i >= len(originals) else image)
    return images


def calibration_batches(pre: Preprocessing, count: int, batch: int, data_dir: Optional[os.PathLike] = None,
                        augment: bool = True, seed: int = 0) -> List[np.ndarray]:
    """Preprocessed calibration images in batches of ``batch`` (``count`` rounded up to whole batches)."""
    count = -(-count // batch) * batch
    arrays = pre.batch(calibration_images(count, data_dir, augment, seed))
    return [arrays[i:i + batch] for i in range(0, count, batch)]


# --- which nodes stay in fp32 ----------------------------------------------------------------------------


def protected_node_names(model: onnx.ModelProto, keep_fp32: str = "tome") -> List[str]:
    """Names of the nodes to keep in fp32: ``tome`` = matching path and merge arithmetic, ``match``, ``none``."""
    if keep_fp32 not in KEEP_FP32:
        raise UserError(f"keep_fp32 = {keep_fp32!r}: choose one of {', '.join(KEEP_FP32)}")
    prefixes = KEEP_FP32[keep_fp32]
    names = [n.name for n in model.graph.node if prefixes and n.name.startswith(prefixes)]
    if prefixes and not names and any(n.op_type in ("TopK", "CumSum") for n in model.graph.node):
        raise RuntimeError("the graph merges tokens but has no tome_match/ or tome_merge/ nodes: "
                           "it was not exported by tome_export.export_onnx")
    return names


def quantized_protected_nodes(quantized: onnx.ModelProto, protected: Iterable[str]) -> Dict[str, List[str]]:
    """Which protected nodes a quantizer touched anyway; both lists are empty when the exclusion really happened.

    ``replaced``: gone from the graph (turned into an integer op such as MatMulInteger). ``reading_int8``: still
    float, but reading a tensor that went through DequantizeLinear, i.e. int8-rounded values. ToMe nodes have no
    weights, so any dequantized input is an activation.
    """
    nodes = {n.name: n for n in quantized.graph.node}
    dequantized = {out for n in quantized.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    protected = list(protected)
    return {"replaced": [name for name in protected if name not in nodes],
            "reading_int8": [name for name in protected
                             if name in nodes and any(t in dequantized for t in nodes[name].input)]}


# --- ONNX Runtime quantizers -----------------------------------------------------------------------------


class _Reader:
    """An ORT CalibrationDataReader over preprocessed batches (duck-typed: ORT only calls get_next/rewind)."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self.input_name, self.batches, self.index = input_name, list(batches), 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {self.input_name: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.batches, self.index = self.batches[start_index:end_index], 0


def _calibration_reader(input_name: str, batches: Sequence[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass

    return Reader(input_name, batches)


@contextlib.contextmanager
def _quiet_root_logger():
    """ORT's quantizers log advice and progress through the root logger; builds report results instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if name not in types:
        raise UserError(f"quantization type {name!r}: choose int8 or uint8")
    return types[name]


def preprocess_for_quantization(onnx_in: os.PathLike, onnx_out: os.PathLike, optimize: bool = False) -> Path:
    """ORT's recommended pre-processing (``quant_pre_process``): shape inference (and optionally ORT's basic
    graph optimisation, off by default: the exporter already optimised the graph, and constant folding would
    remove ToMe index-arithmetic nodes, blurring the check that quantization left every protected node alone).

    The exporter lists initializers in ``value_info``; ORT's quantizers rewrite some (a Gemm's transposed
    weight), and the stale entries then fail shape inference, so they are dropped first. ORT's symbolic shape
    inference is skipped: it fails on the ToMe graph, and every shape but the batch is a constant, which ONNX
    shape inference resolves. Node names survive, so ToMe exclusions still apply.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(onnx_in))
    weights = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    onnx.save(model, str(onnx_out))
    quant_pre_process(str(onnx_out), str(onnx_out), skip_optimization=not optimize, skip_symbolic_shape=True)
    return Path(onnx_out)


def quantize_qdq(
    onnx_in: os.PathLike,
    onnx_out: os.PathLike,
    calibration: Sequence[np.ndarray],
    *,
    exclude: Sequence[str] = (),
    symmetric_activations: bool = True,
    symmetric_weights: bool = True,
    activation_type: str = "int8",
    weight_type: str = "int8",
    per_channel: bool = True,
    reduce_range: bool = False,
    op_types: Optional[Sequence[str]] = None,
    calibrate_method: str = "minmax",
    preprocess: bool = True,
    extra_options: Optional[Mapping[str, object]] = None,
) -> Path:
    """Static int8 quantization in Q/DQ format with ``calibration`` batches (ORT ``quantize_static``).

    Symmetric int8 activations and weights (the defaults) are what TensorRT consumes; ORT's CPU provider runs
    the same graph. ``exclude`` names nodes kept in fp32 (see :func:`protected_node_names`); ``op_types``
    limits what is quantized (None: every op ORT can quantize).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise UserError(f"calibrate_method {calibrate_method!r}: choose one of {', '.join(methods)}")
    if not calibration:
        raise UserError("static quantization needs calibration batches")
    with tempfile.TemporaryDirectory(prefix="tome-qdq-") as tmp:
        source = preprocess_for_quantization(onnx_in, Path(tmp) / "pre.onnx") if preprocess else Path(onnx_in)
        model = onnx.load(str(source), load_external_data=False)
        input_name = model.graph.input[0].name
        present = {n.name for n in model.graph.node}
        options = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": symmetric_weights,
                   **(extra_options or {})}
        with _quiet_root_logger():
            quantize_static(
                str(source), str(onnx_out), _calibration_reader(input_name, calibration),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types) if op_types else None,
                per_channel=per_channel, reduce_range=reduce_range, activation_type=_quant_type(activation_type),
                weight_type=_quant_type(weight_type), nodes_to_exclude=[n for n in exclude if n in present],
                calibrate_method=methods[calibrate_method], extra_options=options,
            )
    return Path(onnx_out)


def quantize_dynamic_int8(
    onnx_in: os.PathLike,
    onnx_out: os.PathLike,
    *,
    exclude: Sequence[str] = (),
    per_channel: bool = False,
    reduce_range: bool = False,
    weight_type: str = "int8",
    op_types: Optional[Sequence[str]] = ("MatMul",),
    preprocess: bool = True,
    extra_options: Optional[Mapping[str, object]] = None,
) -> Path:
    """Dynamic int8 quantization (ORT ``quantize_dynamic``): int8 weights, activations quantized per batch."""
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="tome-dyn-") as tmp:
        source = preprocess_for_quantization(onnx_in, Path(tmp) / "pre.onnx") if preprocess else Path(onnx_in)
        present = {n.name for n in onnx.load(str(source), load_external_data=False).graph.node}
        with _quiet_root_logger():
            quantize_dynamic(
                str(source), str(onnx_out), op_types_to_quantize=list(op_types) if op_types else None,
                per_channel=per_channel, reduce_range=reduce_range, weight_type=_quant_type(weight_type),
                nodes_to_exclude=[n for n in exclude if n in present], extra_options=dict(extra_options or {}),
            )
    return Path(onnx_out)


# --- merge decisions -------------------------------------------------------------------------------------


def _block_of(node_name: str) -> str:
    return node_name.split("/", 2)[1]


def decision_tensors(model: onnx.ModelProto) -> Dict[str, Tuple[str, ...]]:
    """Per merging block, the graph tensors that hold its merge decision (read from an fp32 export).

    ``gather`` lowering: the matching path's GatherElements reads the merged A indices (its input 1) and
    yields their B destinations (its output), both ``(batch, r)`` integers. ``onehot`` lowering: the Less that
    says which A tokens merge (``rank < r``, ``(batch, nA)`` boolean) and the ReduceMin that gives every A
    token's best B index (``(batch, nA)``).
    """
    blocks: Dict[str, Tuple[str, ...]] = {}
    onehot: Dict[str, Dict[str, str]] = {}
    for node in model.graph.node:
        if not node.name.startswith(MATCH_PREFIX):
            continue
        block = _block_of(node.name)
        if node.op_type == "GatherElements":
            blocks[block] = ("gather", node.input[1], node.output[0])
        elif node.op_type in ("Less", "ReduceMin"):
            onehot.setdefault(block, {})[node.op_type] = node.output[0]
    for block, found in onehot.items():
        if len(found) == 2:
            blocks[block] = ("onehot", found["Less"], found["ReduceMin"])
    if not blocks and protected_node_names(model):
        raise RuntimeError("found no merge-decision tensors in a graph with ToMe nodes: the lowering changed; "
                           "update tome_export.quantize.decision_tensors")
    return dict(sorted(blocks.items(), key=lambda kv: block_order(kv[0])))


def block_order(block: str) -> Tuple:
    """Sort key of block names in model order (``blocks.2`` before ``blocks.10``)."""
    return tuple(int(p) if p.isdigit() else p for p in block.split("."))


def decision_output_names(tensors: Mapping[str, Tuple[str, ...]]) -> List[str]:
    return [name for spec in tensors.values() for name in spec[1:]]


def with_decision_outputs(model: onnx.ModelProto, tensors: Mapping[str, Tuple[str, ...]]) -> onnx.ModelProto:
    """A copy of ``model`` (fp32 or quantized) that also outputs the decision tensors of every block."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {t for n in copy.graph.node for t in n.output}
    outputs = {o.name for o in copy.graph.output}
    for name in decision_output_names(tensors):
        if name not in existing:
            raise RuntimeError(f"decision tensor {name!r} is missing from the graph (a rewrite renamed it)")
        if name not in outputs:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy


def decisions_from_outputs(tensors: Mapping[str, Tuple[str, ...]], outputs: Mapping[str, np.ndarray]) -> Decisions:
    """Canonical decisions ``(images, r, 2)`` per block from the decision tensors' values of one batch."""
    result: Decisions = {}
    for block, spec in tensors.items():
        if spec[0] == "gather":
            src, dst = np.asarray(outputs[spec[1]]).astype(np.int64), np.asarray(outputs[spec[2]]).astype(np.int64)
        else:
            merged = np.asarray(outputs[spec[1]]).astype(bool)  # (batch, nA)
            best = np.asarray(outputs[spec[2]]).astype(np.int64)  # (batch, nA)
            r = int(merged[0].sum())
            src = np.zeros((len(merged), r), np.int64)
            dst = np.zeros_like(src)
            for b, (mask, picks) in enumerate(zip(merged, best)):
                i = np.nonzero(mask)[0]
                if len(i) != r:  # a broken ranking (another number of merges): keep it visibly different
                    src[b], dst[b] = np.resize(i, r), -1
                else:
                    src[b], dst[b] = i, picks[i]
        order = np.argsort(src, axis=1, kind="stable")
        result[block] = np.stack([np.take_along_axis(src, order, 1), np.take_along_axis(dst, order, 1)], -1)
    return result


def artifact_merge_decisions(run: Callable[[np.ndarray], Mapping[str, np.ndarray]],
                             tensors: Mapping[str, Tuple[str, ...]], batches: Sequence[np.ndarray]) -> Decisions:
    """Decisions of an artifact: ``run(batch)`` returns its outputs by name, decision tensors included."""
    return concat_decisions([decisions_from_outputs(tensors, run(x)) for x in batches])


def concat_decisions(parts: Sequence[Decisions]) -> Decisions:
    """Decisions of several batches, concatenated along the image axis."""
    return {block: np.concatenate([p[block] for p in parts]) for block in parts[0]} if parts else {}


def torch_merge_decisions(model, batches: Sequence[np.ndarray]) -> Decisions:
    """Decisions of the PyTorch ToMe model (the fp32 reference), read from each block's own merge function.

    Every block's ``TokenMatch`` returns ``merge(x)``; applied to one-hot token ids it shows where each input
    token went. Output rows are ``[protected, unmerged A, B]``, so an A token that lands in a B row merged
    into that B token. Independent of the lowering, and it is the model's own code that decides.
    """
    import torch

    from .merge import cap_r
    from .models.base import merge_destinations

    found: Dict[str, List[np.ndarray]] = {}
    for x in batches:
        for block, rows in merge_destinations(model, torch.from_numpy(np.ascontiguousarray(x))).items():
            match = model.get_submodule(block).tome_merge.match
            t, p = rows.shape[1], match.num_protected
            r = cap_r(match.r, t, p)  # > 0: only merging blocks run their match
            a0 = p + p % 2
            n_a = len(range(a0, t, 2))
            base = p + n_a - r  # first B row
            pairs = []
            for image in rows[:, a0::2]:  # where each A token went
                merged = np.nonzero(image >= base)[0]
                pairs.append(np.stack([merged, image[merged] - base], -1))
            found.setdefault(block, []).append(np.stack(pairs).astype(np.int64))
    return {block: np.concatenate(v) for block, v in sorted(found.items(), key=lambda kv: block_order(kv[0]))}


def merge_decision_agreement(reference: Decisions, candidate: Decisions) -> Dict[str, object]:
    """How often a candidate merges exactly as the reference, per (block, image) and per merged pair.

    ``agreement``: the fraction of (block, image) decisions that are identical (the same set of (A token,
    B token) pairs). ``pair_agreement``: the fraction of the reference's merged pairs that the candidate
    merges too. ``first_block``: the agreement of the first merging block, where both see the same input
    tokens; a difference in one block changes the tokens every later block sees, so later blocks compound.
    """
    if set(reference) != set(candidate):
        raise ValueError(f"blocks differ: reference {sorted(reference)} vs candidate {sorted(candidate)}")
    per_block: Dict[str, float] = {}
    same = total = pairs_same = pairs_total = 0
    for block in sorted(reference, key=block_order):
        ref, cand = reference[block], candidate[block]
        if ref.shape != cand.shape:
            raise ValueError(f"{block}: decision shapes differ {ref.shape} vs {cand.shape}")
        equal = (ref == cand).all(axis=(1, 2))
        per_block[block] = round(float(equal.mean()), 4)
        same, total = same + int(equal.sum()), total + len(equal)
        for r_img, c_img in zip(ref, cand):
            pairs_same += len({tuple(p) for p in r_img} & {tuple(p) for p in c_img})
            pairs_total += len(r_img)
    return {
        "agreement": round(same / total, 4) if total else 1.0,
        "pair_agreement": round(pairs_same / pairs_total, 4) if pairs_total else 1.0,
        "first_block": next(iter(per_block.values()), 1.0),
        "decisions": total,
        "per_block": per_block,
    }
