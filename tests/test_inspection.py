"""tome-export inspect: build directories and bare ONNX files, as text and JSON."""

import json
import shutil
import sys
import types

import pytest

from tome_export.cli import main
from tome_export.inspection import format_report, inspect_path, tensorrt_verdict

TOKENS = [49, 33, 17, 9]  # digits_vit (65 tokens) at r=16; the last block is capped at 8


def test_inspect_build_directory_text(traced_artifact, capsys):
    directory, _ = traced_artifact
    assert main(["inspect", str(directory)]) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line and not line.startswith(" ")}
    assert "digits_vit (tome_digits_vit, timm-vit), weights random seed 0" in lines["model"]
    assert lines["r"].split(None, 1)[1] == "16 x3, 8  (capped: requested 16 x4)"
    assert lines["tokens"].split(None, 1)[1] == "65 (1 protected) -> " + " ".join(map(str, TOKENS))
    assert "GMACs vs" in lines["FLOPs"] and "2.041x fewer" in lines["FLOPs"]
    assert "onnxruntime at fp32: passed on 32 images" in lines["validation"] and "allowed 0.0001" in lines["validation"]
    assert "top-1 agreement 1.000 (95% interval 0.893-1.000)" in lines["validation"]
    assert "outputs logits [1, 10], source [1, 9, 65]" in lines["input"]
    assert "model.onnx" in text and "sha256 ok" in text and lines["checksums"].endswith("ok")
    assert "ToMe blocks 4 (block:tokens in->out) 0:65->49, 1:49->33, 2:33->17, 3:17->9" in text
    assert "ToMe merge" in text and "ScatterElements 12" in text  # 4 blocks: x*size, size, source
    assert "TensorRT" in text


def test_inspect_json_matches_the_manifest_and_the_graph(traced_artifact, capsys):
    directory, _ = traced_artifact
    assert main(["inspect", str(directory), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert report["manifest"] == manifest
    assert report["checksums"]["ok"] and report["checksums"]["files"]["model.onnx"]["status"] == "ok"
    g = report["graphs"]["model.onnx"]
    assert [b["tokens_out"] for b in g["tome_blocks"]] == TOKENS == manifest["tokens_per_block"]
    assert [b["r"] for b in g["tome_blocks"]] == manifest["r_schedule"]
    assert g["tome_match_ops"]["TopK"] > 0 and g["tome_merge_ops"]["ScatterElements"] == 12
    assert "TopK" not in g["other_ops"] and "ScatterElements" not in g["other_ops"]
    assert sum(g["ops"].values()) == g["nodes"]
    assert [o["name"] for o in g["outputs"]] == ["logits", "source"] and g["outputs"][1]["shape"] == [1, 9, 65]
    assert g["metadata"]["tome_export.r_schedule"] == str(manifest["r_schedule"])


def test_inspect_bare_onnx(traced_artifact, capsys):
    directory, _ = traced_artifact
    assert main(["inspect", str(directory / "model.onnx")]) == 0
    text = capsys.readouterr().out
    assert "manifest   none" in text and "0:65->49" in text and "r (metadata) [16, 16, 16, 8]" in text


def test_inspect_tampered_directory_reports_and_exits_1(traced_artifact, tmp_path, capsys):
    directory, _ = traced_artifact
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])  # truncated
    (copy / "notes.txt").write_text("added later")
    assert main(["inspect", str(copy)]) == 1
    out, err = capsys.readouterr()
    assert "model.onnx" in out and "sha256 modified" in out and "notes.txt not in the manifest" in out
    assert "cannot read model.onnx as ONNX" in out and "checksums  FAILED" in out
    assert err.count("\n") == 1 and "does not verify (model.onnx modified)" in err
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["num_classes"] = 11  # digits_vit has 10
    (copy / "manifest.json").write_text(json.dumps(manifest))
    report = inspect_path(copy)
    assert not report["checksums"]["manifest_unchanged"] and "manifest.json was edited" in format_report(report)


def test_tensorrt_verdict_uses_the_checker_when_there_is_one(traced_artifact, monkeypatch):
    import onnx

    model = onnx.load(str(traced_artifact[0] / "model.onnx"))
    verdict = tensorrt_verdict(model)
    assert verdict["available"] is True
    assert verdict["verdict"].startswith("compatible only with the ScatterElements plugin")  # the gather lowering
    # The report follows whatever the checker answers (a stand-in with the checker's signature).
    checker = types.ModuleType("tome_export.targets.tensorrt.compat")
    checker.tensorrt_problems = lambda m, allow_scatter_plugin=False: [] if allow_scatter_plugin else [
        n.name for n in m.graph.node if n.op_type == "ScatterElements"]
    monkeypatch.setitem(sys.modules, "tome_export.targets.tensorrt.compat", checker)
    verdict = tensorrt_verdict(model)
    assert verdict["verdict"].startswith("compatible only with the ScatterElements plugin")
    assert len(verdict["problems"]) == 12 and verdict["problems_with_scatter_plugin"] == []


@pytest.mark.parametrize("what,message", [
    ("missing", "does not exist"),
    ("empty dir", "holds no manifest.json"),
    ("bad json", "is not valid JSON"),
])
def test_inspect_bad_paths(what, message, tmp_path, capsys):
    path = tmp_path / "x"
    if what != "missing":
        path.mkdir()
    if what == "bad json":
        (path / "manifest.json").write_text("{not json")
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err
