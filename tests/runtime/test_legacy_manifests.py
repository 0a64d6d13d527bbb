"""Artifacts built by tome-export 0.1.0 (before runtime sections named their runner) still load and run."""

import json
from pathlib import Path

import numpy as np
import pytest

from tome_export.errors import UserError
from tome_export.inspection import format_report, inspect_path
from tome_export.runtime import load, open_artifact

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "manifests-0.1.0"
BUILDS = sorted(p.name for p in FIXTURES.iterdir())


def test_fixtures_are_from_before_the_runner_field():
    assert BUILDS == ["vit_t16-tiny-onnx-fp32", "vit_t16-tiny-onnxruntime-fp32", "vit_t16-tiny-openvino-fp32"]
    for name in BUILDS:
        manifest = json.loads((FIXTURES / name / "manifest.json").read_text())
        assert manifest["tool_version"] == "0.1.0" and "runner" not in manifest.get("runtime", {})


@pytest.mark.parametrize("name", BUILDS)
def test_legacy_artifacts_load_run_and_inspect(name):
    artifact = open_artifact(FIXTURES / name)  # checksums verified
    assert artifact.manifest.input.image_shape == (3, 64, 64) and artifact.manifest.num_classes == 10
    with artifact.load(threads=1) as runner:
        x = np.zeros((1, 3, 64, 64), np.float32)
        logits = runner(x)
    assert logits.shape == (1, 10) and np.isfinite(logits).all()
    text = format_report(inspect_path(FIXTURES / name))
    assert "checksums  ok" in text and ("validation onnxruntime" in text or "validation openvino" in text)


def test_legacy_artifacts_compute_the_same_model():
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    outputs = [load(FIXTURES / name, threads=1)(x) for name in BUILDS]
    assert all(np.allclose(outputs[0], out, atol=1e-4) for out in outputs[1:])


def test_a_manifest_of_another_format_names_the_version(tmp_path):
    import shutil

    copy = tmp_path / "a"
    shutil.copytree(FIXTURES / BUILDS[0], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["format"] = "tome-export/2"
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="is a tome-export/2 manifest; tome-export .* reads tome-export/1 manifests"):
        load(copy)
