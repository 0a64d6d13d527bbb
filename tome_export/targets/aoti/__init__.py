"""Targets ``aoti`` and ``aoti-cuda``: the patched model compiled by AOTInductor into one file, ``model.pt2``.

The build exports the patched PyTorch model with ``torch.export`` on the device the package is for, so the package
holds what the model runs there (:mod:`.program`): on a CUDA GPU its CUDA path, on the CPU the portable ToMe
lowering. AOTInductor compiles the program (C++ for the CPU; Triton kernels for CUDA) and the weights into the
package, which :class:`tome_export.runtime.aoti.AOTIRunner` runs with torch alone: no timm, ONNX or model code.

``aoti`` builds CPU packages here: fp32 on any CPU; bf16 and fp16 only where oneDNN reports matrix instructions for
them (on an AVX2-only CPU PyTorch converts every 16-bit operation to fp32 and back: measured 3.5x slower than
fp32 on an AMD EPYC), otherwise the build refuses before any work. ``aoti-cuda`` packages are compiled where the
GPU is: a build on a machine without one writes the exported program (``exported_program.pt2``) and the settings, and
``tome-export engine DIR`` (:mod:`.finish`) compiles, validates and records the package on the GPU machine.
Each package is validated against the fp32 PyTorch ToMe model on the bundled photos with the recipe's thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from ...errors import UserError
from .. import register
from ..base import BuildContext, BuildPlan, Finished, Settings, Target, TargetResult
from ...runtime.aoti import PACKAGE
from ..tensorrt import DEFAULT_THRESHOLDS  # the GPU targets share their thresholds

RUNNER = "tome_export.runtime.aoti:AOTIRunner"
INSTALL = "pip install 'tome-export[aoti]'"
PRECISIONS = ("fp32", "fp16", "bf16")
# Where a 16-bit CPU package is worth building: oneDNN's own report of matrix instructions for the precision.
CPU_SUPPORT = {"bf16": ("_is_mkldnn_bf16_supported", "AVX-512 (BF16) or AMX"),
               "fp16": ("_is_mkldnn_fp16_supported", "AVX-512 FP16 or AMX-FP16")}


@dataclass(frozen=True)
class AotiBuild:
    max_batch: int = 256  # --dynamic-batch: the package takes 1 to max_batch images


@dataclass(frozen=True)
class AotiSettings(Settings):
    build: AotiBuild = AotiBuild()


def _check_cpu_precision(precision: str) -> None:
    if precision not in CPU_SUPPORT:
        return
    import torch

    check, needs = CPU_SUPPORT[precision]
    if not getattr(torch.ops.mkldnn, check)():
        raise UserError(f"--target aoti --precision {precision}: this CPU has no {precision} matrix instructions "
                        f"(oneDNN reports none; they need {needs}), so PyTorch would convert every {precision} "
                        f"operation to fp32 and back, slower than fp32: build fp32 here, or {precision} with "
                        f"--target aoti-cuda")


def check(plan: BuildPlan, device: str) -> None:
    """Cheap checks before any model is loaded."""
    limit = plan.settings.build.max_batch
    if plan.dynamic_batch and not 1 <= plan.batch <= limit:
        raise UserError(f"--batch {plan.batch}: a --dynamic-batch package takes 1 to {limit} images (the recipe's "
                        f"build.max_batch); choose a batch in that range or raise max_batch")
    if device == "cpu":
        _check_cpu_precision(plan.precision)


def _build(ctx: BuildContext, device: str) -> TargetResult:
    from .build import build

    return build(ctx, device)


def _finish(**kwargs: Any) -> Finished:
    from .finish import finish

    return finish(**kwargs)


THRESHOLDS: Dict[str, Dict[str, Any]] = {p: {"validation": DEFAULT_THRESHOLDS[p]} for p in PRECISIONS}


def _target(name: str, device: str, description: str, default_precision: str,
            version_modules: Tuple[str, ...]) -> Target:
    return register(Target(
        name=name, description=description, precisions=PRECISIONS, default_merge_impl="gather", runner=RUNNER,
        build=lambda ctx: _build(ctx, device), runtime_extra="aoti", graph_file=PACKAGE, settings=AotiSettings,
        precision_defaults=THRESHOLDS,
        check=lambda plan: check(plan, device), requires=("torch",), install_hint=INSTALL, needs_onnx=False,
        device=device, default_precision=default_precision, version_modules=version_modules,
        finish=_finish if device == "cuda" else None))


AOTI_TARGET = _target("aoti", "cpu", "AOTInductor CPU package (model.pt2, compiled C++): runs with torch alone; "
                      "bf16/fp16 only on CPUs with matrix instructions for them", "fp32", ("torch",))
AOTI_CUDA_TARGET = _target("aoti-cuda", "cuda", "AOTInductor CUDA package (model.pt2, Triton kernels): compiled "
                           "here on a GPU, else by `tome-export engine DIR` on the GPU machine", "fp16",
                           ("torch", "triton"))
