"""``tome-export serve`` and ``--serve triton`` on a build: one step underneath, one line and exit 2 on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from tome_export.cli import main


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# A static batch-1 ONNX build from 0.1.0: the refusals below come before (or from) its manifest, so no build is needed.
STATIC = Path(__file__).resolve().parent.parent / "fixtures" / "manifests-0.1.0" / "vit_t16-tiny-onnx-fp32"


@pytest.mark.slow
def test_serve_subcommand_writes_beside_the_artifact(tiny_build, tmp_path, capsys):
    artifact = tmp_path / "builds" / "tiny"
    artifact.parent.mkdir()
    artifact.symlink_to(tiny_build("openvino", dynamic_batch=True), target_is_directory=True)
    code, out, err = _run(["serve", artifact, "--variant", "native", "--max-batch-size", "4", "--threads", "2"], capsys)
    assert code == 0, err
    model_dir = tmp_path / "builds" / "model_repository" / "tiny"
    assert out.splitlines()[0] == f"wrote {model_dir} (Triton openvino backend; max_batch_size 4, dynamic batching)"
    assert "tritonserver --model-repository" in out
    assert "warning: the build validated OpenVINO inference precision f32" in err
    config = (model_dir / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in config and '"INFERENCE_NUM_THREADS"' in config and 'string_value: "2"' in config

    code, _, err = _run(["serve", artifact], capsys)
    assert code == 2 and err.count("\n") == 1 and "already exists: pass --force" in err
    code, out, err = _run(["serve", artifact, "--force"], capsys)
    assert code == 0 and "Triton python backend" in out and err == ""


@pytest.mark.parametrize("args, message", [
    (["serve", "/nonexistent"], "is not a directory"),
    (["serve", "BUILD", "--format", "kserve"], "invalid choice: 'kserve'"),
    (["serve", "BUILD", "--variant", "cpp"], "invalid choice: 'cpp'"),
    (["serve", "BUILD", "--threads", "0"], "--threads must be an integer from 1 to 1,024"),
    (["serve", "BUILD", "--queue-delay-us", "-1"], "--queue-delay-us must be an integer from 0 to"),
    (["serve", "BUILD", "--name", "../x"], "--name '../x'"),
    (["serve", "BUILD", "--max-batch-size", "2"], "static batch of 1"),
    (["serve", "README.md"], "is not a directory"),
])
def test_serve_bad_input(args, message, tmp_path, capsys):
    args = [str(STATIC) if a == "BUILD" else a for a in args] + ["-o", tmp_path / "repo"]
    code, out, err = _run(args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "repo").exists()


def test_serve_on_a_build_refuses_before_building(tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "taken").mkdir(parents=True)
    code, _, err = _run(["--model", "digits_vit", "--weights", "random", "-o", tmp_path / "taken", "--serve", "triton",
                         "--serve-repository", repo], capsys)
    assert code == 2 and "repo/taken' already exists: pass --force" in err
    assert not (tmp_path / "taken").exists()  # nothing was built
