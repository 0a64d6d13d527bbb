"""fp16 / bf16 in the graph itself: the ONNX Runtime fp16 target and strongly typed TensorRT networks.

TensorRT 11 has no FP16/BF16 builder flags: every tensor's type comes from the ONNX. This converter turns
the float32 parts of a graph into float16 or bfloat16 except the nodes it is told to keep (ToMe's matching
path and merge arithmetic, by name; any op type the recipe lists), and puts a Cast at every boundary
between the two. Inputs and outputs stay float32, so callers and runners do not change.

Why not ``onnxruntime.transformers.float16.convert_float_to_float16``: it has no bfloat16; it casts the output of
every kept node to fp16 and back before the next kept node reads it, so a kept-fp32 chain (the matching path)
is still rounded to fp16 (it needed a repair pass); it emits one identical Cast per kept consumer, which ONNX
forbids (a second repair pass); after both, a ViT-Ti r=8 graph kept 517 Casts where this converter puts 85
(both built by TensorRT-RTX; in ONNX Runtime both gave the same logit cosine against fp32).
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


class _Conversion:
    """One graph's conversion: which nodes compute in the low type, and the Casts at the boundaries."""

    def __init__(self, model: onnx.ModelProto, low: int, keep_nodes: Set[str], keep_op_types: Set[str]) -> None:
        self.low, self.keep_nodes, self.keep_op_types = low, keep_nodes, keep_op_types
        self.floats = _float_tensors(model)
        self.model = onnx.ModelProto.FromString(model.SerializeToString())
        self.g = self.model.graph
        self.low_name = {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}[low]
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
        self.initializers = {t.name: t for t in self.g.initializer}
        self.new_nodes: List[onnx.NodeProto] = []
        self.casts: Dict[tuple, str] = {}  # (tensor, to) -> the cast's output, so each boundary is cast once
        self.low_tensors = self._low_tensors()

    def converted(self, node: onnx.NodeProto) -> bool:
        return (node.name not in self.keep_nodes and node.op_type not in self.keep_op_types
                and _allows(node, self.opset, self.low, self.floats))

    def _low_tensors(self) -> Set[str]:
        """The float tensors that end up in low precision: outputs of converted nodes, and initializers only
        converted nodes read (converted in place). Everything else float stays float32."""
        consumers: Dict[str, List[onnx.NodeProto]] = {}
        for node in self.g.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        low_tensors: Set[str] = set()
        for node in self.g.node:
            if self.converted(node):
                low_tensors.update(o for o in node.output if o in self.floats)
        outputs = {o.name for o in self.g.output}  # an output the exporter folded to a constant stays float32
        for name, tensor in self.initializers.items():
            readers = consumers.get(name, [])
            if tensor.data_type == FLOAT and name not in outputs and all(self.converted(n) for n in readers):
                tensor.CopyFrom(_low_tensor(tensor, self.low))
                low_tensors.add(name)
        return low_tensors

    def cast(self, name: str, to: int) -> str:
        key = (name, to)
        if key not in self.casts:
            suffix = self.low_name if to == self.low else "fp32"
            out = f"{name}__{suffix}"
            if to == self.low and name in self.initializers and self.initializers[name].data_type == FLOAT:
                # A float32 weight shared with kept nodes: store a low-precision copy instead of casting it.
                self.g.initializer.append(_low_tensor(self.initializers[name], self.low, out))
            else:
                cast = helper.make_node("Cast", [name], [out], to=to, name=f"precision/cast_{suffix}/{name}")
                self.new_nodes.append(cast)
            self.casts[key] = out
        return self.casts[key]

    def rewrite(self, original: onnx.NodeProto) -> None:
        """Append ``original`` in its new precision, after any Cast its inputs need."""
        node = onnx.NodeProto()
        node.CopyFrom(original)
        if self.converted(node):
            for i, name in enumerate(node.input):
                if name in self.floats and name not in self.low_tensors:
                    node.input[i] = self.cast(name, self.low)
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = self.low
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(_low_tensor(attr.t, self.low, attr.t.name))
        else:
            for i, name in enumerate(node.input):
                if name in self.low_tensors:
                    node.input[i] = self.cast(name, FLOAT)
        self.new_nodes.append(node)

    def restore_outputs(self) -> None:
        """Outputs keep float32: the producer writes a renamed low tensor and a final Cast restores the name."""
        for output in self.g.output:
            if output.name in self.low_tensors:
                renamed = f"{output.name}__{self.low_name}"
                for node in self.new_nodes:
                    node.output[:] = [renamed if o == output.name else o for o in node.output]
                    node.input[:] = [renamed if i == output.name else i for i in node.input]
                self.new_nodes.append(helper.make_node("Cast", [renamed], [output.name], to=FLOAT,
                                                       name=f"precision/output/{output.name}"))


def convert_float_precision(
    model: onnx.ModelProto,
    precision: str,
    keep_nodes: Iterable[str] = (),
    keep_op_types: Iterable[str] = (),
) -> onnx.ModelProto:
    """A copy of ``model`` computing in ``precision`` (fp16 | bf16) except the kept nodes, which stay float32.

    ``keep_nodes``: node names (e.g. the ToMe nodes of :func:`tome_export.quantization.protected_node_names`);
    ``keep_op_types``: op types kept wherever they are. Graph inputs and outputs keep their float32 type.
    """
    conversion = _Conversion(model, LOW_TYPES[precision], set(keep_nodes), set(keep_op_types))
    for original in conversion.g.node:
        conversion.rewrite(original)
    conversion.restore_outputs()
    g = conversion.g
    del g.node[:]
    g.node.extend(conversion.new_nodes)
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(conversion.model, check_type=True, strict_mode=True)


def weight_types(model: onnx.ModelProto) -> Dict[str, int]:
    """Number of stored constant elements per data type, e.g. ``{"float16": 5.7e6, "float32": 1e4}``."""
    counts: Dict[str, int] = {}
    for tensor in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_string(tensor.data_type).replace("TensorProto.", "").lower()
        counts[dtype] = counts.get(dtype, 0) + int(np.prod(tensor.dims, dtype=np.int64))
    return dict(sorted(counts.items()))
