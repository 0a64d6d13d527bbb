"""fp16 / bf16 in the graph itself, for strongly typed TensorRT networks.

TensorRT 11 has no FP16/BF16 builder flags: every tensor's type comes from the ONNX. This converter turns
the float32 parts of a graph into float16 or bfloat16 except the nodes it is told to keep (ToMe's matching
path and merge arithmetic, by name; any op type the recipe lists), and puts a Cast at every boundary
between the two. Inputs and outputs stay float32, so callers and runners do not change.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FP16_MAX = 65504.0


def _to_low(array: np.ndarray, low: int) -> np.ndarray:
    if low == TensorProto.FLOAT16:
        finite = np.isfinite(array)
        # Out-of-range weights saturate instead of turning into inf (infinities stay infinities).
        return np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array).astype(np.float16)
    import ml_dtypes

    return array.astype(ml_dtypes.bfloat16)


def _low_tensor(tensor: TensorProto, low: int, name: Optional[str] = None) -> TensorProto:
    out = numpy_helper.from_array(_to_low(numpy_helper.to_array(tensor), low), name if name is not None else tensor.name)
    return out


def _allows(node: onnx.NodeProto, opset: int, low: int, floats: Set[str]) -> bool:
    """Whether the op's schema at this opset accepts the low type where the node has float tensors.

    (At opset 18 Conv takes no bfloat16, for one: such nodes stay float32 behind Casts.)
    """
    if node.domain not in ("", "ai.onnx"):
        return False
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    want = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}[low]
    pairs = list(zip(schema.inputs, node.input)) + list(zip(schema.outputs, node.output))
    if schema.inputs and schema.inputs[-1].option == schema.inputs[-1].option.Variadic:
        pairs += [(schema.inputs[-1], name) for name in node.input[len(schema.inputs):]]
    for formal, name in pairs:
        if name in floats and formal.type_str in allowed and want not in allowed[formal.type_str]:
            return False
    return True


def _float_tensors(model: onnx.ModelProto) -> Set[str]:
    """Names of every float32 tensor of the main graph (after type inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    names = {v.name for v in list(g.input) + list(g.output) + list(g.value_info)
             if v.type.tensor_type.elem_type == FLOAT}
    names |= {t.name for t in g.initializer if t.data_type == FLOAT}
    for node in g.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None and value.data_type == FLOAT:
                names.add(node.output[0])
    return names


def convert_float_precision(
    model: onnx.ModelProto,
    precision: str,
    keep_nodes: Iterable[str] = (),
    keep_op_types: Iterable[str] = (),
) -> onnx.ModelProto:
    """A copy of ``model`` computing in ``precision`` (fp16 | bf16) except the kept nodes, which stay float32.

    ``keep_nodes``: node names (e.g. ``tome_nodes(model)["match"] + ...["merge"]``); ``keep_op_types``:
    op types kept wherever they are. Graph inputs and outputs keep their float32 type.
    """
    low = LOW_TYPES[precision]
    keep_nodes, keep_op_types = set(keep_nodes), set(keep_op_types)
    floats = _float_tensors(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    low_name = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}[low]

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)

    def converted(node: onnx.NodeProto) -> bool:
        return node.name not in keep_nodes and node.op_type not in keep_op_types and _allows(node, opset, low, floats)

    initializers = {t.name: t for t in g.initializer}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    # Which float tensors end up in low precision: outputs of converted nodes, and initializers only
    # converted nodes read. Everything else float stays float32.
    low_tensors: Set[str] = set()
    for node in g.node:
        if converted(node):
            low_tensors.update(o for o in node.output if o in floats)
    for name, tensor in initializers.items():
        if tensor.data_type == FLOAT and all(converted(n) for n in consumers.get(name, [])):
            tensor.CopyFrom(_low_tensor(tensor, low))
            low_tensors.add(name)

    new_nodes: List[onnx.NodeProto] = []
    casts: Dict[tuple, str] = {}  # (tensor, to) -> the cast's output, so each boundary is cast once

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            suffix = low_name if to == low else "fp32"
            out = f"{name}__{suffix}"
            if to == low and name in initializers and initializers[name].data_type == FLOAT:
                # A float32 weight shared with kept nodes: store a low-precision copy instead of casting it.
                g.initializer.append(_low_tensor(initializers[name], low, out))
            else:
                new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"precision/cast_{suffix}/{name}"))
            casts[key] = out
        return casts[key]

    for original in g.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        if converted(node):
            for i, name in enumerate(node.input):
                if name in floats and name not in low_tensors:
                    node.input[i] = cast(name, low)
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = low
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(_low_tensor(attr.t, low, attr.t.name))
        else:
            for i, name in enumerate(node.input):
                if name in low_tensors:
                    node.input[i] = cast(name, FLOAT)
        new_nodes.append(node)

    # Outputs keep float32: the producer writes a renamed low tensor and a final Cast restores the name.
    for output in g.output:
        if output.name in low_tensors:
            renamed = f"{output.name}__{low_name}"
            for node in new_nodes:
                node.output[:] = [renamed if o == output.name else o for o in node.output]
                node.input[:] = [renamed if i == output.name else i for i in node.input]
            new_nodes.append(helper.make_node("Cast", [renamed], [output.name], to=FLOAT, name=f"precision/output/{output.name}"))

    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def weight_types(model: onnx.ModelProto) -> Dict[str, int]:
    """Number of stored constant elements per data type, e.g. ``{"float16": 5.7e6, "float32": 1e4}``."""
    counts: Dict[str, int] = {}
    for tensor in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_string(tensor.data_type).replace("TensorProto.", "").lower()
        counts[dtype] = counts.get(dtype, 0) + int(np.prod(tensor.dims, dtype=np.int64))
    return dict(sorted(counts.items()))
