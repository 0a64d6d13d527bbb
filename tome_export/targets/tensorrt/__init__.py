"""Targets ``tensorrt`` and ``tensorrt-rtx``: a strongly typed TensorRT recipe: precision-in-graph ONNX,
``build_engine.sh``, and the engine itself where the library (and for full TensorRT a GPU) is present.

TensorRT 11 removed the FP16/INT8 builder flags and int8 calibrators: fp16/bf16 are Casts in the graph and
int8/fp8 are explicit Q/DQ pairs (see :mod:`.precision`, :mod:`.qdq`). ToMe's matching path and merge arithmetic
stay float32 in every precision. The default merge lowering is ``onehot`` (no reducing ScatterElements, which
only TensorRT's plugin library implements). :func:`.compat.tensorrt_problems` checks every graph statically.

TensorRT-RTX compiles engines ahead of time on the CPU (no GPU needed; kernels are specialised for the GPU on
first run). It builds the same graphs, with two differences: it has no plugins, so reducing ScatterElements (the
``gather`` lowering) is always rejected, and it has no timing cache. All five precisions parse and build here;
at run time fp8 GEMMs need compute capability >= 8.9 (the fp8 recipe targets 8.9 and 12.0), and NVIDIA documents
int8 GEMMs on RTX GPUs as weight-only. Engines run with :class:`tome_export.runtime.tensorrt.TensorRTRunner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Tuple

from ...errors import UserError
from ...quality.calibration import Calibration
from .. import register
from ..base import BuildContext, BuildPlan, CalibrationOptions, Finished, Settings, Target, TargetResult, Validation
from .engine import TENSORRT, TENSORRT_RTX, Library, Profile, engine_unavailable_reason

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
RUNNER = "tome_export.runtime.tensorrt:TensorRTRunner"


@dataclass(frozen=True)
class TensorRTBuild:
    keep_fp32: Literal["tome", "match", "none"] = "tome"  # ToMe nodes kept float32 in every precision
    keep_fp32_ops: Tuple[str, ...] = ()  # op types kept float32 in fp16/bf16 as well
    optimization_level: int = 3  # builder optimization level 0..5
    timing_cache: bool = True  # keep TensorRT's timing cache beside the engine (TensorRT-RTX has none)
    scatter_plugin: bool = False  # accept ScatterElements(add) via TensorRT's plugin (not TensorRT-RTX)
    dynamic_profile: str = "1:16:64"  # MIN:OPT:MAX for --dynamic-batch without one
    compute_capabilities: Tuple[str, ...] = ()  # TensorRT-RTX: target GPUs, e.g. ["89", "120"] (fp8 needs >= 8.9)


@dataclass(frozen=True)
class TensorRTQuantization:
    per_channel: bool = True
    op_types: Tuple[str, ...] = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class TensorRTCalibration(Calibration):
    batch: int = 8  # a dynamic-batch build calibrates in batches of this size
    method: Literal["minmax", "percentile", "entropy"] = "minmax"


@dataclass(frozen=True)
class TensorRTValidation(Validation):
    merge_agreement: bool = True  # measure the final token grouping against PyTorch
    min_token_group_agreement: Optional[float] = None  # gate on it (reported only, by default)


@dataclass(frozen=True)
class TensorRTSettings(Settings):
    build: TensorRTBuild = TensorRTBuild()
    quantization: TensorRTQuantization = TensorRTQuantization()
    calibration: TensorRTCalibration = TensorRTCalibration()
    validation: TensorRTValidation = TensorRTValidation()


# Thresholds where a recipe (e.g. a user's --recipe) leaves them out. The final token grouping is measured and
# reported but not gated by default: reduced precision flips near-tied matches and a flip cascades through later
# blocks (random-weight ViT-B/16 r=16: 63% of token groups kept in fp16, 19% in int8, at logit cosine >= 0.996),
# so a recipe gates it only where it sets min_token_group_agreement.
DEFAULT_THRESHOLDS = {
    "fp32": {"max_abs_diff": 1e-4, "min_cosine": 0.99999, "min_top1_agreement": 1.0},
    "fp16": {"min_cosine": 0.999, "min_top1_agreement": 0.875},
    "bf16": {"min_cosine": 0.99, "min_top1_agreement": 0.75},
    "int8": {"min_cosine": 0.98, "min_top1_agreement": 0.75},
    "fp8": {"min_cosine": 0.97, "min_top1_agreement": 0.625},
}


@dataclass(frozen=True)
class EngineOptions(CalibrationOptions):
    dynamic_batch: Optional[str] = field(default=None, metadata={"core": True})  # --dynamic-batch MIN:OPT:MAX
    require_engine: bool = field(default=False, metadata={
        "help": "fail unless the engine is built here (TensorRT needs its Python package and a GPU; TensorRT-RTX "
                "builds on the CPU); without it a missing engine is left to `tome-export engine DIR` (or "
                "build_engine.sh) on the GPU machine"})
    no_engine: bool = field(default=False, metadata={
        "help": "write model.onnx, build_engine.sh and the manifest but no engine, even where one could be built "
                "here; on the GPU machine `tome-export engine DIR` builds, validates and records it"})


@dataclass(frozen=True)
class TensorRTOptions(EngineOptions):
    scatter_plugin: bool = field(default=False, metadata={
        "help": "let --merge-impl gather use TensorRT's ScatterElements plugin"})


def profile_for(plan: BuildPlan) -> Profile:
    """The engine's batch range: the static batch, or --dynamic-batch MIN:OPT:MAX, or the recipe's default."""
    if not plan.dynamic_batch:
        if plan.options.dynamic_batch is not None:
            raise UserError("a MIN:OPT:MAX profile needs --dynamic-batch; with --batch N the engine takes N images")
        return Profile(plan.batch, plan.batch, plan.batch)
    return Profile.parse(plan.options.dynamic_batch or plan.settings.build.dynamic_profile)


def scatter_plugin(plan: BuildPlan, library: Library) -> bool:
    """Whether the graph may keep ScatterElements(add) for TensorRT's plugin (refused for TensorRT-RTX)."""
    wanted = getattr(plan.options, "scatter_plugin", False) or plan.settings.build.scatter_plugin
    if wanted and library.module != "tensorrt":
        raise UserError(f"{library.display} has no plugins, so no ScatterElements plugin: drop --scatter-plugin "
                        f"and use --merge-impl onehot (the default)")
    return wanted


def check(plan: BuildPlan, library: Library) -> None:
    """Cheap checks before any model is loaded."""
    profile_for(plan)
    plugin = scatter_plugin(plan, library)
    if plan.merge_impl == "gather" and not plugin:
        hint = "or add --scatter-plugin (TensorRT's ScatterElements plugin)" if library.module == "tensorrt" else \
            "TensorRT-RTX has no plugins"
        raise UserError(f"--merge-impl gather puts ScatterElements(reduction=add) in the graph, which "
                        f"{library.display} cannot build without a plugin: use --merge-impl onehot, {hint}")
    if plan.options.require_engine and plan.options.no_engine:
        raise UserError("--require-engine and --no-engine contradict each other: choose one")
    if plan.options.require_engine:
        reason = engine_unavailable_reason(library)
        if reason is not None:
            raise UserError(f"--require-engine: no {library.display} engine can be built here: {reason}; "
                            f"drop --require-engine to get the ONNX and build_engine.sh for the target machine")


def _build(ctx: BuildContext, library: Library) -> TargetResult:
    from .build import build

    return build(ctx, library)


def _finish(**kwargs: Any) -> Finished:
    from .handoff import finish

    return finish(**kwargs)


def _target(name: str, library: Library, description: str, options: type, requires: Tuple[str, ...],
            runtime_extra: str, runtime_elsewhere: str = "") -> Target:
    return register(Target(
        name=name, description=description, precisions=PRECISIONS, default_merge_impl="onehot", runner=RUNNER,
        build=lambda ctx: _build(ctx, library), runtime_extra=runtime_extra, runtime_elsewhere=runtime_elsewhere,
        settings=TensorRTSettings, options=options,
        precision_defaults={p: {"validation": limits} for p, limits in DEFAULT_THRESHOLDS.items()},
        check=lambda plan: check(plan, library), requires=requires, install_hint=library.install,
        device="cuda", version_modules=(library.module,), default_precision="fp16",  # fp32: the slowest engine
        finish=_finish))


TENSORRT_TARGET = _target(
    "tensorrt", TENSORRT, "TensorRT (strongly typed): precision-in-graph ONNX + build_engine.sh (trtexec); the engine "
    "too where TensorRT and a GPU are present", TensorRTOptions, (), "cuda",
    "tensorrt from NVIDIA's package index")
TENSORRT_RTX_TARGET = _target(
    "tensorrt-rtx", TENSORRT_RTX, "TensorRT-RTX: precision-in-graph ONNX + a real engine compiled here on the CPU "
    "(no GPU needed)", EngineOptions, ("tensorrt_rtx",), "tensorrt-rtx,cuda")
