"""An artifact directory only refers to its own files: runtime.load and inspect refuse a manifest (its digest
recomputed, as a deliberate edit would) that points outside it by ``..``, an absolute path or a symlink."""

import json
import shutil
from pathlib import Path

import pytest

from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.manifest import MANIFEST, SELF_DIGEST, _self_digest, confined, dumps
from tome_export.runtime import load

FIXTURE = Path(__file__).parent.parent / "fixtures" / "manifests-0.1.0" / "vit_t16-tiny-onnxruntime-fp32"


def _rewritten(tmp_path: Path, edit) -> Path:
    """A copy of a built artifact, beside a graph outside it, with its manifest edited and its digest recomputed."""
    directory = tmp_path / "artifact"
    shutil.copytree(FIXTURE, directory)
    shutil.copyfile(FIXTURE / "model.onnx", tmp_path / "elsewhere.onnx")
    data = json.loads((directory / MANIFEST).read_text())
    edit(data, directory, tmp_path / "elsewhere.onnx")
    data[SELF_DIGEST] = _self_digest(data)
    (directory / MANIFEST).write_text(dumps(data))
    return directory


def _artifact_entry(name):
    def edit(data, directory, outside):
        rel = name(directory, outside)
        data["artifacts"] = {rel: data["artifacts"]["model.onnx"]}
        data["runtime"]["file"] = rel
    return edit


def _symlink(directory, outside):
    (directory / "linked.onnx").symlink_to(outside)
    return "linked.onnx"


EDITS = {
    "dotdot artifact": _artifact_entry(lambda d, o: "../elsewhere.onnx"),
    "absolute artifact": _artifact_entry(lambda d, o: str(o)),
    "symlink out": _artifact_entry(_symlink),
    "runtime file only": lambda data, d, o: data["runtime"].update(file="../elsewhere.onnx"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_load_and_inspect_refuse_paths_outside_the_artifact(tmp_path, capsys, case):
    directory = _rewritten(tmp_path, EDITS[case])
    for verify in (True, False):
        with pytest.raises(UserError, match="not a file inside"):
            load(directory, verify=verify)
    code = main(["inspect", str(directory)])
    captured = capsys.readouterr()
    assert code == 2 and "not a file inside" in captured.err and "sha256 ok" not in captured.out.lower()


def test_paths_inside_the_artifact_are_accepted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"x")
    (tmp_path / "link.bin").symlink_to(tmp_path / "sub" / "a.bin")
    assert confined(tmp_path, "sub/a.bin") == tmp_path / "sub" / "a.bin"
    assert confined(tmp_path, "link.bin") is not None
    for bad in ("", ".", "sub/../../x", "/etc/passwd", "C:/x", "a\\..\\..\\x", None, 3):
        assert confined(tmp_path, bad) is None
