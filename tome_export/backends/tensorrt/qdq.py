"""Explicit Q/DQ quantization for strongly typed TensorRT networks (int8, fp8), computed on CPU.

TensorRT 11 has no int8 calibrators: the scales must be in the ONNX as QuantizeLinear/DequantizeLinear pairs.
ONNX Runtime's static quantizer writes them (symmetric, signed, zero points 0, per-channel weights, biases
left in float: what TensorRT accepts). ToMe's matching path and merge arithmetic are excluded by name so the
merge decisions see unquantized scores. Calibration uses real photos (the bundled ones or ``--calib-data``),
never noise.

fp8: ONNX Runtime calibrates float8 only with its 'distribution' method, which on ViTs measured logit cosine
0.76 here. We calibrate as int8 (max of |x|, as NVIDIA's Model Optimizer does for fp8) and re-express every
pair in FP8 E4M3: scale = amax / 448.

``calibration_batches``, ``protected_node_names`` and ``quantize_qdq`` have the names and signatures of the
project's shared quantization module (``tome_export.quantize``, issue 3) and can be replaced by imports from it;
``quantize_for_tensorrt`` and ``int8_qdq_to_fp8`` are the TensorRT-specific part.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from PIL import Image, ImageEnhance, ImageOps

from ...errors import UserError
from ...export import tome_nodes
from ...images import sample_photos
from ...preprocess import Preprocessing, open_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
QUANT_TYPES = ("int8", "fp8")
INT8_QMAX = 127.0  # ONNX Runtime's symmetric int8 range is [-127, 127]: scale = amax / 127
FP8_E4M3_MAX = 448.0


def _photos(data_dir: Optional[os.PathLike]) -> List[Image.Image]:
    if data_dir is None:
        return sample_photos()
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--calib-data {str(root)!r} is not a directory: pass a folder of JPEG/PNG photos")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--calib-data {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [open_image(p).convert("RGB") for p in files]


def _augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (40-100% of the area), maybe mirrored, brightness/contrast within 20%."""
    w, h = image.size
    area = rng.uniform(0.4, 1.0) * w * h
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, int(round(np.sqrt(area * aspect)))), min(h, int(round(np.sqrt(area / aspect))))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))


def calibration_batches(pre: Preprocessing, count: int, batch: int, data_dir: Optional[os.PathLike] = None,
                        augment: bool = True, seed: int = 0) -> List[np.ndarray]:
    """At least ``count`` preprocessed real photos in full batches of ``batch``.

    The photos are used once as they are; with ``augment``, further images are random crops / flips of them.
    Without augmentation the photos are cycled.
    """
    photos = _photos(data_dir)
    rng = np.random.default_rng(seed)
    total = max(count, batch)
    total = -(-total // batch) * batch
    images = []
    for i in range(total):
        photo = photos[i % len(photos)]
        images.append(pre(_augment(photo, rng) if augment and i >= len(photos) else photo))
    return [np.stack(images[i:i + batch]) for i in range(0, total, batch)]


KEEP_FP32 = {"tome": ("tome_match/", "tome_merge/"), "match": ("tome_match/",), "none": ()}


def protected_node_names(model: onnx.ModelProto, keep_fp32: str = "tome") -> List[str]:
    """Nodes quantization leaves in float: ``tome`` = ToMe's matching path and merge arithmetic, ``match``
    = the matching path only, ``none``."""
    if keep_fp32 not in KEEP_FP32:
        raise UserError(f"quantization.keep_fp32 = {keep_fp32!r}: choose one of {', '.join(KEEP_FP32)}")
    nodes = tome_nodes(model)
    return {"tome": nodes["match"] + nodes["merge"], "match": nodes["match"], "none": []}[keep_fp32]


@contextlib.contextmanager
def _root_logger_quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of batches."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self.input_name, self.batches, self.i = input_name, list(batches), 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def quantize_qdq(
    onnx_in: os.PathLike,
    onnx_out: os.PathLike,
    calibration: Sequence[np.ndarray],
    *,
    exclude: Sequence[str] = (),
    per_channel: bool = True,
    op_types: Optional[Sequence[str]] = None,
    calibrate_method: str = "minmax",
    extra_options: Optional[Mapping[str, object]] = None,
) -> Path:
    """Static symmetric int8 quantization in Q/DQ form (ONNX Runtime's ``quantize_static``).

    ``exclude`` names nodes kept in float (:func:`protected_node_names`); ``op_types`` limits what is
    quantized (None: everything ORT quantizes).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if calibrate_method not in methods:
        raise UserError(f"calibration method {calibrate_method!r}: choose one of {', '.join(methods)}")
    if not calibration:
        raise UserError("static quantization needs calibration images; none were given")
    input_name = onnx.load(str(onnx_in), load_external_data=False).graph.input[0].name
    with _root_logger_quiet():  # ORT logs advice ("consider pre-processing") through the root logger
        quantize_static(
            str(onnx_in), str(onnx_out), _Reader(input_name, calibration), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
            op_types_to_quantize=list(op_types) if op_types else None, nodes_to_exclude=list(exclude),
            calibrate_method=methods[calibrate_method],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, **(extra_options or {})},
        )
    return Path(onnx_out)


def quantize_for_tensorrt(
    onnx_in: os.PathLike,
    onnx_out: os.PathLike,
    calibration: Sequence[np.ndarray],
    quant_type: str,
    *,
    exclude: Sequence[str] = (),
    per_channel: bool = True,
    op_types: Sequence[str] = ("MatMul", "Gemm", "Conv"),
    calibrate_method: str = "minmax",
) -> Dict[str, Any]:
    """int8 or fp8 Q/DQ that TensorRT's strongly typed networks take; returns a summary for the manifest.

    Biases stay float (TensorRT's DequantizeLinear takes no int32). fp8 calibrates as int8 and converts.
    """
    if quant_type not in QUANT_TYPES:
        raise UserError(f"quantization type {quant_type!r}: choose one of {', '.join(QUANT_TYPES)}")
    fp8 = quant_type == "fp8"
    with tempfile.TemporaryDirectory(prefix="tome-trt-qdq-") as tmp:
        out = Path(tmp) / "qdq.onnx"
        # fp8 re-quantizes the weights from their float values, so ORT keeps them float behind a Q/DQ pair.
        quantize_qdq(onnx_in, out, calibration, exclude=exclude, per_channel=per_channel, op_types=op_types,
                     calibrate_method="minmax" if fp8 else calibrate_method,
                     extra_options={"QuantizeBias": False, "AddQDQPairToWeight": fp8})
        quantized = onnx.load(str(out))
    if fp8:
        quantized = int8_qdq_to_fp8(quantized)
    onnx.save_model(quantized, str(onnx_out))
    dequantized = {o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantizable = [n for n in quantized.graph.node if n.op_type in op_types]
    excluded = set(exclude)
    return {
        "tool": "onnxruntime quantize_static, Q/DQ" + (" re-expressed as FP8 E4M3" if fp8 else ""),
        "type": quant_type,
        "symmetric": True,
        "per_channel_weights": per_channel,
        "calibration_method": "max" if fp8 else calibrate_method,
        "calibration_images": int(sum(len(b) for b in calibration)),
        "op_types": list(op_types),
        "quantized_nodes": sum(any(i in dequantized for i in n.input) for n in quantizable),
        "kept_float_nodes": sum(n.name in excluded for n in quantizable),
    }


def int8_qdq_to_fp8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Re-express symmetric int8 Q/DQ pairs as FP8 E4M3 (scale * 127 / 448), folding quantized weights.

    Needs opset >= 19 (float8 QuantizeLinear); the model's default-domain opset is raised to 19 if lower.
    """
    import ml_dtypes

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    done = set()
    for node in qdq:
        scale_name, zero_name = node.input[1], node.input[2] if len(node.input) > 2 else ""
        if scale_name not in done:
            scale = numpy_helper.to_array(inits[scale_name]) * (INT8_QMAX / FP8_E4M3_MAX)
            inits[scale_name].CopyFrom(numpy_helper.from_array(scale.astype(np.float32), scale_name))
            done.add(scale_name)
        if zero_name and zero_name not in done:
            zero = numpy_helper.to_array(inits[zero_name])
            inits[zero_name].CopyFrom(numpy_helper.from_array(np.zeros(zero.shape, ml_dtypes.float8_e4m3fn), zero_name))
            done.add(zero_name)
    # Quantize constant weights now: store FP8 bytes, not float32 + a QuantizeLinear at build time.
    folded = []
    for node in [n for n in qdq if n.op_type == "QuantizeLinear" and n.input[0] in inits]:
        weight = numpy_helper.to_array(inits[node.input[0]])
        scale = numpy_helper.to_array(inits[node.input[1]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * weight.ndim
            shape[axis % weight.ndim] = scale.size
            scale = scale.reshape(shape)
        q = np.clip(weight / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
        g.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded.append(node)
    for node in folded:
        g.node.remove(node)
    used = {i for n in g.node for i in n.input}
    for t in list(g.initializer):
        if t.name not in used:
            g.initializer.remove(t)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 19:
            opset.version = 19
    return model
