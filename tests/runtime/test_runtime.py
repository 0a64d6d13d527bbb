import numpy as np
import pytest

from tome_export.errors import UserError
from tome_export.images import sample_photo_paths
from tome_export.runtime import load


@pytest.fixture(scope="module")
def onnx_artifact(tiny_build):
    return tiny_build("onnx", dynamic_batch=True)  # digits_vit: 32 px, 10 classes


def test_load_and_run(onnx_artifact):
    runner = load(onnx_artifact, threads=1)
    paths = sample_photo_paths()[:3]
    batch = runner.preprocess_batch(paths)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    logits = runner(batch)
    assert logits.shape == (3, 10)
    assert np.array_equal(runner(batch[:1])[0], logits[0]) or np.abs(runner(batch[:1])[0] - logits[0]).max() < 1e-5


def test_wrong_inputs_are_clear_errors(onnx_artifact):
    runner = load(onnx_artifact)
    with pytest.raises(UserError, match="expected dtype float32"):
        runner(np.zeros((1, 3, 32, 32), np.float64))
    with pytest.raises(UserError, match=r"expected input shape \('N', 3, 32, 32\)"):
        runner(np.zeros((1, 3, 128, 128), np.float32))
    with pytest.raises(UserError, match="numpy array"):
        runner([[0.0]])


def test_tampered_artifact_is_refused(onnx_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(onnx_artifact, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="does not match its sha256"):
        load(copy)
    with pytest.raises(UserError, match="holds no manifest.json"):
        load(tmp_path)


def test_runtime_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, tome_export.runtime; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
