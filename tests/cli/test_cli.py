"""The tome-export command end to end, and its answers to bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tome_export.cli import main
from tome_export.manifest import read_manifest


def _run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A CLI build of the suite's tiny subject, digits_vit (4 blocks, patch 4 at 32 px, 65 tokens, 10 classes)."""
    out = tmp_path_factory.mktemp("cli") / "digits"
    code = main(["--model", "digits_vit", "--r", "8", "--weights", "random", "--output", str(out), "--quiet"])
    assert code == 0
    return out


def test_export_digits_vit(built):
    m = read_manifest(built)  # verifies every sha256
    assert sorted(p.name for p in built.iterdir()) == ["manifest.json", "model.onnx", "selfcheck.npz"]
    assert m["model"] == {"alias": "digits_vit", "source": "timm", "name": "tome_digits_vit",
                          "timm_name": "tome_digits_vit", "family": "timm-vit",
                          "weights": "random", "seed": 0, "checkpoint": None}  # no hub weights, so no pretrained tag
    assert m["r_schedule"] == [8] * 4
    assert m["tokens_per_block"] == [57, 49, 41, 33]
    assert m["merge_impl"] == "gather" and m["opset"] == 18 and m["target"] == "onnx"
    assert m["recipe"]["file"] == "onnx-fp32.yaml" and m["recipe"]["validation"]["max_abs_diff"] == 1e-4
    assert m["input"]["shape"] == [1, 3, 32, 32]
    assert m["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and m["preprocessing"]["interpolation"] == "bilinear"
    assert m["validation"]["backend"] == "onnxruntime" and m["validation"]["max_abs_diff"] <= 1e-4
    assert m["validation"]["passed"] is True and m["validation"]["images"] == 32
    low, high = m["validation"]["top1_interval_95"]
    assert m["validation"]["top1_agreement"] == 1.0 and 0.89 < low < 0.9 and high == 1.0  # 32 of 32 agree
    # MACs per block: 4 d^2 N_in + 2 N_in^2 d (attention) + 8 d^2 N_out (MLP), d=192: 122.1M at r=0 vs 89.4M here
    assert 1.35 < m["flops"]["ratio"] < 1.38
    assert set(m["artifacts"]) == {"model.onnx", "selfcheck.npz"}


@pytest.mark.slow
def test_export_dynamic_onehot_inflect(tmp_path, capsys):
    out = tmp_path / "dyn"
    code, stdout, _ = _run(["--model", "digits_vit", "--r", "8:-1", "--dynamic-batch", "--merge-impl", "onehot",
                            "--weights", "random", "--seed", "3", "--output", str(out), "-q"], capsys)
    assert code == 0, stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["input"]["shape"] == ["batch", 3, 32, 32] and m["merge_impl"] == "onehot"
    # inflect -1 over 4 blocks: r falls linearly from 2*8 to 0 (16, 10.7, 5.3, 0, truncated as the ToMe reference does)
    assert m["r"] == {"r": 8, "inflect": -1.0} and m["r_schedule"] == [16, 10, 5, 0] and m["model"]["seed"] == 3
    assert m["tokens_per_block"] == [49, 39, 34, 34]
    run = m["validation"].get("all_images", m["validation"])  # near-tie images, if any, are checked apart
    assert run["images"] == 32 and run["runs"] == 32 + 9  # sizes 1 and 3 were both run
    assert "wrote" in stdout and "GMACs" in stdout


def test_rebuilding_the_same_model_replaces_it(built, capsys):
    before = (built / "manifest.json").read_text()
    code, _, err = _run(["--model", "digits_vit", "--r", "8", "--weights", "random", "--output", str(built), "-q"],
                        capsys)
    assert code == 0, err
    assert json.loads(before)["artifacts"] == json.loads((built / "manifest.json").read_text())["artifacts"]
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


BAD = {
    "unknown model": (["--model", "vit_b17"], "unknown model 'vit_b17'"),
    "negative r": (["--model", "vit_t16", "--r", "-1"], "--r must be >= 0"),
    "r not an int": (["--model", "vit_t16", "--r", "1.5"], "cannot read --r"),
    "malformed schedule": (["--model", "vit_t16", "--r", "8,8"], "one r per block"),
    "unknown target": (["--model", "vit_t16", "--target", "coreml"], "unknown --target 'coreml'"),
    "unknown precision": (["--model", "vit_t16", "--precision", "int3"], "--precision 'int3' is not available"),
    "missing checkpoint": (["--model", "vit_t16", "--checkpoint", "/nonexistent/x.pth"], "does not exist"),
    "low opset": (["--model", "vit_t16", "--opset", "14"], "--opset 14 is too low"),
    "bad batch": (["--model", "vit_t16", "--batch", "0"], "--batch must be >= 1"),
    "no model": (["--r", "8"], "--model is required"),
    "missing recipe": (["--model", "vit_t16", "--recipe", "/nonexistent.yaml"], "does not exist"),
    "recipe contradicted": (["--model", "vit_t16", "--recipe", "RECIPE", "--precision", "int8"], "contradicts the recipe"),
    "unknown flag": (["--model", "vit_t16", "--colour"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case, capsys, tmp_path):
    args, message = BAD[case]
    if "RECIPE" in args:
        from tome_export.recipe import recipe_for
        args = [str(recipe_for("onnx", "fp32").path) if a == "RECIPE" else a for a in args]
    code, out, err = _run(args + ["--weights", "random", "--output", str(tmp_path / "o")] if "--checkpoint" not in args
                          else args + ["--output", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tome-export: error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(["--model", "vit_t16", "--weights", "random", "--output", str(blocker / "out")], capsys)
    assert code == 2 and "not a writable directory" in err


def test_output_holding_another_model(built, capsys):
    code, _, err = _run(["--model", "vit_t16", "--weights", "random", "--output", str(built)], capsys)
    assert code == 2 and "already holds artifacts of digits_vit" in err and "--force" in err
    foreign = built.parent / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = _run(["--model", "vit_t16", "--weights", "random", "--output", str(foreign)], capsys)
    assert code == 2 and "did not write" in err and (foreign / "notes.txt").exists()


@pytest.mark.slow
def test_failed_validation_exits_1_and_writes_nothing(tmp_path, capsys):
    from tome_export.recipe import recipe_for

    recipe = tmp_path / "strict.yaml"  # an edited copy of the built-in recipe: any float difference fails
    recipe.write_text(recipe_for("onnx", "fp32").path.read_text().replace("1.0e-4", "0.0"))
    out = tmp_path / "build" / "v"
    code, _, err = _run(["--model", "digits_vit", "--r", "8", "--weights", "random", "--recipe", str(recipe),
                         "--output", str(out), "-q"], capsys)
    assert code == 1 and "validation failed" in err and "differs from PyTorch" in err
    assert not out.exists() and os.listdir(tmp_path / "build") == []


def test_interrupted_build_leaves_nothing(tmp_path, capsys, monkeypatch):
    import tome_export.pipeline as build_mod

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "export_onnx", interrupt)
    code, _, err = _run(["--model", "digits_vit", "--weights", "random", "--output", str(tmp_path / "i"), "-q"], capsys)
    assert code == 130 and os.listdir(tmp_path) == []


def test_console_script_help_and_error_without_traceback(tmp_path):
    """The installed entry point itself; what it prints otherwise is main()'s, checked in-process below."""
    exe = Path(sys.executable).parent / "tome-export"
    help_run = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "examples:" in help_run.stdout and "--merge-impl" in help_run.stdout
    # an error found before the build stack loads (unknown models and the rest: test_bad_input_is_one_line_exit_2)
    bad = subprocess.run([str(exe), "--r", "8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert "--model is required" in bad.stderr


def test_list_models(capsys):
    code, listing, _ = _run(["--list-models"], capsys)
    assert code == 0 and "vit_b16" in listing and "timm-vit" in listing
    assert "tv_vit_b16" in listing and "vit_b_16.IMAGENET1K_SWAG_E2E_V1" in listing
    assert "DINOv2" in listing and "torchvision-vit" in listing
