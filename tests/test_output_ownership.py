"""tome-export deletes only what it wrote and recorded, and an output directory always holds the previous build or
the new one: foreign files are refused (named) or, with --force, kept; the lock never follows a link; the swap of
a rebuild survives SIGINT and SIGKILL between its two renames; stale-work clean-up never deletes a previous build.

The builds here are the 0.1.0 fixture artifacts (real, checksummed builds) copied as a build step would write them;
tests/test_output_ownership_builds.py runs the same cases through whole CLI builds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tome_export.errors import UserError
from tome_export.files import output_lock, remove_stale_workdirs, staged_output
from tome_export.manifest import MANIFEST, read_manifest, write_manifest
from tome_export.models import resolve
from tome_export.pipeline import BuildRequest, prepare

FIXTURES = Path(__file__).parent / "fixtures" / "manifests-0.1.0"
BUILD = FIXTURES / "vit_t16-tiny-onnx-fp32"  # vit_t16, onnx, fp32: the identity of REQUEST below
OTHER = FIXTURES / "vit_t16-tiny-onnxruntime-fp32"
REQUEST = dict(model="vit_t16", target="onnx", weights="random")


def _previous_build(tmp_path: Path, source: Path = BUILD, **sections) -> Path:
    """A copy of a fixture build, recorded as the build REQUEST makes (today's name of vit_t16's weights)."""
    out = tmp_path / "out"
    shutil.copytree(source, out)
    data = json.loads((out / MANIFEST).read_text())
    data["model"]["name"] = resolve("vit_t16").name
    data.update(sections)
    write_manifest(out, {k: v for k, v in data.items() if k not in ("format", "artifacts", "manifest_sha256")})
    return out


def _foreign(out: Path):
    from tome_export.ownership import survey  # imported here: each test fails alone on code without it

    return survey(out).foreign


def test_a_rebuild_refuses_a_directory_holding_a_file_it_did_not_write_and_names_it(tmp_path):
    out = _previous_build(tmp_path)
    (out / "NOTES.md").write_text("my notes")
    with pytest.raises(UserError, match=r"holds 'NOTES\.md', which tome-export did not write.*--force") as err:
        prepare(BuildRequest(output=out, **REQUEST))
    assert "\n" not in str(err.value)
    prepare(BuildRequest(output=out, force=True, **REQUEST))  # --force: allowed, the note is kept (below)
    assert (out / "NOTES.md").read_text() == "my notes"


def test_force_over_a_directory_with_someone_elses_manifest_is_refused_and_deletes_nothing(tmp_path):
    site = tmp_path / "site"
    (site / "src").mkdir(parents=True)
    (site / "manifest.json").write_text('{"name": "my-web-app", "start_url": "/"}')
    (site / "index.html").write_text("<html></html>")
    (site / "src" / "app.js").write_text("run()")
    before = sorted(str(p.relative_to(site)) for p in site.rglob("*"))
    for force in (False, True):
        with pytest.raises(UserError, match=r"holds 'index\.html', 'manifest\.json', 'src', which tome-export did "
                                            r"not write"):
            prepare(BuildRequest(output=site, force=force, **REQUEST))
    assert sorted(str(p.relative_to(site)) for p in site.rglob("*")) == before


def test_an_edited_manifest_does_not_make_the_directory_tome_exports(tmp_path):
    out = _previous_build(tmp_path)
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace('"fp32"', '"fp16"', 1))
    from tome_export.ownership import survey

    found = survey(out)
    assert found.manifest is None and "manifest.json" in found.foreign and "model.onnx" in found.foreign
    with pytest.raises(UserError, match="did not write"):
        prepare(BuildRequest(output=out, force=True, **REQUEST))


def test_the_swap_keeps_foreign_entries_of_every_kind_and_replaces_only_recorded_files(tmp_path):
    out = _previous_build(tmp_path, OTHER)  # model.onnx + manifest.json recorded
    (out / "NOTES.md").write_text("mine")
    (out / "drafts" / "deep").mkdir(parents=True)
    (out / "drafts" / "deep" / "a.txt").write_text("a")
    (out / "empty").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (out / "link").symlink_to(outside)
    os.mkfifo(out / "pipe")
    inode = (out / "NOTES.md").stat().st_ino
    with staged_output(out, _foreign) as tmp:
        shutil.copytree(BUILD, tmp, dirs_exist_ok=True)  # the new build: another model.onnx and manifest
    assert read_manifest(out)["target"] == "onnx"  # the new build, verified
    assert (out / "NOTES.md").stat().st_ino == inode and (out / "NOTES.md").read_text() == "mine"
    assert (out / "drafts" / "deep" / "a.txt").read_text() == "a" and (out / "empty").is_dir()
    assert (out / "link").is_symlink() and os.readlink(out / "link") == str(outside)
    assert (outside / "keep.txt").read_text() == "keep"  # a link is carried as a link, never followed
    assert (out / "pipe").exists() and not (out / "pipe").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "outside"]  # no work or old directory left


def test_a_foreign_file_the_new_build_would_overwrite_is_refused_and_nothing_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("the user's own graph")  # not recorded by any manifest of ours
    with pytest.raises(UserError, match=r"model\.onnx'? is not tome-export's.*nothing was replaced"):
        with staged_output(out, _foreign) as tmp:
            shutil.copytree(BUILD, tmp, dirs_exist_ok=True)
    assert (out / "model.onnx").read_text() == "the user's own graph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_lock_is_never_taken_through_a_symlink(tmp_path):
    out = tmp_path / "out"
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(UserError, match="is a symbolic link"):
        with output_lock(out):
            pass
    assert not victim.exists()
    (tmp_path / ".out.lock").unlink()
    os.mkfifo(tmp_path / ".out.lock")  # nor is a FIFO opened (it would block) or locked
    with pytest.raises(UserError, match="not a regular file"):
        with output_lock(out):
            pass


def test_sigint_between_the_two_renames_still_leaves_a_complete_build(tmp_path, monkeypatch):
    out = _previous_build(tmp_path, OTHER)
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        calls.append(dst)
        if len(calls) == 1:  # the previous build has just been moved aside
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="already replaced"):
        with staged_output(out, _foreign) as tmp:
            shutil.copytree(BUILD, tmp, dirs_exist_ok=True)
    monkeypatch.undo()
    assert len(calls) == 2 and read_manifest(out)["target"] == "onnx"  # the new build, complete


SWAP_KILLED = """
import os, shutil, signal, sys
from pathlib import Path
from tome_export.files import staged_output
real_replace = os.replace
def replace_then_die(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # between the swap's two renames
os.replace = replace_then_die
with staged_output(Path(sys.argv[1])) as tmp:
    shutil.copytree(sys.argv[2], tmp, dirs_exist_ok=True)
"""


def test_a_swap_killed_between_its_renames_is_undone_by_the_next_clean_up(tmp_path):
    out = _previous_build(tmp_path, OTHER)
    before = (out / "manifest.json").read_text()
    proc = subprocess.run([sys.executable, "-c", SWAP_KILLED, str(out), str(BUILD)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1  # the previous build, set aside
    remove_stale_workdirs(tmp_path, "out")
    assert (out / "manifest.json").read_text() == before  # put back, not deleted
    read_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_clean_up_never_follows_a_planted_link(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (tmp_path / ".out.tmp-planted").symlink_to(mine)
    (tmp_path / ".out.old-planted").symlink_to(mine)
    remove_stale_workdirs(tmp_path, "out")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_tune_output_keeps_foreign_files_only_with_force(tmp_path):
    from tome_export.tuning.request import check_output

    out = _previous_build(tmp_path, tune={"winner": "fp32 r0"})  # an earlier tune output
    (out / "NOTES.md").write_text("mine")
    with pytest.raises(UserError, match="'NOTES.md', which tome-export did not write"):
        check_output(out, force=False)
    check_output(out, force=True)
