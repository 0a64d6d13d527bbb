"""Python-backend repositories served by a real ``tritonserver`` (nvidia-pytriton's), answering over loopback.

One server for the module: an ONNX Runtime and an OpenVINO build with a dynamic batch, and a static batch-1
ONNX build written by the CLI's ``--serve triton``. Logits must equal ``tome_export.runtime.load`` of the same
artifact to 1e-5, and the server's statistics must show that requests sent together ran as one batch.
"""

from __future__ import annotations

import importlib.util
import sys
import time

import numpy as np
import pytest

from tome_export import runtime
from tome_export.images import sample_photo_paths, sample_photos
from tome_export.serve import TritonOptions, serve_artifact
from tome_testing.triton_server import REPO_ROOT, TritonServer, triton_home

HOME, WHY_NOT = triton_home()
triton_http = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (see .ci/run)")
pytestmark = pytest.mark.skipif(HOME is None, reason=WHY_NOT)

# Long enough that requests sent together always meet in the queue on a busy 2-core machine.
QUEUE_DELAY_US = 200_000
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def served(tiny_build, tmp_path_factory):
    """(server, {model name: artifact directory})."""
    from tome_export.cli import main

    root = tmp_path_factory.mktemp("triton")
    repository = root / "repository"
    models = {}
    for target in ("onnxruntime", "openvino"):
        artifact = tiny_build(target, dynamic_batch=True)
        result = serve_artifact(artifact, repository=repository,
                                options=TritonOptions(name=f"{target}_python", queue_delay_us=QUEUE_DELAY_US))
        models[result.plan.name] = artifact
    static = root / "static" / "digits_vit-onnx"
    code = main(["--model", "digits_vit", "--r", "8", "--weights", "random", "--target", "onnx", "-o", str(static),
                 "--serve", "triton", "--serve-repository", str(repository), "-q"])
    assert code == 0
    models[static.name] = static
    with TritonServer(HOME, repository, root / "server") as server:
        yield server, models


def statistics(client, model: str, at_least: int = 0, wait_s: float = 30.0) -> dict:
    """(inferences, executions, {batch size: executions}) so far.

    The server sends a response before it records that request's statistics, so a count read right after the
    last response can lag: wait (up to ``wait_s``) until ``at_least`` inferences are counted.
    """
    deadline = time.monotonic() + wait_s
    while True:
        stats = client.get_inference_statistics(model)["model_stats"][0]
        if int(stats["inference_count"]) >= at_least or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
    return {"inferences": int(stats["inference_count"]), "executions": int(stats["execution_count"]), "sizes": sizes}


@pytest.mark.parametrize("model", ["onnxruntime_python", "openvino_python"])
def test_concurrent_requests_are_batched_and_exact(served, model):
    server, models = served
    runner = runtime.load(models[model])
    images = runner.preprocess_batch(sample_photos(6))
    expected = runner(images)
    client = triton_http.InferenceServerClient(server.url, concurrency=4)
    before = statistics(client, model)
    slices = [slice(0, 1), slice(1, 3), slice(3, 4), slice(4, 6)]  # four requests of 1 or 2 images, sent together
    pending = []
    for part in slices:
        request = triton_http.InferInput("images", list(images[part].shape), "FP32")
        request.set_data_from_numpy(images[part])
        pending.append(client.async_infer(model, [request], outputs=[triton_http.InferRequestedOutput("logits")]))
    got = np.concatenate([p.get_result().as_numpy("logits") for p in pending])
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE
    after = statistics(client, model, at_least=before["inferences"] + len(images))
    assert after["inferences"] - before["inferences"] == 6
    executions = after["executions"] - before["executions"]
    batched = {size: n - before["sizes"].get(size, 0) for size, n in after["sizes"].items()}
    assert executions < len(slices), f"no two requests ran together: {batched}"
    assert any(size > 2 and n > 0 for size, n in batched.items()), batched
    client.close()


def test_static_batch_model_from_the_cli(served):
    server, models = served
    name = "digits_vit-onnx"
    runner = runtime.load(models[name])
    client = triton_http.InferenceServerClient(server.url)
    config = client.get_model_config(name)
    assert int(config.get("max_batch_size", 0)) == 0 and config["input"][0]["dims"] == [1, 3, 32, 32]
    for photo in sample_photos(2):
        x = runner.preprocess_batch([photo])
        request = triton_http.InferInput("images", list(x.shape), "FP32")
        request.set_data_from_numpy(x)
        got = client.infer(name, [request]).as_numpy("logits")
        assert np.abs(got - runner(x)).max() <= TOLERANCE
    client.close()


def test_wrong_shape_is_refused_and_the_server_keeps_serving(served):
    server, models = served
    client = triton_http.InferenceServerClient(server.url)
    bad = triton_http.InferInput("images", [1, 3, 200, 200], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 200, 200), np.float32))
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="images"):
        client.infer("onnxruntime_python", [bad])
    assert client.is_model_ready("onnxruntime_python")
    client.close()


def test_client_example_prints_the_top5(served, capsys, monkeypatch):
    server, models = served
    spec = importlib.util.spec_from_file_location("triton_client", REPO_ROOT / "examples" / "triton_client.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)  # dataclasses look their module up there
    spec.loader.exec_module(example)
    paths = sample_photo_paths()[:3]
    for model in ("openvino_python", "digits_vit-onnx"):  # dynamic batching, and one image per request
        runner = runtime.load(models[model])
        images = runner.preprocess_batch([str(p) for p in paths])
        expected = np.concatenate([runner(images[i:i + 1]) for i in range(len(paths))])
        logits = example.classify(server.url, model, paths)
        assert np.abs(logits - expected).max() <= TOLERANCE
        assert example.main(["--url", server.url, "--model", model, *map(str, paths)]) == 0
        printed = capsys.readouterr().out.splitlines()
        for line, path, row in zip(printed, paths, expected):
            classes = [int(item.split()[0]) for item in line.split(": ", 1)[1].split(", ")]
            assert line.startswith(str(path)) and classes == list(np.argsort(-row, kind="stable")[:5])
