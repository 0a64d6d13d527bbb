"""TensorRT targets: precision-in-graph conversion, Q/DQ, CPU validation, TensorRT-RTX engine builds, the CLI.

Engine builds use TensorRT-RTX, which compiles on the CPU; tests that run an engine need an NVIDIA GPU and skip
without one. Graph-level tests use a 2-block ViT-Tiny at 224 px; the builds use the suite's tiny digits_vit. (With
65 tokens, digits_vit's r=0 source output is folded into a constant: ``tests/targets/test_constant_outputs.py`` checks
that the fp8 Q/DQ step keeps such an output.)
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from tome_export import create_model, patch
from tome_export.cli import main
from tome_export.errors import UnvalidatedEngineWarning, UserError
from tome_export.export import export_onnx, tome_nodes
from tome_export.images import sample_photos
from tome_export.manifest import read_manifest
from tome_export.models import preprocessing
from tome_export.quality.calibration import calibration_batches
from tome_export.quality.validate import source_agreement
from tome_export.quantization import protected_node_names
from tome_export.recipe import recipe_for
from tome_export.runtime import load
from tome_export.targets import get_target
from tome_export.targets.tensorrt import DEFAULT_THRESHOLDS
from tome_export.targets.tensorrt.build import tensorrt_graph, without_outputs
from tome_export.targets.tensorrt.engine import (TENSORRT, TENSORRT_RTX, Profile, build_command, build_engine,
                                                  write_build_script)
from tome_export.targets.tensorrt.validation import cpu_runner

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
BATCH = 2
IMAGE, CLASSES = (3, 32, 32), 10  # digits_vit, the builds' model
GRAPH_IMAGE = (3, 224, 224)  # the graph tests' model


def _gpu() -> bool:
    return torch.cuda.is_available()


def _small_model(r: int) -> torch.nn.Module:
    model, _ = create_model("vit_tiny_patch16_224", weights="random", seed=0, depth=2)
    with torch.no_grad():
        model.head.weight.mul_(20)  # logits of order 1, so cosine and top-1 mean something
    return patch(model, r, merge_impl="onehot").eval()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """(precision, r) -> (graph, info, model, path of the fp32 source-traced export); built on first use."""
    root = tmp_path_factory.mktemp("trt")
    exports, cache = {}, {}

    def get(precision: str, r: int):
        if r not in exports:
            model = _small_model(r)
            pre = preprocessing(model)
            path = export_onnx(model, root / f"r{r}.onnx", pre.input_size, batch=BATCH, trace_source=True)
            exports[r] = (model, pre, path)
        model, pre, path = exports[r]
        if (precision, r) not in cache:
            settings = get_target("tensorrt").settings_for(recipe_for("tensorrt", precision))
            graph, info = tensorrt_graph(path, precision, settings, pre, BATCH)
            cache[precision, r] = (graph, info, model, path)
        return cache[precision, r]

    return get


def _photos_batches(model, n=4):
    pre = preprocessing(model)
    x = pre.batch(sample_photos(n))
    return [x[i:i + BATCH] for i in range(0, n, BATCH)]


@pytest.mark.slow  # exports a model
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_float_conversion_keeps_tome_nodes_in_fp32(graphs, precision):
    graph, info, _, path = graphs(precision, 16)
    onnx.checker.check_model(graph, full_check=True)
    low = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    inferred = onnx.shape_inference.infer_shapes(graph)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    protected = set(protected_node_names(onnx.load(str(path))))
    assert len(protected) == info["kept_fp32_nodes"] > 50
    nodes = {n.name: n for n in graph.graph.node}
    assert protected <= set(nodes)  # every ToMe node survived, under its name
    for name in protected:
        for tensor in list(nodes[name].input) + list(nodes[name].output):
            assert types.get(tensor) != low, f"{name} reads or writes {precision} tensor {tensor}"
    # ... while the transformer itself runs in the low type: every non-ToMe MatMul
    matmuls = [n for n in graph.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in protected]
    assert len(matmuls) >= 2 * 6 + 1 and all(types[n.output[0]] == low for n in matmuls)
    assert [types[i.name] for i in graph.graph.input] == [TensorProto.FLOAT]
    assert all(types[o.name] == TensorProto.FLOAT for o in graph.graph.output)
    # Weights are stored in the low type, except (bf16) the patch embedding: ONNX's Conv takes bf16 only
    # from opset 22, so it stays float32 behind Casts.
    conv = next(n for n in graph.graph.node if n.op_type == "Conv")
    fp32_conv = types[conv.output[0]] == TensorProto.FLOAT
    assert fp32_conv == (precision == "bf16")
    conv_weights = sum(int(np.prod(t.dims)) for t in graph.graph.initializer if t.name in conv.input) if fp32_conv else 0
    weights = info["weights"]
    assert weights.get("float", 0) - conv_weights < 0.01 * weights[{"fp16": "float16", "bf16": "bfloat16"}[precision]]


@pytest.mark.slow  # exports a model
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_leaves_the_matching_path_unquantized(graphs, precision):
    graph, info, _, path = graphs(precision, 16)
    protected = set(protected_node_names(onnx.load(str(path))))
    dequantized = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    touched = [n.name for n in graph.graph.node if n.name in protected and set(n.input) & dequantized]
    assert touched == []
    # 2 blocks x (qkv, q@k, attn@v, proj, fc1, fc2) + patch embedding + head
    assert info["quantization"]["quantized_nodes"] == 2 * 6 + 2
    inits = {t.name: t for t in graph.graph.initializer}
    zero_type = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}[precision]
    zero_points = [inits[n.input[2]] for n in graph.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points and all(z.data_type == zero_type for z in zero_points)
    assert all(not np.any(onnx.numpy_helper.to_array(z).astype(np.float32)) for z in zero_points)
    stored = info["weights"]
    assert stored[{"int8": "int8", "fp8": "float8e4m3fn"}[precision]] > 0.9 * sum(stored.values())


def test_calibration_uses_real_photos(tmp_path):
    model = _small_model(0)
    pre = preprocessing(model)
    batches = calibration_batches(pre, 12, 4)
    assert [b.shape for b in batches] == [(4, *GRAPH_IMAGE)] * 3
    photos = pre.batch(sample_photos())
    x = np.concatenate(batches)
    # every image is an augmented photo (the photos themselves are validation images, never calibration ones)
    assert all(np.abs(x[i] - photos[i % len(photos)]).mean() > 0.01 for i in range(12))
    assert np.array_equal(np.concatenate(calibration_batches(pre, 12, 4)), x)  # seeded
    with pytest.raises(UserError, match="holds no images"):
        calibration_batches(pre, 4, 2, data_dir=tmp_path)
    for i, image in enumerate(sample_photos(2)):
        image.save(tmp_path / f"{i}.jpg")
    own = calibration_batches(pre, 2, 2, data_dir=tmp_path, augment=False)[0]
    assert own.shape == (2, *GRAPH_IMAGE) and not np.array_equal(own, photos[:2])  # JPEG round trip, same scenes
    assert np.abs(own - photos[:2]).mean() < 0.1


@pytest.mark.slow  # exports a model
@pytest.mark.parametrize("r", [0, 16])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_graph_validates_in_onnxruntime(graphs, precision, r):
    """The TensorRT-bound graph, run on the CPU, against the PyTorch fp32 ToMe model (recipe thresholds)."""
    graph, _, model, _ = graphs(precision, r)
    batches = _photos_batches(model)
    with cpu_runner(graph, precision) as runner:
        outs = [[runner.infer(x)[name] for name in ("logits", "source")] for x in batches]
    with torch.no_grad():
        refs = [model.forward_with_source(torch.from_numpy(x)) for x in batches]
    ref = np.concatenate([r_[0].numpy() for r_ in refs])
    got = np.concatenate([o[0] for o in outs])
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    limits = {**DEFAULT_THRESHOLDS[precision], **recipe_for("tensorrt", precision).section("validation")}
    assert cos.min() >= limits["min_cosine"]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= limits["min_top1_agreement"]
    if precision == "fp32":
        assert np.abs(ref - got).max() < 1e-4
    else:  # the conversion really changed the arithmetic
        assert np.abs(ref - got).max() > 1e-5
    agreement = source_agreement([r_[1].numpy() for r_ in refs], [o[1] for o in outs])
    # With ToMe's matching path in fp32, only rounding of the keys themselves can flip a match (2 blocks here).
    assert agreement["token_group_agreement"] >= {"fp32": 1.0, "fp16": 0.9, "bf16": 0.8, "int8": 0.7, "fp8": 0.6}[precision]
    if r == 0 or precision == "fp32":
        assert agreement == {"source_images_identical": 1.0, "token_group_agreement": 1.0}


@pytest.mark.slow  # exports a model
@pytest.mark.parametrize("r", [0, 16])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_tensorrt_rtx_builds_every_precision(graphs, precision, r, tmp_path):
    """NVIDIA's ONNX parser and builder accept every TensorRT-bound graph (TensorRT-RTX compiles on the CPU)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12/-cu13 is not installed")
    graph, _, _, _ = graphs(precision, r)
    shipped = without_outputs(graph, ["source"])
    assert [o.name for o in shipped.graph.output] == ["logits"] and len(shipped.graph.node) < len(graph.graph.node)
    onnx.save(shipped, str(tmp_path / "model.onnx"))
    caps = recipe_for("tensorrt-rtx", precision).section("build").get("compute_capabilities", [])
    facts = build_engine(TENSORRT_RTX, tmp_path / "model.onnx", tmp_path / "model.engine", "images", GRAPH_IMAGE,
                         Profile(BATCH, BATCH, BATCH), compute_capabilities=caps)
    assert facts["bytes"] == (tmp_path / "model.engine").stat().st_size > 1_000_000
    assert facts["layers"] > 100 and facts["library"] == "tensorrt_rtx"


@pytest.mark.slow  # exports a model
def test_tensorrt_rtx_rejects_what_the_check_rejects(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12/-cu13 is not installed")
    model, _ = create_model("digits_vit", weights="random", seed=0, depth=1)
    patch(model, 8, merge_impl="gather")
    export_onnx(model, tmp_path / "g.onnx", IMAGE)
    with pytest.raises(UserError, match=r"parser rejected the graph: .*ScatterElements.*reduction"):
        build_engine(TENSORRT_RTX, tmp_path / "g.onnx", tmp_path / "g.engine", "images", IMAGE, Profile(1, 1, 1))
    assert not (tmp_path / "g.engine").exists()


def test_build_command_and_script(tmp_path):
    profile = Profile.parse("1:8:64")
    cmd = build_command(TENSORRT, "model.onnx", "model.engine", "images", (3, 224, 224), profile,
                        optimization_level=4, timing_cache="timing.cache")
    assert cmd == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.engine", "--stronglyTyped", "--noTF32",
                   "--builderOptimizationLevel=4", "--timingCacheFile=timing.cache",
                   "--minShapes=images:1x3x224x224", "--optShapes=images:8x3x224x224",
                   "--maxShapes=images:64x3x224x224", "--skipInference"]
    rtx = build_command(TENSORRT_RTX, "model.onnx", "model.engine", "images", (3, 224, 224), Profile(4, 4, 4),
                        compute_capabilities=["89", "120"])
    assert rtx == ["tensorrt_rtx", "--onnx=model.onnx", "--saveEngine=model.engine",
                   "--computeCapabilities=89,120", "--skipInference"]
    script = write_build_script(tmp_path / "build_engine.sh", TENSORRT, cmd, "fp16", "0")
    assert os.access(script, os.X_OK)
    # Without trtexec on PATH the script says where to get it and exits 2, building nothing.
    done = subprocess.run(["/bin/bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "trtexec not found" in done.stderr
    # Extra arguments reach the builder (so nobody edits the checksummed script to add them).
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "trtexec").write_text('#!/bin/sh\necho "trtexec $*"\n')
    (tools / "trtexec").chmod(0o755)
    done = subprocess.run(["/bin/bash", str(script), "--verbose", "--device=1"], capture_output=True, text=True,
                          env={"PATH": f"{tools}:/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip() == " ".join(cmd + ["--verbose", "--device=1"])
    for bad in ("8:4:1", "1:8", "0:1:2", "a:b:c", "1:2:5000"):
        with pytest.raises(UserError, match="MIN:OPT:MAX"):
            Profile.parse(bad)


# --- the command line, end to end (digits_vit: 4 blocks, r=8 merges in each) ------------------------------


def _cli(args, capsys):
    code = main(args + ["--weights", "random", "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def rtx_fp16(tmp_path_factory):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12/-cu13 is not installed")
    out = tmp_path_factory.mktemp("cli") / "rtx"
    code = main(["--model", "digits_vit", "--r", "8", "--target", "tensorrt-rtx", "--precision", "fp16",
                 "--dynamic-batch", "1:2:4", "--weights", "random", "--output", str(out), "--quiet"])
    assert code == 0
    return out


def test_cli_tensorrt_rtx_fp16(rtx_fp16):
    m = read_manifest(rtx_fp16)  # verifies every sha256
    assert sorted(p.name for p in rtx_fp16.iterdir()) == ["build_engine.sh", "manifest.json", "model.engine", "model.onnx",
                                                           "selfcheck.npz"]
    assert m["target"] == "tensorrt-rtx" and m["merge_impl"] == "onehot" and m["recipe"]["file"] == "tensorrt-rtx-fp16.yaml"
    t = m["tensorrt"]
    assert t["engine_built"] and t["engine"]["bytes"] == (rtx_fp16 / "model.engine").stat().st_size
    assert t["profile"] == {"input": "images", "min": 1, "opt": 2, "max": 4}
    assert "--minShapes=images:1x3x32x32" in (rtx_fp16 / "build_engine.sh").read_text()
    v = m["validation"]
    assert v["passed"] and v["min_cosine"] >= 0.999 and v["token_group_agreement"] >= 0.9
    assert v["images"] == 32 and v["runs"] == 32 + 9  # 32 views at one size; one per photo, filled to 9, at the other
    graph = onnx.load(str(rtx_fp16 / "model.onnx"))
    assert [o.name for o in graph.graph.output] == ["logits"]  # the source output was only for validation
    stored = t["precision_in_graph"]["weights"]
    assert stored["float16"] > 0.99 * (stored["float16"] + stored["float"])  # weights in fp16
    assert sum(i.data_type == TensorProto.FLOAT16 for i in graph.graph.initializer) > 4 * 4  # 4 blocks
    assert len(tome_nodes(graph)["match"]) > 100


def test_engine_runs_where_a_gpu_is(rtx_fp16):
    assert read_manifest(rtx_fp16)["runtime"]["engine_validated"] is False  # the build validated the ONNX only
    if not _gpu():
        with pytest.warns(UnvalidatedEngineWarning, match="--validate-only"), pytest.raises(UserError, match="GPU"):
            load(rtx_fp16)
        pytest.skip("no CUDA GPU here: the engine could only be built, not run (load() said so)")
    runner = load(rtx_fp16)
    x = runner.preprocess_batch(sample_photos(3))
    ort = cpu_runner(onnx.load(str(rtx_fp16 / "model.onnx")), "fp16")(x)
    got = runner(x)
    cos = (ort * got).sum(1) / np.linalg.norm(ort, axis=1) / np.linalg.norm(got, axis=1)
    assert got.shape == (3, CLASSES) and cos.min() > 0.999
    with pytest.raises(UserError, match="outside the engine's profile"):
        runner(np.zeros((5, *IMAGE), np.float32))


@pytest.mark.slow
def test_cli_tensorrt_int8_without_tensorrt(tmp_path, capsys):
    """Full TensorRT needs its package and a GPU: without them the ONNX, build_engine.sh and manifest are written."""
    recipe = tmp_path / "int8.yaml"
    text = Path(recipe_for("tensorrt", "int8").path).read_text()
    recipe.write_text(text.replace("images: 32", "images: 8").replace("merge_agreement: true", "merge_agreement: false"))
    out = tmp_path / "trt"
    code, stdout, err = _cli(["--model", "digits_vit", "--r", "8", "--recipe", str(recipe), "--output", str(out)], capsys)
    assert code == 0, err
    m = read_manifest(out)
    q = m["tensorrt"]["precision_in_graph"]["quantization"]
    assert q["type"] == "int8" and q["calibration_images"] == 8 and q["quantized_nodes"] == 4 * 6 + 2  # 4 blocks x 6 + patch embedding + head
    assert m["validation"]["passed"] and "token_group_agreement" not in m["validation"]
    assert "--timingCacheFile=timing.cache" in (out / "build_engine.sh").read_text()
    if m["tensorrt"]["engine_built"]:  # a machine with TensorRT and a GPU
        assert (out / "model.engine").is_file()
        return
    assert sorted(p.name for p in out.iterdir()) == ["build_engine.sh", "manifest.json", "model.onnx", "selfcheck.npz"]
    assert "must be built on the target GPU machine" in m["tensorrt"]["engine_note"]
    assert "engine NOT built here" in stdout and "build_engine.sh" in stdout
    with pytest.raises(UserError, match=r"holds no model.engine.*build_engine.sh"):
        load(out)
    # An engine built afterwards (./build_engine.sh) was never validated nor checksummed: refused.
    (out / "model.engine").write_bytes(b"an engine the manifest does not cover")
    with pytest.raises(UserError, match="model.engine .* is not covered by its manifest"):
        load(out)


def test_gpu_targets_default_to_fp16():
    from tome_export.pipeline import BuildRequest, prepare

    for target in ("tensorrt", "tensorrt-rtx"):
        assert prepare(BuildRequest(model="vit_t16", target=target, weights="random")).plan.precision == "fp16"
    assert prepare(BuildRequest(model="vit_t16", target="onnxruntime", weights="random")).plan.precision == "fp32"


@pytest.mark.parametrize("args, message", [
    (["--target", "tensorrt", "--require-engine"], "--require-engine: no TensorRT engine can be built here"),
    (["--target", "tensorrt-rtx", "--merge-impl", "gather"], "cannot build without a plugin"),
    (["--target", "tensorrt-rtx", "--scatter-plugin"], "--scatter-plugin does not apply to --target tensorrt-rtx"),
    (["--target", "onnx", "--dynamic-batch", "1:8:64"], "--dynamic-batch 1:8:64 does not apply to --target onnx"),
    (["--target", "tensorrt", "--dynamic-batch", "8:4:1"], "expected MIN:OPT:MAX"),
    (["--target", "tensorrt", "--precision", "int8", "--calib-data", "/nonexistent"], "is not a directory"),
])
def test_cli_refuses_before_any_work(tmp_path, capsys, args, message):
    if "--require-engine" in args and TENSORRT.module in __import__("sys").modules or _gpu():
        pytest.skip("this machine might build TensorRT engines")
    out = tmp_path / "x"
    code, stdout, err = _cli(["--model", "digits_vit", "--output", str(out)] + args, capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not any(tmp_path.iterdir())


def test_engine_spec_round_trips_through_the_manifest():
    """What the build records is what `tome-export engine` builds with, for manifests from before the spec too."""
    from tome_export.targets.tensorrt.engine import EngineSpec

    spec = EngineSpec(TENSORRT, "images", (3, 224, 224), Profile.parse("1:8:64"), 4, "timing.cache", ("89", "120"))
    facts = spec.facts()
    assert EngineSpec.from_facts(TENSORRT, facts, (3, 224, 224)) == spec
    assert facts["build_command"] == " ".join(spec.command())
    older = {k: v for k, v in facts.items() if k not in ("timing_cache", "compute_capabilities")}
    assert EngineSpec.from_facts(TENSORRT, older, (3, 224, 224)) == spec
    plain = EngineSpec(TENSORRT_RTX, "images", (3, 224, 224), Profile(2, 2, 2))
    older = {k: v for k, v in plain.facts().items() if k not in ("timing_cache", "compute_capabilities")}
    assert EngineSpec.from_facts(TENSORRT_RTX, older, (3, 224, 224)) == plain


def test_engine_builds_keep_float32_out_of_tf32():
    """TF32 is on by default in NVIDIA's builders; our builds turn it off, so float32 layers compute in float32."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12/-cu13 is not installed")
    from tome_export.targets.tensorrt.engine import _builder_config

    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    assert builder.create_builder_config().get_flag(trt.BuilderFlag.TF32)  # the default this guards against
    config = _builder_config(trt, builder, "images", (3, 224, 224), Profile(1, 1, 1), 3, ())
    assert not config.get_flag(trt.BuilderFlag.TF32)
