"""The generated Python-backend model answers client mistakes as client errors (HTTP 400), checks a request's
claimed shape against the artifact's before it reads the data, and keeps serving afterwards. A real ``tritonserver``
(nvidia-pytriton's) serves the 0.1.0 ONNX Runtime fixture with its config edited to pass any shape through, as an
operator might edit it, so that the model itself meets the mistakes Triton's core would otherwise catch.
"""

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tome_export.serve import serve_artifact
from tome_testing.triton_server import TritonServer, triton_home

HOME, WHY_NOT = triton_home()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(HOME is None, reason=WHY_NOT)]
ORT = Path(__file__).resolve().parent.parent / "fixtures" / "manifests-0.1.0" / "vit_t16-tiny-onnxruntime-fp32"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("client-errors")
    result = serve_artifact(ORT, repository=root / "repository")
    config = result.model_dir / "config.pbtxt"
    config.write_text(re.sub(r"dims: \[ 1, 3, 64, 64 \]", "dims: [ -1, -1, -1, -1 ]", config.read_text()))
    with TritonServer(HOME, root / "repository", root / "server") as running:
        yield running, result.plan.name


def _infer(server, name: str, array: np.ndarray):
    """POST one binary-encoded FP32 request; (HTTP status, parsed JSON answer)."""
    header = json.dumps({"inputs": [{"name": "images", "shape": list(array.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": array.nbytes}}],
                         "outputs": [{"name": "logits"}]}).encode()
    request = urllib.request.Request(f"http://{server.url}/v2/models/{name}/infer", method="POST",
                                     data=header + array.astype(np.float32).tobytes(),
                                     headers={"Inference-Header-Content-Length": str(len(header))})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("shape,why", [((1, 3, 64, 65), "a wrong image size"), ((2, 3, 64, 64), "a larger batch"),
                                       ((1, 4, 64, 64), "another channel count")])
def test_a_client_mistake_is_a_client_error_and_the_model_keeps_serving(server, shape, why):
    running, name = server
    status, answer = _infer(running, name, np.zeros(shape, np.float32))
    assert status == 400, (why, status, answer)
    assert "this model takes [N, 3, 64, 64] with N from 1 to 1" in answer["error"], answer
    status, answer = _infer(running, name, np.zeros((1, 3, 64, 64), np.float32))
    assert status == 200 and np.isfinite(answer["outputs"][0]["data"]).all()
    assert running.process.poll() is None
