"""ONNX files with external data (the layout of models over 2 GB), on small graphs: the threshold is lowered so
a few kilobytes of weights take the path a 2 GB model takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tome_export import onnx_files
from tome_export.errors import UserError
from tome_export.manifest import InputSpec
from tome_export.runtime.base import ArtifactIO
from tome_export.runtime.onnxruntime import OnnxRuntimeRunner

SHAPE = (1, 1, 4, 32)  # runners take image-like (N, C, H, W) batches


def _graph(seed: int = 0) -> onnx.ModelProto:
    weights = np.random.default_rng(seed).standard_normal((32, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["hidden"], name="matmul"),
             helper.make_node("Relu", ["hidden"], ["logits"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, SHAPE)],
                              [numpy_helper.from_array(weights, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _expected(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ numpy_helper.to_array(model.graph.initializer[0]), 0)


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 4096)


def _io(directory: Path) -> ArtifactIO:
    return ArtifactIO(directory, InputSpec("x", SHAPE), None, ("logits",), {"file": "model.onnx"})


def test_small_graphs_stay_one_file(tmp_path):
    onnx_files.save_onnx(_graph(), tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert onnx_files.data_files(tmp_path / "model.onnx") == []


def test_over_the_limit_the_weights_go_to_one_data_file_beside_the_graph(tmp_path, small_limit):
    model = _graph()
    expected = _expected(model, np.ones(SHAPE, np.float32))
    onnx_files.save_onnx(model, tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert onnx_files.data_files(tmp_path / "model.onnx") == [tmp_path / "model.onnx.data"]
    assert (tmp_path / "model.onnx").stat().st_size < 1024 < (tmp_path / "model.onnx.data").stat().st_size
    assert (tmp_path / "model.onnx.data").stat().st_mode == (tmp_path / "model.onnx").stat().st_mode
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": np.ones(SHAPE, np.float32)})[0], expected, rtol=1e-5)


def test_saving_again_replaces_the_data_file(tmp_path, small_limit):
    onnx_files.save_onnx(_graph(0), tmp_path / "model.onnx")
    size = (tmp_path / "model.onnx.data").stat().st_size
    second = _graph(1)
    expected = _expected(second, np.ones(SHAPE, np.float32))
    onnx_files.save_onnx(second, tmp_path / "model.onnx")  # onnx appends to an existing data file
    assert (tmp_path / "model.onnx.data").stat().st_size == size
    reloaded = onnx.load(str(tmp_path / "model.onnx"))
    np.testing.assert_allclose(_expected(reloaded, np.ones(SHAPE, np.float32)), expected)


def test_move_and_copy_take_the_data_file_along(tmp_path, small_limit):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    onnx_files.save_onnx(_graph(), tmp_path / "a" / "model.onnx")
    onnx_files.copy_onnx(tmp_path / "a" / "model.onnx", tmp_path / "b" / "copy.onnx")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["copy.onnx", "copy.onnx.data"]
    onnx_files.copy_onnx(tmp_path / "a" / "model.onnx", tmp_path / "a" / "beside.onnx")  # never onto its source
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["beside.onnx", "beside.onnx.data", "model.onnx",
                                                                  "model.onnx.data"]
    onnx_files.move_onnx(tmp_path / "a" / "model.onnx", tmp_path / "moved.onnx")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["beside.onnx", "beside.onnx.data"]
    expected = _expected(_graph(), np.ones(SHAPE, np.float32))
    for path in (tmp_path / "moved.onnx", tmp_path / "a" / "beside.onnx", tmp_path / "b" / "copy.onnx"):
        np.testing.assert_allclose(_expected(onnx.load(str(path)), np.ones(SHAPE, np.float32)), expected)


def test_runner_reads_extra_outputs_of_a_graph_with_external_data(tmp_path, small_limit):
    model = _graph()
    x = np.ones(SHAPE, np.float32)
    hidden = x @ numpy_helper.to_array(model.graph.initializer[0])
    onnx_files.save_onnx(model, tmp_path / "model.onnx")
    with OnnxRuntimeRunner(_io(tmp_path), extra_outputs=["hidden"]) as runner:
        out = runner.infer(x, ["logits", "hidden"])
    np.testing.assert_allclose(out["hidden"], hidden, rtol=1e-5)
    np.testing.assert_allclose(out["logits"], np.maximum(hidden, 0), rtol=1e-5)


@pytest.mark.parametrize("location", ["../outside.data", "/tmp/outside.data", "link.data"])
def test_a_data_file_outside_the_artifact_directory_is_refused(tmp_path, small_limit, location):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    onnx_files.save_onnx(_graph(), artifact / "model.onnx")
    (artifact / "model.onnx.data").rename(tmp_path / "outside.data")
    if location == "link.data":
        (artifact / "link.data").symlink_to(tmp_path / "outside.data")
    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(artifact / "model.onnx"))
    for extra in ((), ["hidden"]):
        with pytest.raises(UserError, match="not a file inside"):
            OnnxRuntimeRunner(_io(artifact), extra_outputs=extra)


def test_runner_runs_an_in_memory_graph_over_the_limit_from_a_file(tmp_path, small_limit):
    model = _graph()
    x = np.ones(SHAPE, np.float32)
    runner = OnnxRuntimeRunner(_io(tmp_path), graph=model)
    scratch = Path(runner.scratch.name)
    assert sorted(p.name for p in scratch.iterdir()) == ["model.onnx", "model.onnx.data"]
    np.testing.assert_allclose(runner(x), _expected(model, x), rtol=1e-5)
    runner.close()
    assert not scratch.exists()
    assert model.graph.initializer[0].HasField("raw_data")  # the caller's graph keeps its weights
