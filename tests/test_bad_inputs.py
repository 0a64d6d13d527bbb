"""The bad-input catalogue of every entry point: export/build, visualize, inspect, runtime.load and runners.

Each bad input gets one line that says what to do, exit status 2, no traceback and nothing half-written.
The first export cases live in tests/cli/test_cli.py (BAD); these extend them. (`bench` is not on this branch:
its cases belong here when it lands.)
"""

import dataclasses
import json
import shutil
import sys

import numpy as np
import pytest
import timm
import torch

from tome_export import BuildOptions, build
from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.manifest import read_manifest, write_manifest
from tome_export.runtime import load


def _one_line_exit_2(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.startswith("tome-export: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return out, err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.save(timm.create_model("vit_tiny_patch16_224", depth=2, pretrained=False).state_dict(), root / "depth2.pth")
    (root / "junk.pth").write_bytes(b"this is not a checkpoint")
    torch.save([1, 2, 3], root / "list.pth")
    return root


EXPORT_BAD = {
    "unknown alias": (["--model", "deit_xs"], "unknown model 'deit_xs'"),
    "empty model name": (["--model", ""], "--model is required"),
    "EVA (RoPE)": (["--model", "eva02_tiny_patch14_224"], "rotary position embeddings"),
    "relative position bias": (["--model", "vit_relpos_small_patch16_224"], "relative position bias"),
    "not a ViT": (["--model", "resnet18"], "not a timm VisionTransformer"),
    "r not a number": (["--model", "vit_t16", "--r", "abc"], "cannot read --r"),
    "r float in a list": (["--model", "vit_t16", "--r", "8,8.5"], "cannot read --r"),
    "inflect out of range": (["--model", "vit_t16", "--r", "16:2"], "inflect in [-1, 1]"),
    "negative r in a list": (["--model", "vit_t16", "--r", ",".join(["8"] * 11 + ["-1"])], "must not hold negative"),
    "empty list item": (["--model", "vit_t16", "--r", "8,,8"], "cannot read --r"),
    "schedule too long": (["--model", "vit_t16", "--r", ",".join(["8"] * 13)], "13 entries but the model has 12"),
    "junk checkpoint": (["--model", "vit_t16", "--checkpoint", "CKPT/junk.pth"], "cannot read checkpoint"),
    "checkpoint of no tensors": (["--model", "vit_t16", "--checkpoint", "CKPT/list.pth"], "holds no state_dict"),
    "mismatched checkpoint": (["--model", "vit_t16", "--checkpoint", "CKPT/depth2.pth"], "does not match vit_t16"),
    "tiny img size": (["--model", "vit_t16", "--img-size", "8"], "--img-size must be"),
    "unknown merge impl": (["--model", "vit_t16", "--merge-impl", "fast"], "invalid choice: 'fast'"),
    "output is a file": (["--model", "vit_t16", "-o", "FILE"], "exists and is not a directory"),
}


@pytest.mark.parametrize("case", list(EXPORT_BAD))
def test_export_bad_input(case, capsys, tmp_path, checkpoints):
    args, message = EXPORT_BAD[case]
    (tmp_path / "file").write_text("x")
    args = [a.replace("CKPT", str(checkpoints)).replace("FILE", str(tmp_path / "file")) for a in args]
    if "--checkpoint" not in args:
        args += ["--weights", "random"]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out")]
    _, err = _one_line_exit_2(args, capsys)
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written, not even a temp dir


def test_bad_recipe_key(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: onnx\nprecision: fp32\nvalidation:\n  max_abs_dif: 1.0e-4\n")
    _, err = _one_line_exit_2(["--model", "vit_t16", "--recipe", str(recipe), "-o", str(tmp_path / "o")], capsys)
    assert "unknown key 'max_abs_dif'" in err and not (tmp_path / "o").exists()


def test_backend_not_installed(capsys, tmp_path, monkeypatch):
    """A target whose Python package is missing: refused before any work, with the target's install command."""
    from tome_export.targets import targets

    registry = targets()
    monkeypatch.setitem(registry, "onnx", dataclasses.replace(registry["onnx"], requires=("tome_export_no_such_backend",),
                                                              install_hint="pip install tome-export-no-such-backend"))
    _, err = _one_line_exit_2(["--model", "vit_t16", "--weights", "random", "-o", str(tmp_path / "o")], capsys)
    assert "needs the Python package 'tome_export_no_such_backend'" in err
    assert "pip install tome-export-no-such-backend" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("r,message", [(-1, "r must be >= 0"), ("16", "not '16'"), (1.5, "not 1.5"),
                                       ((16, 3.0), "inflect must be in"), ([8] * 11, "11 entries")])
def test_python_api_rejects_bad_r(r, message, tmp_path):
    with pytest.raises(UserError, match=message) as err:
        build(BuildOptions(model="vit_t16", r=r, weights="random", output=tmp_path / "o"))
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_r_capped_in_the_last_block_alone_is_recorded_without_a_warning(traced_artifact):
    directory, stderr = traced_artifact  # built with --r 16: the last block of digits_vit (17 tokens) merges only 8
    assert "warning" not in stderr  # the ToMe reference's usual trim (tests/test_first_hour.py: earlier caps warn)
    m = read_manifest(directory)
    assert m["r"] == 16 and m["r_requested"] == [16] * 4 and m["r_schedule"] == [16] * 3 + [8]
    assert m["r_capped"] is True and m["tokens_per_block"] == [49, 33, 17, 9]


# --- visualize ------------------------------------------------------------------------------------------

VISUALIZE_BAD = {  # {tmp}: the test's directory (holding text.jpg and dir/); {traced} ...: built artifacts
    "not an image": (["{tmp}/text.jpg", "--model", "vit_t16"], "is not an image PIL can read"),
    "no such image": (["nosuchphoto", "--model", "vit_t16"], "bundled photo (astronaut, chelsea"),
    "unknown picture format": (["astronaut", "--model", "vit_t16", "-o", "{tmp}/out.xyz"], "cannot tell the picture format"),
    "output dir missing": (["astronaut", "--model", "vit_t16", "-o", "{tmp}/missing/out.png"], "not a writable directory"),
    "output is a dir": (["astronaut", "--model", "vit_t16", "-o", "{tmp}/dir"], "is a directory"),
    "blocks out of range": (["astronaut", "--model", "vit_t16", "--blocks", "1,13"], "--blocks 13 is out of range"),
    "blocks malformed": (["astronaut", "--model", "vit_t16", "--blocks", "a,b"], "cannot read --blocks"),
    "no source": (["astronaut"], "one of the arguments --model --artifact is required"),
    "model and artifact": (["astronaut", "--model", "vit_t16", "--artifact", "{traced}"], "not allowed with"),
    "unknown model": (["astronaut", "--model", "vit_b17"], "unknown model 'vit_b17'"),
    "unsupported model": (["astronaut", "--model", "eva02_tiny_patch14_224"], "rotary"),
    "bad r": (["astronaut", "--model", "vit_t16", "--r", "-3"], "--r must be >= 0"),
    "bad scale": (["astronaut", "--model", "vit_t16", "--scale", "0"], "--scale must be between"),
    "artifact is not a build": (["astronaut", "--artifact", "{tmp}/dir"], "holds no manifest.json"),
    "blocks with an artifact": (["astronaut", "--artifact", "{traced}", "--blocks", "1"], "--blocks needs --model"),
    "artifact without source": (["astronaut", "--artifact", "{untraced}"], "rebuild it with --trace-source"),
    "tampered artifact": (["astronaut", "--artifact", "{tampered}"], "does not match its sha256"),
}


@pytest.fixture(scope="module")
def artifact_variants(traced_artifact, tmp_path_factory):
    directory, _ = traced_artifact
    root = tmp_path_factory.mktemp("variants")
    untraced = root / "untraced"
    shutil.copytree(directory, untraced)
    manifest = json.loads((untraced / "manifest.json").read_text())
    manifest["outputs"] = ["logits"]  # as a build without --trace-source records it
    write_manifest(untraced, {k: v for k, v in manifest.items() if k not in ("format", "artifacts", "manifest_sha256")})
    tampered = root / "tampered"
    shutil.copytree(directory, tampered)
    with open(tampered / "model.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    return {"traced": directory, "untraced": untraced, "tampered": tampered}


@pytest.mark.parametrize("case", list(VISUALIZE_BAD))
def test_visualize_bad_input(case, capsys, tmp_path, artifact_variants):
    args, message = VISUALIZE_BAD[case]
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "dir").mkdir()
    args = [a.format(tmp=tmp_path, **artifact_variants) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.png")]
    if "--model" in args:
        args += ["--weights", "random"]
    _, err = _one_line_exit_2(["visualize", *args], capsys)
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "text.jpg"]  # no picture, no temp file
    assert list((tmp_path / "dir").iterdir()) == []


# --- inspect -------------------------------------------------------------------------------------------


def test_inspect_a_file_that_is_not_onnx(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    _, err = _one_line_exit_2(["inspect", str(bad)], capsys)
    assert "cannot read model.onnx as ONNX" in err


def test_inspect_unknown_flag(tmp_path, capsys):
    _, err = _one_line_exit_2(["inspect", str(tmp_path), "--yaml"], capsys)
    assert "unrecognized arguments: --yaml" in err


# --- runtime.load and runners ------------------------------------------------------------------------------


def _truncate(d):
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 3])


def _edit_manifest(d):
    m = json.loads((d / "manifest.json").read_text())
    m["input"]["shape"] = [1, 3, 64, 64]  # still valid JSON, still every artifact's sha256
    (d / "manifest.json").write_text(json.dumps(m))


def _break_json(d):
    (d / "manifest.json").write_text((d / "manifest.json").read_text()[:-20])


def _remove_model(d):
    (d / "model.onnx").unlink()


def _foreign_target(d):  # as a manifest written before runtime sections named their runner
    m = {k: v for k, v in json.loads((d / "manifest.json").read_text()).items()
         if k not in ("format", "artifacts", "manifest_sha256", "runtime")}
    write_manifest(d, {**m, "target": "coreml"})


def _foreign_runner(d):
    m = {k: v for k, v in json.loads((d / "manifest.json").read_text()).items()
         if k not in ("format", "artifacts", "manifest_sha256")}
    write_manifest(d, {**m, "runtime": {**m["runtime"], "runner": "coreml_runtime:CoreMLRunner"}})


def _old_format(d):
    m = json.loads((d / "manifest.json").read_text())
    m["format"] = "tome-export/0"
    (d / "manifest.json").write_text(json.dumps(m))


LOAD_BAD = {
    "truncated model.onnx": (_truncate, "'model.onnx' does not match its sha256"),
    "edited manifest": (_edit_manifest, "was edited after the build"),
    "manifest not JSON": (_break_json, "is not valid JSON"),
    "missing model.onnx": (_remove_model, "'model.onnx' listed in"),
    "unknown target": (_foreign_target, "no runner for target 'coreml'"),
    "foreign runner": (_foreign_runner, "names the runner 'coreml_runtime:CoreMLRunner', which is not a tome-export"),
    "other format": (_old_format, "is a tome-export/0 manifest; tome-export .* reads tome-export/1 manifests"),
}


@pytest.mark.parametrize("case", list(LOAD_BAD))
def test_load_refuses_corrupted_or_tampered_artifacts(case, traced_artifact, tmp_path):
    damage, message = LOAD_BAD[case]
    copy = tmp_path / "a"
    shutil.copytree(traced_artifact[0], copy)
    damage(copy)
    with pytest.raises(UserError, match=message) as err:
        load(copy)
    assert "\n" not in str(err.value) and ("rebuild" in str(err.value) or "available:" in str(err.value))


def test_load_a_file_and_a_missing_backend(traced_artifact, monkeypatch):
    with pytest.raises(UserError, match="is not a directory"):
        load(traced_artifact[0] / "model.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    with pytest.raises(UserError, match="needs 'onnxruntime', which is not installed: pip install"):
        load(traced_artifact[0])


@pytest.mark.parametrize("batch,message", [
    (np.zeros((2, 3, 32, 32), np.float32), r"expected input shape \(1, 3, 32, 32\), got \(2, 3, 32, 32\) "
                                           r"\(this artifact has a static batch; rebuild with --dynamic-batch\)"),
    (np.zeros((3, 32, 32), np.float32), r"expected input shape \(1, 3, 32, 32\), got \(3, 32, 32\)"),
    (np.zeros((1, 32, 32, 3), np.float32), r"got \(1, 32, 32, 3\)"),
    (np.zeros((1, 3, 32, 32), np.float16), "expected dtype float32, got float16"),
    (np.zeros((1, 3, 32, 32), np.uint8), r"convert with batch.astype\(np.float32\)"),
    ("images.jpg", "expected a numpy array"),
])
def test_static_batch_runner_wrong_inputs(batch, message, traced_artifact):
    runner = load(traced_artifact[0])
    with pytest.raises(UserError, match=message):
        runner(batch)
    logits = runner(np.zeros((1, 3, 32, 32), np.float32))
    assert logits.shape == (1, 10) and np.isfinite(logits).all()


def test_runner_preprocess_not_an_image(traced_artifact, tmp_path):
    (tmp_path / "x.png").write_bytes(b"GIF89a-broken")
    with pytest.raises(UserError, match="is not an image PIL can read"):
        load(traced_artifact[0]).preprocess(tmp_path / "x.png")
