"""Builds of one output directory at the same time: one complete artifact, exactly one build reports success."""

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.manifest import read_manifest
from tome_export.pipeline import BuildRequest, BuildResult, build, prepare

FIXTURES = Path(__file__).parent / "fixtures" / "manifests-0.1.0"
TINY = dict(model="digits_vit", r=4, weights="random", model_kwargs={"depth": 2})


@pytest.mark.slow
def test_a_second_build_of_one_directory_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    started, release, outcome = threading.Event(), threading.Event(), {}

    def first_log(message: str) -> None:  # the first build pauses inside its lock until the second has tried
        if not started.is_set():
            started.set()
            release.wait(120)

    def first() -> None:
        try:
            outcome["first"] = build(BuildRequest(output=out, **TINY), log=first_log)
        except BaseException as exc:  # reported by the assertion below
            outcome["first"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(120)
        with pytest.raises(UserError, match="another tome-export build is writing"):
            build(BuildRequest(output=out, **TINY))
    finally:
        release.set()
        thread.join()
    assert isinstance(outcome["first"], BuildResult), outcome["first"]
    read_manifest(out)  # complete: every checksum verifies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock file or work directory left


def test_the_lock_holds_across_processes_and_the_cli_says_so_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, pathlib; from tome_export.files import output_lock\n"
         f"with output_lock(pathlib.Path({str(out)!r})):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["--model", "digits_vit", "--weights", "random", "--output", str(out), "-q"])
    finally:
        holder.communicate("")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "another tome-export build is writing" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_output_is_checked_again_under_the_lock(tmp_path):
    out = tmp_path / "out"
    prepared = prepare(BuildRequest(output=out, **TINY))  # the directory is empty when the build is checked
    shutil.copytree(FIXTURES / "vit_t16-tiny-openvino-fp32", out)  # another build finishes meanwhile
    with pytest.raises(UserError, match="already holds artifacts"):
        build(prepared)
    assert (out / "model.xml").is_file()


def test_an_output_name_whose_work_directory_would_not_fit_is_refused_before_any_work(tmp_path, capsys):
    name = "n" * 250  # fits the file system's 255 bytes; ".<name>.tmp-XXXXXXXX" beside it does not
    code = main(["--model", "digits_vit", "--weights", "random", "--output", str(tmp_path / name), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "too long" in err and list(tmp_path.iterdir()) == []
