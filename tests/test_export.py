"""Exported graphs: parity with PyTorch and the slow reference in ONNX Runtime and OpenVINO, determinism."""

import collections
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tome_export.errors import UserError
from tome_export.export import export_onnx
from tome_export.merge import bipartite_soft_matching
from tome_export.models import model_info
from tome_export.schedule import expand_schedule, resolve_schedule

from tome_testing.models import make_model, make_named
from tome_testing.reference_tome import reference_forward


def _ort(path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": np.ascontiguousarray(x)})[0]


def _openvino(path):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")
    return lambda x: compiled(np.ascontiguousarray(x))[0]


# (kind, r, impl, batch, dynamic): constant / inflect / list schedules, both lowerings, batch 1 and 3
CASES = [
    ("vit", 8, "gather", 1, True),
    ("vit", (8, -1.0), "onehot", 1, True),
    ("distilled", [4, 0, 9, 13, 2, 8, 8, 30, 1, 5, 7, 3], "gather", 3, False),
    ("registers", [4, 0, 9, 13, 2, 8, 8, 30, 1, 5, 7, 3], "onehot", 1, False),
    ("avgpool", 10, "gather", 3, False),
]


@pytest.mark.parametrize("kind,r,impl,batch,dynamic", CASES)
def test_onnxruntime_matches_pytorch_and_reference(kind, r, impl, batch, dynamic, onnx_cache, photo_cache):
    path, model = onnx_cache(kind, r, impl, batch, dynamic)
    run = _ort(path)
    info = model_info(model)
    sched = resolve_schedule(r, info.num_blocks, info.num_tokens, info.num_protected)
    for n in ([1, 3] if dynamic else [batch]):
        x = photo_cache(model, n)
        with torch.no_grad():
            eager = model(x).numpy()
        ref, _ = reference_forward(make_model(kind), x, list(sched.requested))
        got = run(x.numpy())
        assert np.abs(got - eager).max() <= 1e-4
        assert np.abs(got - ref.numpy()).max() <= 1e-4


@pytest.mark.parametrize("impl", ["gather", "onehot"])
def test_both_lowerings_export_the_same_function(impl, onnx_cache, photo_cache):
    path, model = onnx_cache("vit", 8, impl, 1, True)
    other, _ = onnx_cache("vit", 8, "onehot" if impl == "gather" else "gather", 1, True)
    x = photo_cache(model, 3).numpy()
    assert np.abs(_ort(path)(x) - _ort(other)(x)).max() <= 1e-5


def test_openvino_f32_matches_pytorch(onnx_cache, photo_cache):
    pytest.importorskip("openvino")
    for impl in ("gather", "onehot"):
        path, model = onnx_cache("vit", 8 if impl == "gather" else (8, -1.0), impl, 1, True)
        x = photo_cache(model, 3)
        with torch.no_grad():
            eager = model(x).numpy()
        assert np.abs(_openvino(path)(x.numpy()) - eager).max() <= 1e-4


def test_graph_ops_per_lowering(onnx_cache):
    gather, _ = onnx_cache("vit", 8, "gather", 1, True)
    onehot, _ = onnx_cache("vit", (8, -1.0), "onehot", 1, True)
    ops_g = collections.Counter(n.op_type for n in onnx.load(str(gather)).graph.node)
    ops_o = collections.Counter(n.op_type for n in onnx.load(str(onehot)).graph.node)
    assert ops_g["TopK"] > 0 and ops_g["ScatterElements"] == 24 and ops_g["Gather"] >= 48
    for op in ("TopK", "ArgMax", "ScatterElements", "ScatterND", "GatherElements", "NonZero", "If", "Loop"):
        assert ops_o[op] == 0, op
    for node in onnx.load(str(gather)).graph.node:
        if node.op_type == "ScatterElements":
            assert {a.name: a.s for a in node.attribute}["reduction"] == b"add"


@pytest.mark.parametrize("impl", ["gather", "onehot"])
def test_tome_nodes_are_named_by_role(impl, onnx_cache):
    from tome_export.export import tome_nodes

    r = 8 if impl == "gather" else (8, -1.0)
    path, _ = onnx_cache("vit", r, impl, 1, True)
    merging = [i for i, v in enumerate(expand_schedule(r, 12)) if v > 0]  # (8, -1) ends with r=0
    n = len(merging)
    graph = onnx.load(str(path)).graph
    roles = tome_nodes(onnx.load(str(path)))
    op = {node.name: node.op_type for node in graph.node}
    assert {name.split("/")[1] for name in roles["match"]} == {f"blocks.{i}" for i in merging}
    match_ops = collections.Counter(op[name] for name in roles["match"])
    merge_ops = collections.Counter(op[name] for name in roles["merge"])
    assert match_ops["ReduceMean"] == match_ops["ReduceL2"] == match_ops["ReduceMax"] == n
    assert merge_ops["Div"] == n  # the size-weighted average
    assert merge_ops["Log"] == n - (merging[-1] == 11)  # log-size bias, unused after the last block
    if impl == "gather":
        assert match_ops["TopK"] == 3 * n and match_ops["ArgMax"] == n
        assert merge_ops["ScatterElements"] == 2 * n and merge_ops["Gather"] >= 4 * n
    else:
        assert merge_ops["MatMul"] == 2 * n and match_ops["CumSum"] == n
        # the one-hot lowering gathers only with constant indices (static permutations, no plugin)
        constants = {t.name for t in graph.initializer}
        gathers = [node for node in graph.node if node.op_type == "Gather" and node.name.startswith("tome_")]
        assert gathers and all(node.input[1] in constants for node in gathers)
    # everything else (attention, MLP, norms) is not ToMe
    others = collections.Counter(n.op_type for n in graph.node if not n.name.startswith(("tome_match/", "tome_merge/")))
    assert others["TopK"] == others["ScatterElements"] == others["CumSum"] == others["Log"] == 0


def test_static_token_shapes(onnx_cache):
    from tome_export.export import static_shape_problems

    path, _ = onnx_cache("distilled", [4, 0, 9, 13, 2, 8, 8, 30, 1, 5, 7, 3], "gather", 3, False)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    dims = [d for v in model.graph.value_info for d in v.type.tensor_type.shape.dim]
    assert len(dims) > 1000 and all(d.HasField("dim_value") for d in dims)  # every shape is a constant
    dynamic, _ = onnx_cache("vit", 8, "gather", 1, True)
    dynamic = onnx.load(str(dynamic))
    assert static_shape_problems(dynamic, dynamic_batch=True) == []
    assert dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in dynamic.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 224, 224]


@pytest.mark.slow  # two full exports
@pytest.mark.real_export  # what the suite's export memo rests on
def test_two_exports_are_byte_identical_and_runs_bit_identical(tmp_path, photo_cache):
    from tome_export import patch

    digests = []
    for i in range(2):  # determinism is not a matter of size: the suite's tiny subject (4 blocks, 32 px)
        model = patch(make_named("digits_vit"), 8)
        export_onnx(model, tmp_path / f"{i}.onnx", (3, 32, 32))
        digests.append(hashlib.sha256((tmp_path / f"{i}.onnx").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    run = _ort(tmp_path / "0.onnx")
    x = photo_cache(model, 1).numpy()
    assert np.array_equal(run(x), run(x))
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(x)), model(torch.from_numpy(x)))


class _MergeOnly(torch.nn.Module):
    def __init__(self, r, protected, impl):
        super().__init__()
        self.r, self.protected, self.impl = r, protected, impl

    def forward(self, metric, x):
        return bipartite_soft_matching(metric, self.r, self.protected, self.impl)(x)


@pytest.mark.parametrize("impl", ["gather", "onehot"])
def test_exact_ties_resolve_identically_in_exported_graphs(tmp_path, impl):
    """All A tokens tie: the lowest A indices merge, into the lowest B index, everywhere."""
    t = 14
    metric = torch.ones(2, t, 4)
    metric[1, 6:] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # a second image with two tie groups
    x = torch.arange(2 * t, dtype=torch.float32).reshape(2, t, 1)
    module = _MergeOnly(4, 1, impl).eval()
    want = module(metric, x)
    assert want[0, :, 0].tolist() == [0, 10, 12, 1 + 2 + 4 + 6 + 8, 3, 5, 7, 9, 11, 13]
    path = tmp_path / "ties.onnx"
    program = torch.onnx.export(module, (metric, x), dynamo=True, opset_version=18, verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, [metric.numpy(), x.numpy()])))[0]
    assert np.array_equal(got, want.numpy())
    import openvino as ov

    ov_out = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})([metric.numpy(), x.numpy()])[0]
    assert np.array_equal(ov_out, want.numpy())


@pytest.mark.parametrize("impl", ["gather", "onehot"])
def test_degenerate_keys_resolve_identically_in_exported_graphs(tmp_path, impl):
    """Zero, NaN and infinite metric rows score -inf in ONNX Runtime and OpenVINO as in PyTorch; mass is kept."""
    t = 12
    metric = torch.randn(3, t, 4, generator=torch.Generator().manual_seed(0))
    metric[0, [2, 5, 8]] = 0.0
    metric[1, [4, 7]] = float("nan")
    metric[2, [2, 3, 10]] = torch.tensor([float("inf"), 1.0, 1.0, 1.0])
    x = torch.eye(t).expand(3, t, t).contiguous()
    module = _MergeOnly(5, 1, impl).eval()
    want = module(metric, x)
    assert torch.equal(want.sum(1), torch.ones(3, t))
    path = tmp_path / "degenerate.onnx"
    torch.onnx.export(module, (metric, x), dynamo=True, opset_version=18, verbose=False).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert np.array_equal(session.run(None, dict(zip(names, [metric.numpy(), x.numpy()])))[0], want.numpy())
    ov_out = _openvino_inputs(path)([metric.numpy(), x.numpy()])[0]
    assert np.array_equal(ov_out, want.numpy())


def _openvino_inputs(path):
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def test_low_opset_is_refused(tmp_path):
    with pytest.raises(UserError, match="opset"):
        export_onnx(make_model("vit"), tmp_path / "m.onnx", (3, 224, 224), opset=14)
