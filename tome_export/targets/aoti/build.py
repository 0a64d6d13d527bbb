"""The ``aoti`` and ``aoti-cuda`` build: export, compile where the device is, validate, record.

A CPU package, and a CUDA package on a machine with a GPU, is compiled here and validated through its own runner
against the fp32 PyTorch ToMe model (images whose merge decisions rest on a near-tie reported apart). Without a
GPU an ``aoti-cuda`` build exports on the CPU, validates the exported program there (eager PyTorch, in the build's
precision) and leaves the package to ``tome-export engine DIR`` on the GPU machine.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ...quality.validate import validate_against_torch
from ...runtime.aoti import PACKAGE, PROGRAM, AOTIRunner
from .._shared import validate
from ..base import BuildContext, TargetResult
from .program import compile_package, export_program, program_facts, run_program, versions

NOT_COMPILED = (f"{PACKAGE} not compiled: this machine has no CUDA GPU; run `tome-export engine DIR` on the GPU "
                f"machine to compile {PROGRAM} there, validate the package on that GPU and record it")
PORTABLE_ON_CPU = (f"{PROGRAM} was exported without a GPU, so it holds the portable ToMe lowering, not the model's "
                   f"CUDA path: build on the GPU machine to package what the model runs there")


def gpu_facts() -> Dict[str, Any]:
    """The CUDA GPU torch runs on here: name and compute capability."""
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def _export(ctx: BuildContext, device: str) -> Any:
    plan = ctx.plan
    ctx.log(f"exporting the {ctx.precision} model with torch.export on {device}")
    return export_program(ctx.model, ctx.precision, device, plan.input_spec(ctx.preprocessing.input_size).image_shape,
                          plan.batch, plan.dynamic_batch, ctx.settings.build.max_batch, plan.trace_source)


def _compiled(ctx: BuildContext, program: Any, device: str) -> Dict[str, Any]:
    """Compile the package into the work directory and validate it through its runner."""
    ctx.log(f"compiling {PACKAGE} with AOTInductor for {device} (C++{' and Triton' if device == 'cuda' else ''})")
    facts = compile_package(program, ctx.workdir / PACKAGE, device)
    if device == "cuda":
        facts["device"] = gpu_facts()
    runtime = _runtime(device, True, facts.get("cpu_isa"))
    ctx.log(f"validating the package against PyTorch ToMe on {ctx.plan.validation_images} views of the photos")
    with AOTIRunner(ctx.artifact_io(runtime)) as runner:
        checked = validate(ctx, runner, f"the AOTInductor {device} {ctx.precision} package")
    return {"runtime": runtime, "package": facts,
            "validation": {"backend": f"aoti {device} package", **checked}}


def _uncompiled(ctx: BuildContext, program: Any) -> Dict[str, Any]:
    """Without a GPU: the exported program, validated by eager PyTorch on the CPU."""
    what = f"the exported {ctx.precision} program (eager PyTorch on the CPU; the package is compiled on the GPU)"
    ctx.log(f"no CUDA GPU here: validating {what}; the package is left to `tome-export engine` on the GPU machine")
    checked = validate_against_torch(ctx.model, run_program(program, "cpu", ctx.plan.outputs), ctx.validation_batches(),
                                     ctx.settings.validation.thresholds(), what)
    return {"runtime": _runtime("cuda", False), "package": None,
            "validation": {"backend": "exported program, eager PyTorch on the CPU", **checked}}


def _runtime(device: str, compiled: bool, cpu_isa: Optional[str] = None) -> Dict[str, Any]:
    runtime: Dict[str, Any] = {"file": PACKAGE, "device": device, "compiled": compiled}
    if compiled:
        runtime["torch"] = torch.__version__
    if cpu_isa:
        runtime["cpu_isa"] = cpu_isa
    return runtime


def build(ctx: BuildContext, device: str) -> TargetResult:
    here = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    program = _export(ctx, here)
    facts = program_facts(program)
    if device == "cuda":  # kept: `tome-export engine DIR --force` compiles it again (another GPU, another torch)
        torch.export.save(program, str(ctx.workdir / PROGRAM))
    done = _compiled(ctx, program, device) if here == device else _uncompiled(ctx, program)
    notes = [] if here == device else [NOT_COMPILED] + ([] if facts["tome_operators"] else [PORTABLE_ON_CPU])
    section = {"device": device, "exported_on": here, "compiled": done["package"] is not None,
               "validation_batch": ctx.plan.batch, **facts, "package": done["package"],
               "program": PROGRAM if device == "cuda" else None, "versions": dict(versions(here))}
    return TargetResult(runtime=done["runtime"], validation=done["validation"], notes=tuple(notes),
                        sections={"aoti": section})
