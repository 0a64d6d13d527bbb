"""Check TensorRT-bound graphs on the CPU: ONNX Runtime runs them against the PyTorch fp32 reference.

What ONNX Runtime's CPU provider can run, and how we run what it cannot:

* fp32, fp16: as written (for fp16 ops without a CPU kernel ORT itself computes in fp32 between casts);
* int8, fp8 Q/DQ graphs: as written, with graph optimisations off so the Q/DQ pairs are evaluated as the
  ONNX says (fake quantization; ORT has no fp8 kernels to fuse them into anyway);
* bf16: ORT's CPU provider has no bf16 arithmetic, so we run an emulation: float32 arithmetic on
  bf16-rounded weights, with every computed bf16 tensor rounded to bf16. That is what bf16 storage with
  float32 accumulation computes, not a bit-exact image of TensorRT's kernels; the manifest says so.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...manifest import InputSpec
from ...runtime.base import ArtifactIO
from ...runtime.onnxruntime import OnnxRuntimeRunner

HOW_RUN = {
    "fp32": "fp32 in ONNX Runtime (CPU)",
    "fp16": "fp16 graph in ONNX Runtime (CPU; ops without an fp16 CPU kernel computed in fp32 between casts)",
    "bf16": "bf16 emulated in ONNX Runtime (CPU has no bf16 arithmetic): fp32 arithmetic on bf16-rounded "
            "weights and activations",
    "int8": "int8 Q/DQ graph evaluated as written in ONNX Runtime (CPU, fake quantization)",
    "fp8": "fp8 E4M3 Q/DQ graph evaluated as written in ONNX Runtime (CPU, fake quantization)",
}
# Pure data movement: its output is already rounded when its input is.
_MOVES = {"Reshape", "Transpose", "Slice", "Concat", "Squeeze", "Unsqueeze", "Gather", "GatherElements",
          "Expand", "Identity", "Flatten", "Split"}


def emulate_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 graph that rounds to bf16 wherever ``model`` holds bf16 (see the module docstring)."""
    import ml_dtypes  # noqa: F401  (numpy_helper needs it for bfloat16)

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    bf16 = {v.name for v in list(g.value_info) + list(g.output) if v.type.tensor_type.elem_type == TensorProto.BFLOAT16}
    for t in g.initializer:
        if t.data_type == TensorProto.BFLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes: List[onnx.NodeProto] = []
    for original in g.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.BFLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        rounded = [o for o in node.output if o in bf16] if node.op_type not in _MOVES else []
        if node.op_type == "Cast" and rounded:
            # Cast(to=bf16) stays and is followed by a cast back to float32: the rounding happens here.
            nodes.append(node)
            out = node.output[0]
            node.output[0] = f"{out}__bf16"
            nodes.append(helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT, name=f"{node.name}/emulate"))
            continue
        for i, out in enumerate(list(node.output)):
            if out in rounded:
                node.output[i] = f"{out}__f32"
        nodes.append(node)
        for out in rounded:
            nodes.append(helper.make_node("Cast", [f"{out}__f32"], [f"{out}__bf16"], to=TensorProto.BFLOAT16,
                                          name=f"{node.name}/round/{out}"))
            nodes.append(helper.make_node("Cast", [f"{out}__bf16"], [out], to=TensorProto.FLOAT,
                                          name=f"{node.name}/unround/{out}"))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return inferred


def cpu_runner(graph: onnx.ModelProto, precision: str, io: Optional[ArtifactIO] = None,
               threads: Optional[int] = None) -> OnnxRuntimeRunner:
    """The graph in ONNX Runtime's CPU provider, run as :data:`HOW_RUN` says (``io``: the artifact it is bound
    for; default: read from the graph, for running it alone)."""
    if precision == "bf16":
        graph = emulate_bf16(graph)
    optimization = "disabled" if precision in ("int8", "fp8") else "all"
    io = io or graph_io(graph)
    io = replace(io, runtime={**io.runtime, "session_optimization": optimization})
    return OnnxRuntimeRunner(io, threads=threads, graph=graph)  # the runner serializes it, or saves it over 2 GB


def graph_io(graph: onnx.ModelProto) -> ArtifactIO:
    """The input and outputs of a bare graph, as a runner needs them (no preprocessing: arrays only)."""
    value = graph.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else "batch" for d in value.type.tensor_type.shape.dim]
    spec = InputSpec(value.name, tuple(dims), "float32", dims[0] == "batch")
    return ArtifactIO(Path("."), spec, None, tuple(o.name for o in graph.graph.output))
