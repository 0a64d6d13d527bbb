"""The graph rewrites of the TensorRT precisions on graphs small enough to read, with an output the exporter folded
to a constant (what a trace-source graph at r=0 holds): the int8 -> fp8 Q/DQ rewrite and the fp16/bf16
conversion both keep it, as float32."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import pytest

from tome_export.float_precision import convert_float_precision
from tome_export.targets.tensorrt.qdq import int8_qdq_to_fp8


def _graph_with_a_constant_output() -> onnx.ModelProto:
    """x -> Q/DQ (int8) -> MatMul with a Q/DQ weight -> y; and ``source``, an output the exporter folded to a
    constant (what a trace-source graph at r=0 holds)."""
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2) / 6, "w")
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    source = numpy_helper.from_array(np.eye(3, dtype=np.float32)[None], "source")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 3, 3])],
                              [weight, scale, zero, source])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp8_rewrite_folds_weights_and_keeps_a_constant_output():
    model = int8_qdq_to_fp8(_graph_with_a_constant_output())
    onnx.checker.check_model(model, full_check=True)
    names = {t.name for t in model.graph.initializer}
    assert "source" in names and "w" not in names and "wq" in names  # the weight is stored as fp8 bytes
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 1  # only the activation's is left
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[0.5, -0.25, 1.0]], np.float32)
    y, source = session.run(None, {"x": x})
    assert np.array_equal(source, np.eye(3, dtype=np.float32)[None])
    expected = x @ (np.arange(6, dtype=np.float32).reshape(3, 2) / 6)
    assert np.allclose(y, expected, atol=0.05)  # fp8 E4M3 keeps about 2 significant digits


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_float_conversion_keeps_a_constant_output_float32(precision):
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2) / 6, "w")
    source = numpy_helper.from_array(np.eye(3, dtype=np.float32)[None], "source")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 3, 3])],
                              [weight, source])
    model = convert_float_precision(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), precision)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["source"] == TensorProto.FLOAT and types["w"] != TensorProto.FLOAT  # the weight did convert
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT] * 2
