"""Builds killed mid-way (SIGKILL, SIGTERM) never leave a directory that looks complete."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tome_export.errors import UserError
from tome_export.manifest import read_manifest
from tome_export.files import _locked_workdir, remove_stale_workdirs as _remove_stale_workdirs
from tome_export.runtime import load

EXE = Path(sys.executable).parent / "tome-export"


def _start_build(out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(EXE), "--model", "digits_vit", "--r", "8", "--weights", "random", "-o", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the build ended before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "the build never reached the point to interrupt"
        time.sleep(0.05)


def _work_dirs(parent: Path, name: str):
    return sorted(parent.glob(f".{name}.tmp-*"))


@pytest.mark.parametrize("moment", ["exporting", "validating"])
def test_sigkill_leaves_nothing_that_looks_like_a_build(moment, tmp_path, traced_artifact):
    out = tmp_path / "digits_vit"
    if moment == "validating":  # the previous complete build of the same model (at r=16) must survive
        shutil.copytree(traced_artifact[0], out)
        before = (out / "manifest.json").read_text()
    proc = _start_build(out)
    if moment == "exporting":
        _wait_for(proc, lambda: _work_dirs(tmp_path, out.name))
        time.sleep(0.5)
    else:  # the ONNX file is written and the build is checking it in ONNX Runtime
        _wait_for(proc, lambda: any((d / "model.onnx").exists() for d in _work_dirs(tmp_path, out.name)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = _work_dirs(tmp_path, out.name)
    assert len(leftovers) == 1 and not (leftovers[0] / "manifest.json").exists()
    lock = f".{out.name}.lock"  # unlocked once its process died; the next build takes it over and removes it
    expected = [leftovers[0].name, lock] + ([out.name] if moment == "validating" else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    if moment == "exporting":
        assert not out.exists()
        with pytest.raises(UserError):
            load(out)
    else:
        assert (out / "manifest.json").read_text() == before
        read_manifest(out, verify=True)  # still the previous build, intact
    # The next build of that output removes the stale work directory (here it stops right after).
    import tome_export.pipeline as pipeline
    from tome_export import BuildOptions

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    original = pipeline.export_onnx
    pipeline.export_onnx = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline.build(BuildOptions(model="digits_vit", r=8, weights="random", output=out))
    finally:
        pipeline.export_onnx = original
    assert _work_dirs(tmp_path, out.name) == [] and not (tmp_path / lock).exists()


@pytest.mark.slow  # a real build process, stopped once it has started
def test_sigterm_cleans_up_and_says_so(tmp_path):
    out = tmp_path / "digits_vit"
    proc = _start_build(out)
    _wait_for(proc, lambda: _work_dirs(tmp_path, out.name))
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == "tome-export: interrupted; nothing was written", err
    assert list(tmp_path.iterdir()) == []


def test_only_unlocked_work_directories_are_stale(tmp_path):
    live, fd = _locked_workdir(tmp_path, ".out.tmp-")
    (live / "model.onnx").write_text("being written")
    dead = tmp_path / ".out.tmp-dead"
    dead.mkdir()
    old = tmp_path / ".out.old-dead"
    (old / "out").mkdir(parents=True)
    others = [tmp_path / ".other.tmp-x", tmp_path / "out", tmp_path / ".out.tmpx"]
    for d in others:
        d.mkdir()
    try:
        _remove_stale_workdirs(tmp_path, "out")
        assert live.is_dir() and not dead.exists() and not old.exists()  # a build in progress is left alone
        assert all(d.is_dir() for d in others)
    finally:
        os.close(fd)
    _remove_stale_workdirs(tmp_path, "out")
    assert not live.exists() and all(d.is_dir() for d in others)
