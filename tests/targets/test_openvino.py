"""The openvino target: IR builds on a small ToMe ViT, meet their thresholds and record the precision that ran."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tome_testing.cpu_builds import plan_with
from tome_export.errors import UserError
from tome_export.images import sample_photo_paths
from tome_export.runtime import load
from tome_export.targets.openvino import cpu_capabilities

MERGING_BLOCKS, IMAGES, CLASSES = 4, 32, 10  # digits_vit at r=8 merges in all 4 blocks
HAS_BF16 = "BF16" in cpu_capabilities()
HAS_FP16 = "FP16" in cpu_capabilities()


def test_fp32_ir_runs_f32_and_matches_pytorch(cpu_build):
    directory, result = cpu_build("openvino", "fp32")
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.bin", "model.xml",
                                                           "openvino_config.json", "selfcheck.npz"]
    assert result["runtime"]["config"] == {"INFERENCE_PRECISION_HINT": "f32"}
    assert json.loads((directory / "openvino_config.json").read_text()) == {"CPU": result["runtime"]["config"]}
    ran = result["precision_ran"]
    assert ran["inference_precision"] == "f32" and set(ran["compute_layers"]) == {"f32"}
    assert result["validation"]["max_abs_diff"] <= 1e-4
    assert result["merge_decisions"]["as_built"]["agreement"] == 1.0
    assert result["merge_decisions"]["as_built"]["decisions"] == MERGING_BLOCKS * IMAGES


def test_int8_quantizes_with_nncf_but_not_the_tome_layers(cpu_build):
    _, result = cpu_build("openvino", "int8", calibration={"images": 16})
    step, ran, decisions = result["precision_step"], result["precision_ran"], result["merge_decisions"]
    assert step["tome_layers_ignored"] > 100 and step["tome_inputs_quantized"] == 0
    assert ran["compute_layers"].get("i8", 0) >= MERGING_BLOCKS * 4  # the Linear layers run in int8 ...
    # ... the ToMe layers do not. u8: each block's NaN mask of the scores (IsNaN + Select, fused into one
    # subgraph that the CPU plugin reports as u8 in f32 builds too); no quantizer input reaches them (above).
    assert "i8" not in ran["tome_layers"] and ran["tome_layers"].get("u8", 0) <= MERGING_BLOCKS
    assert result["validation"]["min_cosine"] >= 0.99
    unprotected = decisions["without_protection"]
    assert unprotected["tome_inputs_quantized"] >= MERGING_BLOCKS  # NNCF quantizes the similarity MatMul if allowed
    assert decisions["as_built"]["pair_agreement"] > unprotected["pair_agreement"]


@pytest.mark.skipif(not HAS_BF16, reason="this CPU lists no BF16 in OPTIMIZATION_CAPABILITIES")
def test_bf16_runs_bf16_with_tome_layers_kept_f32(cpu_build):
    _, result = cpu_build("openvino", "bf16")
    ran = result["precision_ran"]
    assert ran["inference_precision"] == "bf16" and ran["compute_layers"].get("bf16", 0) >= MERGING_BLOCKS * 4
    assert result["precision_step"]["layers_marked_keep_precision"] > 100
    assert ran["compute_layers"].get("f32", 0) == MERGING_BLOCKS  # exactly the similarity MatMuls stay f32
    assert ran["tome_layers"].get("f32", 0) > ran["tome_layers"].get("bf16", 0)
    assert result["validation"]["min_cosine"] >= 0.995
    assert isinstance(result["merge_decisions"]["without_protection"], dict)


def test_precisions_the_cpu_lacks_are_refused(tmp_path):
    for precision, hint, has in (("fp16", "f16", HAS_FP16), ("bf16", "bf16", HAS_BF16)):
        if not has:
            with pytest.raises(UserError, match=f"OpenVINO cannot run {hint} on this CPU"):
                plan_with(tmp_path, "openvino", precision)
    if HAS_BF16:
        plan_with(tmp_path, "openvino", "int8", build={"inference_precision": "bf16"})
    else:
        with pytest.raises(UserError):
            plan_with(tmp_path, "openvino", "int8", build={"inference_precision": "bf16"})


@pytest.mark.parametrize("precision", ["fp32", "int8"] + (["bf16"] if HAS_BF16 else []))
def test_runtime_loader_runs_every_artifact(cpu_build, precision):
    sections = {"calibration": {"images": 16}} if precision == "int8" else {}
    directory, _ = cpu_build("openvino", precision, **sections)
    runner = load(directory, threads=1)
    batch = runner.preprocess_batch(sample_photo_paths()[:1])
    logits = runner(batch)
    assert logits.shape == (1, CLASSES) and np.isfinite(logits).all()
    served = load(directory, threads=2, throughput=True).run_many([batch] * 4)
    assert len(served) == 4 and all(np.allclose(s, logits, atol=1e-3) for s in served)


BENCHMARK_APP = "import sys; from openvino.tools.benchmark.main import main; sys.argv[0] = 'benchmark_app'; main()"


def benchmark_app_precision(directory: Path, config: Path) -> str:
    """The inference precision OpenVINO's benchmark_app reports compiling the IR with ``-load_config config``."""
    proc = subprocess.run([sys.executable, "-c", BENCHMARK_APP, "-m", str(directory / "model.xml"), "-d", "CPU",
                           "-load_config", str(config), "-niter", "1", "-nireq", "1", "-api", "sync", "-hint", "none"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    found = re.search(r"INFERENCE_PRECISION_HINT: <Type: '(\w+)'>", proc.stdout)
    assert found, proc.stdout[-3000:]
    return found.group(1)


def test_benchmark_app_runs_the_validated_precision_from_the_config_beside_the_ir(cpu_build, tmp_path):
    directory, result = cpu_build("openvino", "fp32")
    assert result["runtime"]["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert benchmark_app_precision(directory, directory / "openvino_config.json") == "float32"
    # The file is what decides: the same IR with a bf16 config compiles as OpenVINO compiles it with that hint here
    # (bf16 on CPUs with AVX-512, native or emulated; f32 on AVX2-only CPUs, which cannot run bf16).
    other = tmp_path / "bf16.json"
    other.write_text(json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}))
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(str(directory / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    expected = re.search(r"'(\w+)'", repr(compiled.get_property("INFERENCE_PRECISION_HINT"))).group(1)
    assert benchmark_app_precision(directory, other) == expected
