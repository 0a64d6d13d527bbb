"""The static TensorRT compatibility check, on small hand-made graphs and on real ToMe exports."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tome_export.targets.tensorrt.compat import tensorrt_problems



def _graph(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return model


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _scatter_add(reduction="add"):
    nodes = [helper.make_node("ScatterElements", ["x", "idx", "upd"], ["y"], axis=1, reduction=reduction,
                              name="tome_merge/blocks.0/node_scatter_add")]
    idx = numpy_helper.from_array(np.array([[0, 0]], np.int64), "idx")
    upd = numpy_helper.from_array(np.ones((1, 2), np.float32), "upd")
    return _graph(nodes, [_f("x", [1, 4])], [_f("y", [1, 4])], [idx, upd])


def _topk(k=None, k_input=False):
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, name="tome_match/blocks.0/node_topk")]
    inputs = [_f("x", [1, 5000])]
    inits = []
    if k_input:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    else:
        inits.append(numpy_helper.from_array(np.array([k], np.int64), "k"))
    outputs = [_f("v", [1, None]), helper.make_tensor_value_info("i", TensorProto.INT64, [1, None])]
    return _graph(nodes, inputs, outputs, inits)


def test_reducing_scatter_is_rejected_unless_the_plugin_is_chosen():
    model = _scatter_add()
    problems = tensorrt_problems(model)
    assert len(problems) == 1
    assert "tome_merge/blocks.0/node_scatter_add" in problems[0] and "reduction=add" in problems[0]
    assert tensorrt_problems(model, allow_scatter_plugin=True) == []
    assert tensorrt_problems(_scatter_add("none")) == []


def test_tensorrt_rtx_parser_agrees_on_reducing_scatter():
    """The claim behind the check: NVIDIA's own parser (TensorRT-RTX, no plugins) refuses the graph."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12/-cu13 is not installed")
    logger = trt.Logger(trt.Logger.ERROR)
    for model, accepted in ((_scatter_add(), False), (_scatter_add("none"), True)):
        network = trt.Builder(logger).create_network(0)
        parser = trt.OnnxParser(network, logger)
        assert parser.parse(model.SerializeToString()) is accepted


def test_topk_limits():
    assert tensorrt_problems(_topk(k=3839)) == []
    big = tensorrt_problems(_topk(k=3840))
    assert len(big) == 1 and "tome_match/blocks.0/node_topk" in big[0] and "K < 3840" in big[0]
    dynamic = tensorrt_problems(_topk(k_input=True))
    assert len(dynamic) == 1 and "must be a constant" in dynamic[0]


def test_control_flow_custom_ops_and_types():
    nonzero = _graph([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [_f("x", [4])],
                     [helper.make_tensor_value_info("y", TensorProto.INT64, [1, None])])
    assert tensorrt_problems(nonzero) == ["node nz (NonZero): control flow / data-dependent shapes; the static "
                                          "ToMe graph must not contain NonZero"]
    custom = _graph([helper.make_node("FusedGelu", ["x"], ["y"], domain="com.microsoft", name="g")],
                    [_f("x", [4])], [_f("y", [4])])
    assert "custom-domain op com.microsoft.FusedGelu" in tensorrt_problems(custom)[0]
    axis = numpy_helper.from_array(np.array(0, np.int64), "axis")
    int_cumsum = _graph([helper.make_node("CumSum", ["x", "axis"], ["y"], name="cs")],
                        [helper.make_tensor_value_info("x", TensorProto.INT64, [4])],
                        [helper.make_tensor_value_info("y", TensorProto.INT64, [4])], [axis])
    assert "float data only, got INT64" in tensorrt_problems(int_cumsum)[0]
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    for zero, message in ((np.array(3, np.int8), "zero point must be 0"), (np.array(0, np.uint8), "uint8")):
        q = _graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="q")], [_f("x", [4])],
                   [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(zero.dtype), [4])],
                   [scale, numpy_helper.from_array(zero, "z")])
        assert message in tensorrt_problems(q)[0]


def test_real_exports(onnx_cache):
    """The gather lowering needs the plugin (one problem per scatter-add, each naming its node); onehot is clean."""
    gather, _ = onnx_cache("digits", 8, "gather", 1, True)  # digits_vit: which ops, not the size, matter here
    problems = tensorrt_problems(onnx.load(str(gather)))
    scatters = [n.name for n in onnx.load(str(gather)).graph.node if n.op_type == "ScatterElements"]
    assert len(problems) == len(scatters) > 0
    assert all(name in p for name, p in zip(scatters, problems))
    assert tensorrt_problems(onnx.load(str(gather)), allow_scatter_plugin=True) == []
    onehot, _ = onnx_cache("digits", 8, "onehot", 1, True)
    assert tensorrt_problems(onnx.load(str(onehot))) == []
