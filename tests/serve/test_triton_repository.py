"""Triton model repositories from real builds, checked without a server: layout, checksums, strict config
parsing against Triton's ModelConfig schema, names and dims against the graph, refusals, all-or-nothing writes."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import onnx
import pytest

from tome_export import UserError
from tome_export.manifest import load_manifest, read_manifest
from tome_export.preprocess import Preprocessing
from tome_export.serve import PYTHON_MODEL, TritonOptions, serve_artifact
from tome_export.serve.triton import DEFAULT_MAX_BATCH, plan_model, preprocessing_from_parameters, quote
from tome_testing.triton_server import model_config_schema, parse_model_config

# A static batch-1 ONNX build from 0.1.0, for the refusals and writes that do not depend on the manifest's version
STATIC = Path(__file__).resolve().parent.parent / "fixtures" / "manifests-0.1.0" / "vit_t16-tiny-onnx-fp32"
needs_schema = pytest.mark.skipif(model_config_schema() is None,
                                  reason="tritonclient is not installed (its model_config_pb2 is the schema)")


def graph_io(path: Path):
    """{name: (dtype, dims)} of an ONNX graph's inputs and outputs, read independently of tome_export.serve."""
    model = onnx.load(str(path), load_external_data=False)
    dims = lambda v: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in [*model.graph.input, *model.graph.output]}


def data_type(config, value: int) -> str:
    return config.DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number[value].name


def read_sums(model_dir: Path):
    lines = (model_dir / "SHA256SUMS").read_text().splitlines()
    return {rel: digest for digest, rel in (line.split("  ", 1) for line in lines)}


@needs_schema
def test_python_variant_of_a_dynamic_onnxruntime_build(tiny_build, tmp_path):
    artifact = tiny_build("onnxruntime", dynamic_batch=True)
    result = serve_artifact(artifact, repository=tmp_path / "repo")
    model_dir = tmp_path / "repo" / artifact.name
    assert result.model_dir == model_dir and result.plan.variant == "python"
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    assert files == ["1/artifact/manifest.json", "1/artifact/model.onnx", "1/artifact/selfcheck.npz", "1/model.py",
                     "README.md", "SHA256SUMS", "config.pbtxt"]
    sums = read_sums(model_dir)
    assert sums == {rel: hashlib.sha256((model_dir / rel).read_bytes()).hexdigest() for rel in files if rel != "SHA256SUMS"}
    read_manifest(model_dir / "1" / "artifact")  # the copy verifies against the build's checksums
    assert (model_dir / "1" / "model.py").read_text() == PYTHON_MODEL.read_text()

    config = parse_model_config((model_dir / "config.pbtxt").read_text())
    io = graph_io(artifact / "model.onnx")
    assert config.name == artifact.name and config.backend == "python"
    assert config.max_batch_size == DEFAULT_MAX_BATCH and config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert [(t.name, list(t.dims)) for t in config.input] == [("images", io["images"][1][1:])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", io["logits"][1][1:])]
    assert io["images"][1][0] == -1 and data_type(config, config.input[0].data_type) == "TYPE_FP32"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert preprocessing_from_parameters(params) == Preprocessing.from_dict(read_manifest(artifact)["preprocessing"])
    readme = (model_dir / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "preprocessing_from_parameters" in readme


@needs_schema
def test_native_configs_name_the_graph(tiny_build, tmp_path):
    ort, ov = tiny_build("onnxruntime", dynamic_batch=True), tiny_build("openvino", dynamic_batch=True)
    static = tiny_build("onnx")
    native = TritonOptions(variant="native")
    for artifact in (ort, ov, static):
        serve_artifact(artifact, repository=tmp_path, options=native)
    parsed = {a: parse_model_config((tmp_path / a.name / "config.pbtxt").read_text()) for a in (ort, ov, static)}

    c = parsed[ort]
    assert (c.backend, c.platform, c.default_model_filename) == ("onnxruntime", "onnxruntime_onnx", "model.onnx")
    assert not c.HasField("optimization")  # session level 'all': the backend's default, ORT_ENABLE_ALL
    assert (tmp_path / ort.name / "1" / "model.onnx").read_bytes() == (ort / "model.onnx").read_bytes()
    assert read_sums(tmp_path / ort.name)["manifest.json"] == hashlib.sha256((ort / "manifest.json").read_bytes()).hexdigest()

    c = parsed[static]
    io = graph_io(static / "model.onnx")
    assert c.max_batch_size == 0 and not c.HasField("dynamic_batching")
    assert [list(t.dims) for t in c.input] == [io["images"][1]] == [[1, 3, 32, 32]]  # digits_vit
    assert [list(t.dims) for t in c.output] == [io["logits"][1]]
    assert "static batch of 1" in (tmp_path / static.name / "config.pbtxt").read_text()

    c = parsed[ov]
    params = {k: v.string_value for k, v in c.parameters.items()}
    assert (c.backend, c.default_model_filename) == ("openvino", "model.xml")
    assert sorted(p.name for p in (tmp_path / ov.name / "1").iterdir()) == ["model.bin", "model.xml"]
    assert [(t.name, list(t.dims)) for t in c.input] == [("images", [3, 32, 32])]
    assert params["ENABLE_BATCH_PADDING"] == "YES" and list(c.dynamic_batching.preferred_batch_size) == [c.max_batch_size]
    assert "HINT_BF16" not in params  # the build validated f32; the backend has no way to ask for it
    for text in ((tmp_path / ov.name / "config.pbtxt").read_text(), (tmp_path / ov.name / "README.md").read_text()):
        assert "INFERENCE_PRECISION_HINT=f32" in text and "bf16" in text


def test_tensorrt_artifact_batching_and_native_refusal(tiny_build, tmp_path):
    artifact = tiny_build("tensorrt", dynamic_batch=True, target_options={"dynamic_batch": "1:2:4"})
    manifest = load_manifest(artifact)
    plan = plan_model(artifact, manifest, TritonOptions())
    assert plan.batching.max_batch_size == 4 and plan.batching.preferred == (2,) and plan.instance_kind == "KIND_GPU"
    assert (artifact / "model.engine").is_file() or any("build_engine.sh in 1/artifact/" in n for n in plan.notes)
    with pytest.raises(UserError, match="--max-batch-size 8: choose 1..4"):
        plan_model(artifact, manifest, TritonOptions(max_batch_size=8))
    with pytest.raises(UserError, match="--max-batch-size must be an integer from 1 to"):
        plan_model(artifact, manifest, TritonOptions(max_batch_size=0))
    if not (artifact / "model.engine").is_file():  # no TensorRT and GPU here: nothing to hand to tensorrt_plan
        with pytest.raises(UserError, match=r"holds no model.engine.*build_engine.sh"):
            serve_artifact(artifact, repository=tmp_path, options=TritonOptions(variant="native"))
        assert not (tmp_path / artifact.name).exists()
    rtx = dataclasses.replace(manifest, target="tensorrt-rtx")
    with pytest.raises(UserError, match="no TensorRT-RTX backend"):
        plan_model(artifact, rtx, TritonOptions(variant="native"))


def test_static_batch_refuses_a_batch_limit(tmp_path):
    with pytest.raises(UserError, match="static batch of 1; rebuild it with --dynamic-batch"):
        serve_artifact(STATIC, repository=tmp_path, options=TritonOptions(max_batch_size=4))
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_without_force_and_never_half_writes(tmp_path, monkeypatch):
    artifact = STATIC
    repo = tmp_path / "repo"
    first = serve_artifact(artifact, repository=repo)
    before = read_sums(first.model_dir)
    with pytest.raises(UserError, match="already exists: pass --force"):
        serve_artifact(artifact, repository=repo, options=TritonOptions(variant="native"))
    assert read_sums(first.model_dir) == before

    def interrupted(texts, root):
        raise KeyboardInterrupt

    monkeypatch.setattr("tome_export.serve.write_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        serve_artifact(artifact, repository=repo, options=TritonOptions(variant="native"), force=True)
    assert read_sums(first.model_dir) == before  # the served model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no staging directory left behind
    monkeypatch.undo()

    serve_artifact(artifact, repository=repo, options=TritonOptions(variant="native"), force=True)
    assert sorted(p.name for p in (repo / artifact.name / "1").iterdir()) == ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_tampered_artifact_is_refused(tmp_path):
    artifact = tmp_path / "copy"
    source = STATIC
    artifact.mkdir()
    for path in source.iterdir():
        (artifact / path.name).write_bytes(path.read_bytes())
    data = bytearray((artifact / "model.onnx").read_bytes())
    data[-1] ^= 1
    (artifact / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its sha256"):
        serve_artifact(artifact, repository=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["../up", ".hidden", "a b", ""])
def test_model_names_are_directory_safe(tmp_path, name):
    with pytest.raises(UserError, match="--name"):
        serve_artifact(STATIC, repository=tmp_path, options=TritonOptions(name=name))


@needs_schema
@pytest.mark.parametrize("text", ['a "quoted" \\ path', "µs", "tab\tand\nnewline"])
def test_strings_survive_the_text_format(text):
    assert parse_model_config(f"name: {quote(text)}").name == text


@needs_schema
def test_a_traced_build_serves_its_logits_only(tiny_build, tmp_path):
    artifact = tiny_build("onnx", trace_source=True)
    result = serve_artifact(artifact, repository=tmp_path, options=TritonOptions(variant="native"))
    config = parse_model_config((result.model_dir / "config.pbtxt").read_text())
    assert [t.name for t in config.output] == ["logits"] and "source" in graph_io(artifact / "model.onnx")
    assert any("other outputs (source)" in note for note in result.plan.notes)
    assert "other outputs (source)" in (result.model_dir / "README.md").read_text()
