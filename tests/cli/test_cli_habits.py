"""What a deployment engineer expects of a command line: --version, --json, exit codes that tell a crash from a
failed check, progress lines in logs, a quick --help; and the Python API's answers to the reference's habits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tome_export
from tome_export.cli import INTERNAL_ERROR, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tome-export {tome_export.__version__}"
    with pytest.raises(SystemExit) as done:  # also listed in --help, as argparse's version action
        main(["--model", "vit_t16", "--version"])
    assert done.value.code == 0


def test_help_does_not_import_the_build_stack():
    code = ("import sys\nfrom tome_export.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'imported the build stack'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "examples:" in proc.stdout, proc.stderr


def test_list_models_json(capsys):
    assert main(["--list-models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"alias": "vit_b16", "source": "timm", "name": "vit_base_patch16_224.augreg_in21k_ft_in1k"} in listing[
        "aliases"]
    assert listing["families"] and listing["verified"] and listing["paper_checkpoints"]


def test_internal_error_is_exit_3_with_its_traceback(monkeypatch, capsys):
    import tome_export.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "prepare", broken)
    assert main(["--model", "vit_t16", "--weights", "random"]) == INTERNAL_ERROR == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("tome-export: internal error (RuntimeError: a bug)")


@pytest.mark.slow
def test_json_build_progress_lines_and_no_warning_for_the_default_r(tmp_path, capsys):
    """A build whose stderr is not a terminal (as in a pipe or a log) with the default r (16), which digits_vit caps
    in its last block only (17 tokens left: 8)."""
    out = tmp_path / "digits"
    code = main(["--model", "digits_vit", "--weights", "random", "-o", str(out), "--json"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["path"] == str(out) and result["manifest"]["r_schedule"] == [16, 16, 16, 8]
    lines = stderr.splitlines()
    assert lines and all(line.startswith("tome-export: ") and " done in " in line for line in lines), lines
    assert any("exporting ONNX" in line for line in lines) and "warning" not in stderr


def test_reference_habit_model_r_raises_with_the_right_call():
    model, _ = tome_export.create_model("vit_t16", weights="random", depth=2)
    tome_export.patch(model, 4)
    assert model.r == (4, 4)
    with pytest.raises(AttributeError, match=r"tome_export.patch\(model, 16\)"):
        model.r = 16
    assert model.r == (4, 4)


def test_create_model_reads_timm_pretrained_flag_and_says_what_was_wrong():
    model, spec = tome_export.create_model("vit_t16", pretrained=False, depth=1)
    assert spec.weights == "random"
    with pytest.raises(tome_export.UserError, match="unexpected keyword argument 'no_such_argument'") as err:
        tome_export.create_model("vit_t16", weights="pretrained", no_such_argument=1)
    assert "Offline" not in str(err.value)
