"""One error layer: operating-system errors and numbers out of range become one line on stderr and exit 2, checked
before any work where they can be; never a traceback."""

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tome_testing.cpu_builds import plan_with
from tome_export.cli import main
from tome_export.errors import UserError, os_error_message

EXE = Path(sys.executable).parent / "tome-export"


def _one_line_error(capsys, argv, code=2):
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags,message", [
    (["--opset", "99"], "--opset 99 is beyond"),
    (["--seed", str(2**70)], "--seed must be between 0 and 2**64 - 1"),
    (["--seed", "-1"], "--seed must be between"),
])
def test_numbers_out_of_range_are_refused_before_any_work(tmp_path, capsys, flags, message):
    err = _one_line_error(capsys, ["--model", "vit_t16", "--weights", "random", "-o", str(tmp_path / "o"), "-q", *flags])
    assert message in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target,precision,section,values,message", [
    ("onnx", "fp32", "validation", {"images": 0}, "validation.images = 0: must be between 1 and 4096"),
    ("onnx", "fp32", "validation", {"images": -3}, "validation.images = -3"),
    ("onnx", "fp32", "validation", {"max_abs_diff": float("nan")}, "max_abs_diff = nan: must be at least 0"),
    ("onnx", "fp32", "validation", {"max_abs_diff": -1.0}, "must be at least 0"),
    ("openvino", "int8", "validation", {"min_top1_agreement": 1.5}, "must be between 0 and 1"),
    ("onnxruntime", "int8", "calibration", {"batch": 0}, "calibration.batch = 0: must be between 1 and 4096"),
    ("onnxruntime", "int8", "calibration", {"images": 0}, "calibration.images = 0"),
    ("onnxruntime", "int8", "calibration", {"seed": 2**70}, "calibration.seed"),
])
def test_recipe_ranges(tmp_path, target, precision, section, values, message):
    with pytest.raises(UserError, match=message.replace("*", r"\*").replace(".", r"\.")):
        plan_with(tmp_path, target, precision, **{section: values})


def test_an_unwritable_place_is_one_line(tmp_path, capsys):
    err = _one_line_error(capsys, ["--model", "vit_t16", "--weights", "random", "-o", "/proc/tome-export-out", "-q"])
    assert "/proc" in err


def test_a_name_too_long_for_visualize_is_one_line(tmp_path, capsys):
    out = tmp_path / ("n" * 250 + ".png")  # fits 255 bytes; the temporary file beside it does not
    _one_line_error(capsys, ["visualize", "astronaut", "--model", "digits_vit", "--weights", "random", "--r", "8",
                             "-o", str(out)])
    assert list(tmp_path.iterdir()) == []


def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.slow
def test_a_write_the_disk_refuses_is_one_line_and_leaves_nothing(tmp_path):
    run = subprocess.run([str(EXE), "--model", "digits_vit", "--weights", "random", "--r", "8",  # model.onnx: 7 MB
                          "-o", str(tmp_path / "out"), "-q"], preexec_fn=_small_file_limit, capture_output=True,
                         text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    assert "File too large" in run.stderr and list(tmp_path.iterdir()) == []


def test_os_error_messages_say_what_to_do():
    full = os_error_message(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out"))
    assert full.startswith("No space left on device (/data/out)") and "free some space" in full
    assert "shorter name" in os_error_message(OSError(errno.ENAMETOOLONG, "File name too long", "x"))
