"""Serving an AOTInductor package: the Python-backend variant (the package has no graph file a native Triton backend
loads, so its signature comes from the manifest), checked without a server and answered by a real ``tritonserver``
where one is installed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tome_export import UserError, runtime
from tome_export.images import sample_photos
from tome_export.manifest import read_manifest
from tome_export.serve import PYTHON_MODEL, TritonOptions, serve_artifact
from tome_testing.triton_server import TritonServer, triton_home

pytestmark = pytest.mark.slow


def test_python_variant_of_a_package(aoti_cpu_build, tmp_path):
    result = serve_artifact(aoti_cpu_build, repository=tmp_path / "repo", options=TritonOptions(name="aoti"))
    model_dir = result.model_dir
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert files == ["1/artifact/manifest.json", "1/artifact/model.pt2", "1/artifact/selfcheck.npz", "1/model.py",
                     "README.md", "SHA256SUMS", "config.pbtxt"]
    read_manifest(model_dir / "1" / "artifact")  # the copy verifies against the build's checksums
    assert (model_dir / "1" / "model.py").read_text() == PYTHON_MODEL.read_text()
    plan = result.plan
    assert (plan.backend, plan.instance_kind, plan.batching.max_batch_size) == ("python", "KIND_CPU", 8)
    assert [(t.name, t.dtype, t.shape) for t in plan.inputs] == [("images", "float32", (-1, 3, 64, 64))]
    assert [(t.name, t.dtype, t.shape) for t in plan.outputs] == [("logits", "float32", (-1, 1000))]
    assert any("only logits served" in note and "source" in note for note in plan.notes)
    config = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "dims: [ 3, 64, 64 ]" in config and "dims: [ 1000 ]" in config
    readme = (model_dir / "README.md").read_text()
    assert "tome-export[aoti]" in readme and "needs tome-export and torch" in readme


def test_native_variant_and_an_uncompiled_package_are_refused(aoti_cpu_build, aoti_cuda_build, tmp_path):
    with pytest.raises(UserError, match="no native backend for --target aoti artifacts.*--variant python"):
        serve_artifact(aoti_cpu_build, repository=tmp_path, options=TritonOptions(variant="native"))
    if not read_manifest(aoti_cuda_build)["runtime"]["compiled"]:
        with pytest.raises(UserError, match="holds no compiled package yet: run `tome-export engine"):
            serve_artifact(aoti_cuda_build, repository=tmp_path)
    assert list(tmp_path.iterdir()) == []


HOME, WHY_NOT = triton_home()


@pytest.mark.skipif(HOME is None or importlib.util.find_spec("tritonclient") is None,
                    reason=WHY_NOT or "tritonclient is not installed (see .ci/run)")
def test_a_real_server_answers_what_the_runner_computes(aoti_cpu_build, tmp_path):
    import tritonclient.http as triton_http

    repository = tmp_path / "repository"
    serve_artifact(aoti_cpu_build, repository=repository, options=TritonOptions(name="aoti_python"))
    with runtime.load(aoti_cpu_build) as runner:
        images = runner.preprocess_batch(sample_photos(3))
        expected = runner(images)
    with TritonServer(HOME, repository, tmp_path / "server") as server:
        client = triton_http.InferenceServerClient(server.url)
        request = triton_http.InferInput("images", list(images.shape), "FP32")
        request.set_data_from_numpy(images)
        got = client.infer("aoti_python", [request]).as_numpy("logits")
        client.close()
    assert got.shape == (3, 1000) and np.abs(got - expected).max() <= 1e-5
