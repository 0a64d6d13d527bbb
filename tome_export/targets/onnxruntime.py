"""Target ``onnxruntime``: the ToMe graph for ONNX Runtime's CPU provider in fp32, fp16, bf16 or int8.

Steps, each set by the recipe:

1. precision: none (fp32), fp16 conversion, bf16 weight storage, or int8 quantization (dynamic, or static Q/DQ
   calibrated on real photos); the ToMe nodes named by ``build.keep_fp32`` stay fp32 (by name);
2. offline graph optimisation at ``build.saved_optimization``. ``extended`` fusions (LayerNorm, GELU,
   MatMul+Add, int8 MatMul kernels) are ONNX Runtime contrib ops that run on any CPU. ``all`` would add NCHWc
   layouts tuned to the building CPU's vector width, and ONNX Runtime warns that such a file is
   hardware-specific, so the runner applies ``all`` at load time instead (``build.session_optimization``);
3. validation against PyTorch through the runner itself; merge decisions with and without protection; and what
   actually ran, read from ONNX Runtime's profiler (the element type each matmul-like kernel received).

Artifacts run with :class:`tome_export.runtime.onnxruntime.OnnxRuntimeRunner`.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError, ValidationError
from ..onnx_files import copy_onnx, data_files, data_location, move_onnx, save_onnx
from ..quality.calibration import Calibration
from ..quality.decisions import artifact_merge_decisions, decision_output_names, decision_tensors
from .base import (BuildContext, BuildPlan, CalibrationOptions, Settings, Target, TargetResult, Validation)
from . import register

if TYPE_CHECKING:
    import onnx

Level = Literal["disabled", "basic", "extended", "all"]
Method = Literal["none", "float16", "bf16_weights", "dynamic", "static_qdq"]
RUNNER = "tome_export.runtime.onnxruntime:OnnxRuntimeRunner"


@dataclass(frozen=True)
class OrtBuild:
    saved_optimization: Level = "extended"  # graph optimisation saved into the file (portable up to extended)
    session_optimization: Level = "all"  # applied by the runner when it loads the file
    keep_fp32: Literal["tome", "match", "none"] = "tome"
    fp32_op_types: Tuple[str, ...] = ()  # op types the fp16 conversion leaves in fp32 (besides protection)


@dataclass(frozen=True)
class OrtQuantization:
    """How the precision is made; per_channel and op_types default per method (:data:`METHOD_DEFAULTS`)."""

    method: Method = "none"
    per_channel: Optional[bool] = None
    reduce_range: bool = False
    weight_type: Literal["int8", "uint8"] = "int8"
    activation_type: Literal["int8", "uint8"] = "int8"
    symmetric_activations: bool = True
    symmetric_weights: bool = True
    op_types: Optional[Tuple[str, ...]] = None
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    preprocess: bool = True

    def for_method(self) -> "OrtQuantization":
        """These settings with the method's defaults filled in."""
        defaults = METHOD_DEFAULTS.get(self.method, {})
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "dynamic": {"per_channel": False, "op_types": ("MatMul",)},
    "static_qdq": {"per_channel": True, "op_types": ("MatMul", "Gemm", "Conv")},
}


@dataclass(frozen=True)
class CpuValidation(Validation):
    compare_unprotected: bool = True  # also measure merge decisions of the build without fp32 protection


@dataclass(frozen=True)
class OrtSettings(Settings):
    build: OrtBuild = OrtBuild()
    quantization: OrtQuantization = OrtQuantization()
    calibration: Calibration = Calibration()
    validation: CpuValidation = CpuValidation()


NOTES = {
    "fp16": "ONNX Runtime's CPU provider gains nothing from fp16: it has no fast fp16 matmul kernels on x86, so "
            "it inserts Casts and runs the matmuls in fp32 (see precision_ran); use int8 (or openvino) for speed",
    "bf16": "ONNX Runtime's CPU provider has no bf16 compute kernels (MatMul, Add, Softmax): weights are stored "
            "as bf16 (half the file) and upcast to fp32 when the session loads, so it computes in fp32 with "
            "bf16-rounded weights and is no faster; use openvino bf16 or int8 for speed",
}

SAVE_REASONS = {
    "extended": "ORT's portable fusions (contrib ops any CPU runs); the CPU-specific 'all' level (NCHWc layouts "
                "for this CPU's vector width, which ORT marks hardware-specific) is applied when the runner loads it",
    "basic": "standard-ONNX rewrites only; the runner applies its session level at load time",
    "disabled": "saved as converted (an optimised save would constant-fold the bf16 weights' upcasts back to fp32)",
    "all": "optimised for the building CPU: ORT warns such a file is hardware-specific; load it only there",
}

# Kernels that do the bulk of a ViT's arithmetic; the int8 ones are ONNX Runtime's quantized kernels.
INT8_KERNELS = {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm",
                "QLinearConv", "ConvInteger", "QAttention"}
FLOAT_KERNELS = {"MatMul", "FusedMatMul", "Gemm", "Conv", "Attention"}
ELEMENT_TYPES = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16"}


# --- precision steps: (source onnx, destination onnx, context, nodes kept fp32) -> manifest details -------------


def _fp32(src: Path, dst: Path, ctx: BuildContext, keep: Sequence[str]) -> Dict[str, Any]:
    copy_onnx(src, dst)
    return {}


def _fp16(src: Path, dst: Path, ctx: BuildContext, keep: Sequence[str]) -> Dict[str, Any]:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    from ..float_precision import convert_float_precision

    # Op types the CPU provider cannot run in fp16 at all (ScatterElements with reduction=add; ORT's own list of
    # ops without fp16 kernels) stay fp32 even without ToMe protection, or the artifact would not run.
    fp32_ops = list(ctx.settings.build.fp32_op_types)
    model = convert_float_precision(onnx.load(str(src)), "fp16", keep, [*fp32_ops, *DEFAULT_OP_BLOCK_LIST])
    save_onnx(model, dst)
    return {"method": "fp16 conversion in the graph, Casts at the fp32 boundaries, fp32 inputs and outputs",
            "fp32_op_types": fp32_ops}


def _bf16_weights(src: Path, dst: Path, ctx: BuildContext, keep: Sequence[str]) -> Dict[str, Any]:
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    consumers = {i for n in model.graph.node if n.op_type in FLOAT_KERNELS for i in n.input}
    casts, stored = [], 0
    for tensor in model.graph.initializer:
        if tensor.name not in consumers or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        weights = numpy_helper.to_array(tensor).astype(ml_dtypes.bfloat16)  # round to nearest even
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(weights, f"{name}.bf16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}.bf16"], [name], name=f"{name}.to_fp32",
                                           to=onnx.TensorProto.FLOAT))
        stored += weights.size
    for i, cast in enumerate(casts):  # before every consumer: topological order stays valid
        model.graph.node.insert(i, cast)
    save_onnx(model, dst)
    return {"method": "bf16 weight storage (matmul and conv weights), fp32 compute", "bf16_weights": int(stored)}


def _quantize_dynamic(src: Path, dst: Path, ctx: BuildContext, keep: Sequence[str]) -> Dict[str, Any]:
    from ..quantization import quantize_dynamic_int8

    q = ctx.settings.quantization.for_method()
    settings = {"per_channel": q.per_channel, "reduce_range": q.reduce_range, "weight_type": q.weight_type,
                "op_types": list(q.op_types)}
    quantize_dynamic_int8(src, dst, exclude=keep, preprocess=q.preprocess, **settings)
    return {"method": "dynamic (onnxruntime quantize_dynamic): int8 weights, activations quantized per batch",
            **settings}


def _quantize_static(src: Path, dst: Path, ctx: BuildContext, keep: Sequence[str]) -> Dict[str, Any]:
    from ..quantization import quantize_qdq
    from ._shared import calibration

    q = ctx.settings.quantization.for_method()
    batches, calib = calibration(ctx)
    settings = {"per_channel": q.per_channel, "reduce_range": q.reduce_range, "activation_type": q.activation_type,
                "weight_type": q.weight_type, "symmetric_activations": q.symmetric_activations,
                "symmetric_weights": q.symmetric_weights, "op_types": list(q.op_types),
                "calibrate_method": q.calibrate_method}
    quantize_qdq(src, dst, batches, exclude=keep, preprocess=q.preprocess, **settings)
    return {"method": "static Q/DQ (onnxruntime quantize_static) calibrated on real photos", **settings,
            "calibration": calib}


Step = Callable[[Path, Path, BuildContext, Sequence[str]], Dict[str, Any]]
# precision -> {method: (step, whether the step can touch ToMe nodes, i.e. whether protection changes the graph)}
STEPS: Dict[str, Dict[str, Tuple[Step, bool]]] = {
    "fp32": {"none": (_fp32, False)},
    "fp16": {"float16": (_fp16, True)},
    "bf16": {"bf16_weights": (_bf16_weights, False)},
    "int8": {"dynamic": (_quantize_dynamic, True), "static_qdq": (_quantize_static, True)},
}
DEFAULT_METHOD = {"fp32": "none", "fp16": "float16", "bf16": "bf16_weights", "int8": "dynamic"}


class _Converter:
    """Makes the artifact's graph from the exported one: the precision step, the check that protected nodes were
    left alone, and the offline graph optimisation."""

    def __init__(self, ctx: BuildContext, source: Path, scratch: Path, protected: Sequence[str]) -> None:
        self.ctx, self.source, self.scratch, self.protected = ctx, source, scratch, list(protected)
        self.step, self.touches_tome = STEPS[ctx.precision][ctx.settings.quantization.method]

    def convert(self, keep: Sequence[str], dst: Path) -> Dict[str, Any]:
        import onnx

        from ..quantization import quantized_protected_nodes

        converted = self.scratch / f"converted-{len(keep)}.onnx"
        details = self.step(self.source, converted, self.ctx, keep)
        if self.ctx.precision == "int8":  # check the exclusion really happened (and, unprotected, what got quantized)
            touched = quantized_protected_nodes(onnx.load(str(converted), load_external_data=False), self.protected)
            if keep and touched["replaced"]:
                raise RuntimeError(f"quantization replaced protected ToMe nodes: {touched['replaced'][:5]}")
            details["tome_nodes_quantized"] = len(touched["replaced"])
            details["tome_nodes_reading_int8"] = len(touched["reading_int8"])
        details["tome_nodes_kept_fp32"] = len(keep)
        _save_optimized(converted, dst, self.ctx.settings.build.saved_optimization)
        return details


def _save_optimized(src: Path, dst: Path, level: str) -> None:
    if level == "disabled":
        copy_onnx(src, dst)
        return
    import onnxruntime as ort

    from ..runtime.onnxruntime import session_options

    opts = session_options(level)
    opts.optimized_model_filepath = str(dst)
    if data_files(src):  # too big for one file: ORT writes the optimised weights to one data file beside it
        (dst.parent / data_location(dst)).unlink(missing_ok=True)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_location(dst))
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def precision_ran(events: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """What ONNX Runtime really executed (from its profiler's events): matmul-like kernels by the element type
    they read, and the Casts."""
    kernels: Counter = Counter()
    casts = 0
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or "op_name" not in args:
            continue
        op = args["op_name"]
        casts += op == "Cast"
        if op in INT8_KERNELS:
            kernels["int8"] += 1
        elif op in FLOAT_KERNELS:
            first = next(iter(args.get("input_type_shape", [{}])[0]), "float")
            kernels[ELEMENT_TYPES.get(first, first)] += 1
    total = sum(kernels.values())
    summary = ", ".join(f"{n} {t}" for t, n in kernels.most_common())
    return {"summary": f"matmul-like kernels: {summary} (of {total})", "matmul_like_kernels": dict(kernels),
            "casts_executed": casts}


def _runtime(ctx: BuildContext, file: str = "model.onnx") -> Dict[str, Any]:
    return {"file": file, "session_optimization": ctx.settings.build.session_optimization}


def build(ctx: BuildContext) -> TargetResult:
    import onnx

    from ..quantization import protected_node_names
    from ..runtime.onnxruntime import OnnxRuntimeRunner
    from ._shared import merge_decisions, validate

    keep_fp32, method = ctx.settings.build.keep_fp32, ctx.settings.quantization.method
    exported = onnx.load(str(ctx.onnx_path), load_external_data=False)  # names and shapes only
    protected, tensors = protected_node_names(exported, keep_fp32), decision_tensors(exported)
    runtime = _runtime(ctx)
    with tempfile.TemporaryDirectory(prefix="tome-ort-") as tmp:
        source = Path(tmp) / "exported.onnx"
        move_onnx(ctx.onnx_path, source)
        converter = _Converter(ctx, source, Path(tmp), protected)
        if method != "none":  # fp32: nothing to convert
            ctx.log(f"{ctx.precision}: {method}")
        details = converter.convert(protected, ctx.workdir / "model.onnx")
        with OnnxRuntimeRunner(ctx.artifact_io(runtime)) as runner:
            try:
                validation = validate(ctx, runner, f"ONNX Runtime {ctx.precision} ({method})")
            except ValidationError:  # the export goes back where --keep-failed looks for it
                move_onnx(source, ctx.onnx_path)
                raise
            ran = precision_ran(runner.profile(ctx.validation_batches(dynamic=False)[0]))

        def measure(directory: Path, file: str, batches: List[np.ndarray]):
            io = ctx.artifact_io(_runtime(ctx, file), directory)
            with OnnxRuntimeRunner(io, extra_outputs=decision_output_names(tensors)) as runner:
                return artifact_merge_decisions(runner.infer, tensors, batches)

        def without_protection(batches: List[np.ndarray]):
            facts = converter.convert([], Path(tmp) / "unprotected.onnx")
            keys = ("tome_nodes_quantized", "tome_nodes_reading_int8")
            return measure(Path(tmp), "unprotected.onnx", batches), {k: facts[k] for k in keys if k in facts}

        decisions = merge_decisions(ctx, lambda b: measure(ctx.workdir, "model.onnx", b), keep_fp32,
                                    converter.touches_tome, without_protection)
    saved = ctx.settings.build.saved_optimization
    sections = {"saved_optimization": saved, "saved_optimization_reason": SAVE_REASONS.get(saved, ""),
                "precision_step": {"method": method, "keep_fp32": keep_fp32, **details}, "precision_ran": ran}
    return TargetResult(runtime=runtime, validation={"backend": "onnxruntime", "precision_ran": ran["summary"],
                                                     **validation},
                        notes=tuple([NOTES[ctx.precision]] if ctx.precision in NOTES else []),
                        merge_decisions=decisions, sections=sections)


def check(plan: BuildPlan) -> None:
    method = plan.settings.quantization.method
    if method not in STEPS[plan.precision]:
        raise UserError(f"recipe quantization.method {method!r} does not make {plan.precision}: "
                        f"choose {', '.join(STEPS[plan.precision])}")


TARGET = register(Target(
    name="onnxruntime",
    description="ONNX Runtime CPU: fp32 (optimised graph), int8 (dynamic or static Q/DQ), fp16/bf16 (no speed-up)",
    precisions=("fp32", "bf16", "fp16", "int8"),
    default_merge_impl="gather",
    runner=RUNNER,
    build=build,
    settings=OrtSettings,
    options=CalibrationOptions,
    precision_defaults={p: {"quantization": {"method": m}} for p, m in DEFAULT_METHOD.items()},
    check=check,
    runtime_extra="onnxruntime",
    requires=("onnxruntime",),
    install_hint="pip install 'tome-export[onnxruntime]'",
    version_modules=("onnxruntime",),
))
