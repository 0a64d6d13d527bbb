"""Explicit Q/DQ quantization for strongly typed TensorRT networks (int8, fp8), computed on CPU.

TensorRT 11 has no int8 calibrators: the scales must be in the ONNX as QuantizeLinear/DequantizeLinear pairs.
ONNX Runtime's static quantizer writes them (symmetric, signed, zero points 0, per-channel weights, biases
left in float: what TensorRT accepts), through the shared :mod:`tome_export.quantization` (real-photo calibration,
ToMe's matching path and merge arithmetic excluded by name).

fp8: ONNX Runtime calibrates float8 only with its 'distribution' method, which on ViTs measured logit cosine
0.76 here. We calibrate as int8 (max of |x|, as NVIDIA's Model Optimizer does for fp8) and re-express every
pair in FP8 E4M3: scale = amax / 448.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import UserError
from ...quantization import quantize_qdq

QUANT_TYPES = ("int8", "fp8")
INT8_QMAX = 127.0  # ONNX Runtime's symmetric int8 range is [-127, 127]: scale = amax / 127
FP8_E4M3_MAX = 448.0


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
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}  # an output folded to a constant stays
    for t in list(g.initializer):
        if t.name not in used:
            g.initializer.remove(t)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 19:
            opset.version = 19
    return model
