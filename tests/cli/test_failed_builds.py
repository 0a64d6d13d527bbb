"""Failures you can look at: thresholds set on the command line, --keep-failed, the failure report on --json."""

import contextlib
import io
import json
from types import SimpleNamespace

import pytest

from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.manifest import read_manifest
from tome_export.runtime import load

TINY = ["--model", "digits_vit", "--r", "1", "--weights", "random", "--target", "onnxruntime", "-q"]


def _one_line_exit_2(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("flag,value,message", [("--min-cosine", "2", "--min-cosine 2.0: must be between -1 and 1"),
                                                ("--max-abs-diff", "-1", "--max-abs-diff -1.0: must be at least 0"),
                                                ("--min-top1-agreement", "nan", "--min-top1-agreement nan: must be")])
def test_threshold_flags_out_of_range_are_one_line(flag, value, message, tmp_path, capsys):
    args = TINY + [flag, value, "-o", str(tmp_path / "o")]
    assert message in _one_line_exit_2(args, capsys)
    assert not (tmp_path / "o").exists()


def test_keep_failed_must_not_be_the_output(tmp_path, capsys):
    args = TINY + ["-o", str(tmp_path / "o"), "--keep-failed", str(tmp_path / "o")]
    assert "--keep-failed" in _one_line_exit_2(args, capsys) and not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    """A build whose fp32 logits cannot meet --max-abs-diff 1e-12, kept with --keep-failed, reported on --json."""
    root = tmp_path_factory.mktemp("failed")
    args = TINY + ["--max-abs-diff", "1e-12", "--keep-failed", str(root / "kept"), "-o", str(root / "out"), "--json"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return root, SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.slow
def test_failed_build_reports_and_keeps_what_it_made(failed):
    root, proc = failed
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("tome-export: validation failed:") and "max_abs_diff" in err
    assert f"kept in {root / 'kept'}" in err and "--max-abs-diff set the threshold without editing the recipe" in err
    report = json.loads(proc.stdout)
    assert report["path"] is None and report["failed"]["kept"] == str(root / "kept")
    assert report["failed"]["report"]["missed"] == ["max_abs_diff"]
    assert report["failed"]["report"]["thresholds"] == {"max_abs_diff": 1e-12}
    assert report["failed"]["report"]["max_abs_diff"] > 1e-12 and report["failed"]["report"]["passed"] is False
    assert not (root / "out").exists()
    kept = root / "kept"
    m = read_manifest(kept)  # complete and checksummed, the fp32 export included
    assert {"model.onnx", "exported-fp32/model.onnx"} <= set(m["artifacts"])
    assert m["failed"]["output"] == str(root / "out") and "max_abs_diff" in m["failed"]["reason"]
    assert m["validation"]["passed"] is False and m["recipe"]["validation"]["max_abs_diff"] == 1e-12
    assert any("set on the command line: max_abs_diff 1e-12 (recipe: 0.0001)" in n for n in m["notes"])


@pytest.mark.slow
def test_a_kept_failed_build_is_inspectable_and_never_loads(failed, capsys):
    kept = failed[0] / "kept"
    assert main(["inspect", str(kept)]) == 0
    out = capsys.readouterr().out
    assert "FAILED     validation failed; kept for inspection only" in out and "checksums  ok" in out
    for attempt in (lambda: load(kept), lambda: load(kept, verify=False)):
        with pytest.raises(UserError, match="FAILED validation, kept for inspection"):
            attempt()
    assert main(["serve", str(kept), "-o", str(failed[0] / "repo")]) == 2
    assert "FAILED validation" in capsys.readouterr().err
    assert main(["verify", str(kept)]) == 2


@pytest.mark.slow
def test_without_keep_failed_the_message_says_how_to_keep_it(tmp_path, capsys):
    assert main(TINY + ["--max-abs-diff", "1e-12", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "--keep-failed DIR keeps the failed build to look at" in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_looser_threshold_on_the_command_line_is_recorded(tmp_path):
    out = tmp_path / "o"
    assert main(TINY + ["--max-abs-diff", "0.5", "-o", str(out)]) == 0
    m = read_manifest(out)
    assert m["validation"]["thresholds"] == {"max_abs_diff": 0.5} and m["self_check"]["thresholds"] == {
        "max_abs_diff": 0.5}
    assert "validation thresholds set on the command line: max_abs_diff 0.5 (recipe: 0.0001)" in m["notes"]
