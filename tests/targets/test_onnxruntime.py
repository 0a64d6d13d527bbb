"""The onnxruntime target: every recipe builds on a small ToMe ViT, meets its thresholds and says what ran."""

import shutil

import numpy as np
import onnx
import pytest

from tome_testing.cpu_builds import plan_with, recipe_data
from tome_export.cli import main
from tome_export.errors import UserError, ValidationError
from tome_export.images import sample_photo_paths
from tome_export.manifest import read_manifest
from tome_export.recipe import parse_recipe
from tome_export.runtime import load
from tome_export.quality.validate import wilson_interval
from tome_export.targets import recipe_settings

MERGING_BLOCKS, IMAGES = 4, 32  # digits_vit at r=8 merges in all 4 blocks; recipes validate on 32 views
CLASSES = 10


def _decisions(result):
    return result["merge_decisions"]["as_built"]


def test_fp32_matches_pytorch_and_saves_a_portable_graph(cpu_build):
    directory, result = cpu_build("onnxruntime", "fp32")
    v = result["validation"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 and v["thresholds"] == {"max_abs_diff": 1e-4}
    saved = onnx.load(str(directory / "model.onnx"))
    domains = {n.domain for n in saved.graph.node}
    assert "com.microsoft" in domains  # ORT's fusions were applied and saved ...
    assert "com.microsoft.nchwc" not in domains  # ... but not the CPU-specific layouts
    assert result["runtime"] == {"file": "model.onnx", "session_optimization": "all"}
    assert result["precision_ran"]["matmul_like_kernels"].keys() == {"fp32"}
    assert _decisions(result)["agreement"] == 1.0 and _decisions(result)["decisions"] == MERGING_BLOCKS * IMAGES


def test_a_recipe_asking_for_n_images_validates_on_n_distinct_views(cpu_build):
    _, result = cpu_build("onnxruntime", "fp32", validation={"images": 12})
    v = result["validation"]
    assert v["passed"] and v["images"] == 12 and "runs" not in v  # batch 1: each view run once, all distinct
    assert v["top1_interval_95"] == [round(x, 4) for x in wilson_interval(round(12 * v["top1_agreement"]), 12)]
    assert result["merge_decisions"]["as_built"]["decisions"] == MERGING_BLOCKS * 12


def test_int8_default_is_dynamic_and_leaves_tome_nodes_alone(cpu_build):
    _, result = cpu_build("onnxruntime", "int8")
    step, v = result["precision_step"], result["validation"]
    assert step["method"].startswith("dynamic") and step["tome_nodes_kept_fp32"] > 100
    assert step["tome_nodes_quantized"] == 0 and step["tome_nodes_reading_int8"] == 0
    assert v["min_cosine"] >= 0.99 and v["top1_agreement"] >= 0.75
    assert result["precision_ran"]["matmul_like_kernels"]["int8"] == MERGING_BLOCKS * 4 + 1  # qkv, proj, fc1, fc2 per block + head
    decisions = result["merge_decisions"]
    assert decisions["as_built"]["decisions"] == MERGING_BLOCKS * IMAGES
    # Dynamic quantization only touches MatMuls with constant weights: unprotected it quantizes no ToMe node,
    # and the measured decisions are the same.
    assert decisions["without_protection"]["tome_nodes_quantized"] == 0
    assert decisions["without_protection"]["agreement"] == decisions["as_built"]["agreement"]


def test_static_qdq_protection_keeps_the_matching_path_fp32(cpu_build):
    _, result = cpu_build("onnxruntime", "int8", quantization={"method": "static_qdq"}, calibration={"images": 16})
    step, decisions = result["precision_step"], result["merge_decisions"]
    assert step["calibration"]["images"] == 16 and step["calibration"]["source"].startswith("bundled")
    assert step["tome_nodes_quantized"] == 0 and step["tome_nodes_reading_int8"] == 0
    unprotected = decisions["without_protection"]
    assert unprotected["tome_nodes_reading_int8"] >= MERGING_BLOCKS  # at least each block's similarity MatMul
    assert decisions["as_built"]["pair_agreement"] > unprotected["pair_agreement"]
    assert result["validation"]["min_cosine"] >= 0.99


def test_fp16_runs_and_says_plainly_it_gains_nothing(cpu_build):
    directory, result = cpu_build("onnxruntime", "fp16")
    assert any("gains nothing" in note for note in result["notes"])
    assert result["precision_ran"]["casts_executed"] > 0
    model = onnx.load(str(directory / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    # the ToMe chain is fp32 end to end: no fp32 -> fp16 -> fp32 Cast pair after a protected node
    producer = {o: n for n in model.graph.node for o in n.output}

    def source(node):
        up = producer.get(node.input[0])
        return up if up is not None else onnx.NodeProto()

    def cast_to(node, dtype):
        return node.op_type == "Cast" and node.attribute[0].i == dtype

    round_trips = [n.name for n in model.graph.node if cast_to(n, onnx.TensorProto.FLOAT)
                   and cast_to(source(n), onnx.TensorProto.FLOAT16)
                   and source(source(n)).name.startswith(("tome_match/", "tome_merge/"))]
    assert not round_trips
    decisions = result["merge_decisions"]
    assert decisions["as_built"]["agreement"] > decisions["without_protection"]["agreement"]


def test_bf16_stores_bf16_weights_and_computes_fp32(cpu_build):
    directory, result = cpu_build("onnxruntime", "bf16")
    fp32_dir, _ = cpu_build("onnxruntime", "fp32")
    model = onnx.load(str(directory / "model.onnx"))
    assert sum(t.data_type == onnx.TensorProto.BFLOAT16 for t in model.graph.initializer) >= MERGING_BLOCKS * 4
    assert (directory / "model.onnx").stat().st_size < 0.6 * (fp32_dir / "model.onnx").stat().st_size
    assert result["precision_ran"]["matmul_like_kernels"].keys() == {"fp32"}
    assert any("no bf16 compute kernels" in note for note in result["notes"])
    assert result["validation"]["min_cosine"] >= 0.999


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16", "bf16"])
def test_runtime_loader_runs_every_artifact(cpu_build, precision):
    directory, result = cpu_build("onnxruntime", precision)
    runner = load(directory, threads=1)
    batch = runner.preprocess_batch(sample_photo_paths()[:1])
    logits = runner(batch)
    assert logits.shape == (1, CLASSES) and np.isfinite(logits).all()
    served = load(directory, threads=2, throughput=True).run_many([batch, batch, batch])
    assert len(served) == 3 and all(np.allclose(s, logits, atol=1e-4) for s in served)


def test_a_missed_threshold_fails_the_build(cpu_build):
    with pytest.raises(ValidationError, match=r"min_cosine 0\.99\d* \(must be at least 1\); nothing was written"):
        cpu_build("onnxruntime", "int8", validation={"min_cosine": 1.0, "images": 4})  # any count fails 1.0


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="unknown key 'metod'"):
        recipe_settings(parse_recipe({"target": "onnxruntime", "precision": "int8", "quantization": {"metod": "dynamic"}}))
    with pytest.raises(UserError, match="choose one of dynamic|choose one of none"):
        recipe_settings(parse_recipe({"target": "onnxruntime", "precision": "int8", "quantization": {"method": "int4"}}))
    assert recipe_data("onnxruntime", "int8")["quantization"]["method"] == "dynamic"
    with pytest.raises(UserError, match="does not make int8: choose dynamic, static_qdq"):
        plan_with(tmp_path, "onnxruntime", "int8", quantization={"method": "float16"})


def test_bad_calibration_folder_is_refused_before_any_work(tmp_path, capsys):
    code = main(["--model", "digits_vit", "--weights", "random", "--target", "onnxruntime", "--precision", "int8",
                 "--calib-data", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_static_int8_with_calibration_folder_and_edited_recipe(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sample_photo_paths()[:3]:
        shutil.copy(path, photos / path.name)
    recipe = tmp_path / "static.yaml"
    # reduce_range (7-bit weights): without it, on a CPU without VNNI (AVX2 only), ORT's u8 x s8 kernels saturate
    # and this tiny random model's min logit cosine fell to 0.94.
    recipe.write_text(
        "target: onnxruntime\nprecision: int8\nbuild: {keep_fp32: tome}\n"
        "quantization: {method: static_qdq, reduce_range: true, op_types: [MatMul, Gemm, Conv]}\n"
        "calibration: {images: 6, augment: true}\nvalidation: {min_cosine: 0.98, min_top1_agreement: 0.5}\n")
    out = tmp_path / "out"
    code = main(["--model", "digits_vit", "--r", "8", "--weights", "random", "--recipe", str(recipe),
                 "--calib-data", str(photos), "--output", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "ran        matmul-like kernels:" in printed and "merges" in printed
    manifest = read_manifest(out)
    assert manifest["precision_step"]["calibration"] == {"images": 6, "source": str(photos), "augment": True, "seed": 0}
    assert manifest["recipe"]["file"] == "static.yaml" and manifest["target"] == "onnxruntime"
