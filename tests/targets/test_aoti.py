"""Targets ``aoti`` and ``aoti-cuda``: what a build records, the CPU's refusals of 16-bit packages, and the handoff of
a CUDA build made without a GPU to ``tome-export engine`` on the GPU machine (its refusal here)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from tome_export.bench.matrix import backends, skip_reason
from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.inspection import format_report, inspect_path
from tome_export.manifest import read_manifest
from tome_export.pipeline import BuildRequest, plan_build
from tome_export.runtime import load
from tome_export.targets import targets
from tome_export.targets.aoti.finish import aoti_build, compile_validate_record

CPU_16_BIT = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
              "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported()}


def _snapshot(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_registrations_say_where_packages_run_and_which_one_is_finished_elsewhere():
    cpu, cuda = targets()["aoti"], targets()["aoti-cuda"]
    assert (cpu.device, cpu.needs_onnx, cpu.finish, cpu.default_precision) == ("cpu", False, None, "fp32")
    assert (cuda.device, cuda.needs_onnx, cuda.default_precision) == ("cuda", False, "fp16") and cuda.finish
    assert backends()["aoti"].device == "cpu" and backends()["aoti-cuda"].device == "cuda"
    assert "needs an NVIDIA GPU" in skip_reason("aoti-cuda", "fp16", gpu=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cpu_16_bit_packages_only_where_the_cpu_has_the_instructions(precision):
    request = BuildRequest(model="vit_t16", target="aoti", precision=precision)
    if CPU_16_BIT[precision]:
        assert plan_build(request)[2].precision == precision
    else:  # PyTorch would emulate them here, slower than fp32: refused before any model is loaded
        with pytest.raises(UserError, match=f"this CPU has no {precision} matrix instructions.*--target aoti-cuda"):
            plan_build(request)
    on_a_gpu = BuildRequest(model="vit_t16", target="aoti-cuda", precision=precision)
    assert plan_build(on_a_gpu)[2].precision == precision


def test_dynamic_batch_range_is_checked_before_any_work():
    request = BuildRequest(model="vit_t16", target="aoti", dynamic_batch=True, batch=300)
    with pytest.raises(UserError, match="takes 1 to 256 images"):
        plan_build(request)


@pytest.mark.slow
def test_cpu_package_records_how_it_was_built_and_validated(aoti_cpu_build):
    m = read_manifest(aoti_cpu_build)
    assert sorted(p.name for p in aoti_cpu_build.iterdir()) == ["manifest.json", "model.pt2", "selfcheck.npz"]
    runtime, section, validation = m["runtime"], m["aoti"], m["validation"]
    assert runtime["runner"] == "tome_export.runtime.aoti:AOTIRunner" and runtime["file"] == "model.pt2"
    assert runtime["compiled"] is True and runtime["torch"] == torch.__version__ and runtime["device"] == "cpu"
    metadata = torch._C._aoti.AOTIModelPackageLoader(str(aoti_cpu_build / "model.pt2"), "model", False, 1,
                                                     -1).get_metadata()
    assert runtime["cpu_isa"] == metadata["AOTI_CPU_ISA"] == section["package"]["cpu_isa"]
    assert section["lowering"].startswith("portable") and section["package"]["inductor_configs"] == {
        "cpp.dynamic_threads": True}
    assert validation["passed"] and validation["images"] == 4 and validation["runs"] > 4  # batches 1, 2 and 3
    assert validation["thresholds"] == {"max_abs_diff": 1e-4, "min_cosine": 0.99999, "min_top1_agreement": 1.0}
    assert validation["max_abs_diff"] <= 1e-4 and m["outputs"] == ["logits", "source"]
    assert "aoti       compiled True" in format_report(inspect_path(aoti_cpu_build))


@pytest.mark.slow
def test_cuda_build_without_a_gpu_leaves_the_program_for_the_gpu_machine(aoti_cuda_build, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the build compiled the package itself")
    m = read_manifest(aoti_cuda_build)
    assert sorted(p.name for p in aoti_cuda_build.iterdir()) == ["exported_program.pt2", "manifest.json", "selfcheck.npz"]
    assert m["runtime"]["compiled"] is False and m["aoti"]["package"] is None and m["aoti"]["exported_on"] == "cpu"
    assert m["validation"]["passed"] and m["validation"]["backend"] == "exported program, eager PyTorch on the CPU"
    assert m["validation"]["thresholds"] == {"min_cosine": 0.999, "min_top1_agreement": 0.875}
    assert any(note.startswith("model.pt2 not compiled") and "tome-export engine" in note for note in m["notes"])
    with pytest.raises(UserError, match="holds no compiled model.pt2.*run `tome-export engine"):
        load(aoti_cuda_build)
    before = _snapshot(aoti_cuda_build)
    for extra in ([], ["--force"], ["--validate-only"]):
        code = main(["engine", str(aoti_cuda_build), *extra])
        out, err = capsys.readouterr()
        assert code == 2 and not out and err.count("\n") == 1 and "no CUDA GPU here" in err, err
    assert _snapshot(aoti_cuda_build) == before


@pytest.mark.slow
def test_the_exported_program_moves_to_another_device_whole(aoti_cuda_build):
    """What `tome-export engine` does first on the GPU machine, here onto the meta device: a constant or a device
    argument left on the CPU would make the moved program fail."""
    from torch.export.passes import move_to_device_pass

    moved = move_to_device_pass(torch.export.load(str(aoti_cuda_build / "exported_program.pt2")), "meta")
    assert {t.device.type for t in [*moved.state_dict.values(), *moved.constants.values()]} == {"meta"}
    out = moved.module()(torch.empty(2, 3, 64, 64, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 1000) and out.dtype == torch.float32


@pytest.mark.slow
def test_engine_finishes_only_what_has_something_to_finish(aoti_cpu_build, capsys):
    code = main(["engine", str(aoti_cpu_build)])
    out, err = capsys.readouterr()
    assert code == 2 and not out and err.count("\n") == 1
    assert "is a --target aoti build, which has nothing to finish" in err
    assert "finishes --target aoti-cuda, tensorrt or tensorrt-rtx builds" in err
    assert json.loads((aoti_cpu_build / "manifest.json").read_text())["runtime"]["compiled"] is True


@pytest.mark.slow
def test_the_finishing_step_compiles_validates_and_records(aoti_cuda_build, tmp_path):
    """What `tome-export engine` does on the GPU machine after its checks, run here on the CPU: the program compiled,
    the package validated against the program run eagerly, the manifest rewritten with both (checksums included)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the build compiled the package itself")
    copy = tmp_path / "copy"
    shutil.copytree(aoti_cuda_build, copy)
    result = compile_validate_record(copy, aoti_build(copy), "cpu", {"name": "the test's CPU"}, log=lambda m: None)
    m = read_manifest(copy)  # every checksum verified, the new package's included
    assert result.validated and (result.file, result.device) == ("model.pt2", "the test's CPU")
    assert sorted(p.name for p in copy.iterdir()) == ["exported_program.pt2", "manifest.json", "model.pt2",
                                                    "selfcheck.npz"]
    assert m["artifacts"]["model.pt2"]["sha256"] == hashlib.sha256((copy / "model.pt2").read_bytes()).hexdigest()
    validation = m["aoti"]["package_validation"]
    assert validation["passed"] and validation["images"] == 4 and validation["thresholds"]["min_cosine"] == 0.999
    assert m["runtime"]["compiled"] is True and m["aoti"]["compiled"] and m["aoti"]["package"]["bytes"] > 0
    assert [n for n in m["notes"] if n.startswith("model.pt2")] == [
        f"model.pt2 compiled for and validated on the test's CPU by `tome-export engine` (torch {torch.__version__})"]
    with pytest.raises(UserError, match="is a CUDA package"):  # recorded as the aoti-cuda package it stands for
        load(copy)


@pytest.mark.slow
def test_a_cuda_export_keeps_the_fused_operators():
    """What an aoti-cuda build on a GPU traces: the fused ToMe operators (whose Triton kernels AOTInductor compiles
    into the package), not the portable lowering. No GPU here: the model's weights and the images are fake CUDA
    tensors (shapes and devices, no data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tome_export.kernels import fused_merge
    from tome_export.models import create_model, patch
    from tome_export.targets.aoti.program import ImagesToLogits, program_facts, trace

    pytest.importorskip("triton")
    if not hasattr(fused_merge, "in_exports"):
        pytest.skip("the fused kernels are not operators an export may keep here (torch.library.triton_op)")
    model, _ = create_model("vit_t16", weights="random", seed=0, depth=2, img_size=64)
    patch(model, 4).eval()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cuda", dtype=torch.float16),
                                                              requires_grad=False)
        images = torch.empty(2, 3, 64, 64, device="cuda")
        program = trace(ImagesToLogits(model, torch.float16, False), images, max_batch=256)
    facts = program_facts(program)
    assert facts["lowering"] == "fused ToMe operators"
    assert facts["tome_operators"] == {"tome_export.merge_plan.default": 2, "tome_export.merge_tokens.default": 2}
