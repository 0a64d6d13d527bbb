"""Static TensorRT compatibility check of an ONNX graph, before any engine build.

Facts from onnx-tensorrt's operator support (TensorRT 10/11) and TensorRT-RTX, limited to what can go wrong
with ViT / ToMe graphs: control flow and data-dependent shapes, TopK limits, scatter reductions (only the
ScatterElements plugin of full TensorRT implements them; TensorRT-RTX has no plugins), CumSum types, Q/DQ
zero points, ops no TensorRT parser imports. Every problem names the node, so a user can find it.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import uses_external_data

from ...graph_names import DYNAMIC_OPS

TOPK_MAX_K = 3840  # TensorRT's TopK needs K < 3840
# Ops no TensorRT ONNX parser imports (sequence types, strings, integer-only "QOperator" quantization).
UNSUPPORTED_OPS = (
    "Unique", "Compress", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SplitToSequence", "ConcatFromSequence", "StringNormalizer", "TfIdfVectorizer",
    "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear",
)
# The ScatterElements plugin (the only reducing scatter TensorRT has) takes no bfloat16 or 8-bit data.
SCATTER_PLUGIN_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64)
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _constants(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    # Tensors left in a data file are weights (small constants such as TopK's K are always stored inline).
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if not uses_external_data(t)}
    for node in model.graph.node:
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _elem_types(model: onnx.ModelProto) -> Dict[str, int]:
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph shape inference cannot handle still gets the other checks
        pass
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _label(node: onnx.NodeProto) -> str:
    return f"node {node.name or '(unnamed)'} ({node.op_type})"


def tensorrt_problems(model: onnx.ModelProto, allow_scatter_plugin: bool = False) -> List[str]:
    """Why TensorRT would reject or mis-build this graph; empty when nothing is known to be wrong.

    ``allow_scatter_plugin``: accept ScatterElements with a reduction, which full TensorRT runs as the
    ScatterElements plugin (libnvinfer_plugin); TensorRT-RTX has no plugins, so never pass it there.
    """
    constants = _constants(model)
    types = _elem_types(model)
    problems: List[str] = []
    for node in model.graph.node:
        where = _label(node)
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom-domain op {node.domain}.{op} needs a TensorRT plugin")
        elif op in DYNAMIC_OPS:
            problems.append(f"{where}: control flow / data-dependent shapes; the static ToMe graph must not contain {op}")
        elif op in UNSUPPORTED_OPS:
            problems.append(f"{where}: {op} is not imported by TensorRT's ONNX parser")
        elif op == "TopK":
            k = constants.get(node.input[1]) if len(node.input) > 1 else None
            if k is None:
                problems.append(f"{where}: K must be a constant (an initializer) for TensorRT")
            elif int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
                problems.append(f"{where}: K = {int(np.asarray(k).reshape(-1)[0])}, TensorRT needs K < {TOPK_MAX_K}")
        elif op == "ScatterElements" and _attr(node, "reduction", b"none") not in (b"none", "none"):
            reduction = _attr(node, "reduction")
            reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
            if not allow_scatter_plugin:
                problems.append(
                    f"{where}: ScatterElements with reduction={reduction} runs only as TensorRT's ScatterElements "
                    f"plugin (not in TensorRT-RTX); use --merge-impl onehot, or --scatter-plugin on --target tensorrt")
            elif types.get(node.input[0]) not in SCATTER_PLUGIN_TYPES:
                dtype = TensorProto.DataType.Name(types.get(node.input[0], 0))
                problems.append(f"{where}: the ScatterElements plugin does not take {dtype} data; use --merge-impl onehot")
        elif op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
            problems.append(f"{where}: TensorRT's ScatterND has no reductions; use --merge-impl onehot")
        elif op == "CumSum" and types.get(node.input[0]) not in (None,) + FLOAT_TYPES:
            dtype = TensorProto.DataType.Name(types[node.input[0]])
            problems.append(f"{where}: TensorRT's CumSum takes float data only, got {dtype}")
        elif op == "CumSum" and node.input[1] not in constants:
            problems.append(f"{where}: the CumSum axis must be a constant for TensorRT")
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            problems.extend(_qdq_problems(node, where, constants))
    return problems


def _qdq_problems(node: onnx.NodeProto, where: str, constants: Dict[str, np.ndarray]) -> List[str]:
    """TensorRT quantization is symmetric and signed: zero points must be 0 and of a signed type."""
    zero: Optional[np.ndarray] = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is None:
        return []
    problems = []
    if zero.dtype == np.uint8:
        problems.append(f"{where}: uint8 (asymmetric) quantization is not supported by TensorRT; quantize to int8 symmetric")
    elif np.any(zero.astype(np.float32) != 0):
        problems.append(f"{where}: zero point must be 0 (TensorRT quantization is symmetric)")
    return problems


__all__ = ["tensorrt_problems", "TOPK_MAX_K"]
