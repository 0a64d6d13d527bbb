"""Whole builds (a 2-block digits_vit, ONNX Runtime int8): a rebuild never deletes what tome-export did not write,
--force keeps and lists it, and an option the recipe ignores (--calib-data with dynamic int8) is recorded in the
manifest and said, not silently dropped."""

import pytest
from PIL import Image

from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.manifest import read_manifest
from tome_export.pipeline import BuildRequest, build
from tome_testing.cpu_builds import trimmed_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    """(request, output, warnings): an int8 build given --calib-data, which dynamic quantization never reads."""
    root = tmp_path_factory.mktemp("owned")
    photos = root / "photos"
    photos.mkdir()
    Image.new("RGB", (48, 40), "teal").save(photos / "a.png")
    request = BuildRequest(model="digits_vit", r=4, weights="random", model_kwargs={"depth": 2}, target="onnxruntime",
                           precision="int8", output=root / "out", recipe=trimmed_recipe("onnxruntime", "int8", root),
                           target_options={"calib_data": str(photos)})
    warnings = []
    build(request, warn=warnings.append)
    return request, root / "out", warnings


def test_an_ignored_calib_data_is_recorded_and_said(int8_build):
    _, out, warnings = int8_build
    notes = read_manifest(out)["notes"]
    assert any(n.startswith("--calib-data") and "was not used" in n and "does not calibrate" in n for n in notes)
    assert any("--calib-data" in w and "was not used" in w for w in warnings)


def test_a_rebuild_keeps_what_tome_export_did_not_write(int8_build, capsys):
    request, out, _ = int8_build
    (out / "NOTES.md").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "run1.csv").write_text("1,2,3")
    with pytest.raises(UserError, match=r"holds 'NOTES\.md', 'eval', which tome-export did not write"):
        build(request)
    code = main(["--model", "digits_vit", "--r", "4", "--weights", "random", "--target", "onnxruntime", "--precision",
                 "int8", "--recipe", str(request.recipe), "-o", str(out), "--force", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "kept       NOTES.md (not tome-export's: left in place)" in captured.out
    assert "kept       eval (not tome-export's: left in place)" in captured.out
    assert (out / "NOTES.md").read_text() == "my notes" and (out / "eval" / "run1.csv").read_text() == "1,2,3"
    manifest = read_manifest(out)  # the new build (all 4 blocks this time), complete and verified
    assert len(manifest["r_schedule"]) == 4 and "NOTES.md" not in manifest["artifacts"]
