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
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
import onnx

from ..errors import UserError
from ..quantize import (artifact_merge_decisions, decision_tensors, image_files, protected_node_names,
                        quantize_dynamic_int8, quantize_qdq, quantized_protected_nodes, with_decision_outputs)
from ..runtime.onnxruntime import LEVELS, OnnxRuntimeRunner, create_session, session_options
from . import BuildContext, Target, register
from .common import (CALIBRATION_SCHEMA, KEEP_FP32_CHOICES, VALIDATION_SCHEMA, calibration, decision_batches,
                     merge_decision_report, runner_manifest, validate)

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
    shutil.copyfile(src, dst)
    return {}


def _drop_duplicate_nodes(model: onnx.ModelProto) -> None:
    """ORT's fp16 converter emits the same fp32 Cast once per blocked consumer; ONNX forbids the duplicates."""
    seen, kept = set(), []
    for node in model.graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _collapse_round_trips(model: onnx.ModelProto, keep: Sequence[str]) -> int:
    """Remove the fp32 -> fp16 -> fp32 Cast pairs that ORT's converter puts between two blocked nodes.

    The converter casts every blocked node's output to fp16 and back before the next blocked node reads it, so
    a kept-fp32 chain (the ToMe matching path) would still be rounded to fp16 at every step. Consumers of such a
    pair read the fp32 tensor directly instead. Returns how many pairs were removed.
    """
    kept = set(keep)
    producer = {out: n for n in model.graph.node for out in n.output}
    rewire: Dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "Cast" or node.attribute[0].i != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Cast" or first.attribute[0].i != onnx.TensorProto.FLOAT16:
            continue
        origin = producer.get(first.input[0])
        if origin is not None and origin.name in kept:
            rewire[node.output[0]] = first.input[0]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    nodes = [n for n in model.graph.node if not (n.op_type == "Cast" and not any(o in used for o in n.output))]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(rewire)


def _fp16(src: Path, dst: Path, ctx: BuildContext, keep: Sequence[str]) -> Dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Op types the CPU provider cannot run in fp16 at all (ScatterElements with reduction=add) stay fp32 even
    # without ToMe protection, or the artifact would not run.
    fp32_ops = list(ctx.recipe.build.get("fp32_op_types", []))
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, node_block_list=list(keep),
                                     op_block_list=fp32_ops)
    _drop_duplicate_nodes(model)
    _collapse_round_trips(model, keep)
    onnx.save(model, str(dst))
    return {"method": "fp16 (onnxruntime.transformers.float16), fp32 inputs and outputs", "fp32_op_types": fp32_ops}


def _bf16_weights(src: Path, dst: Path, ctx: BuildContext, keep: Sequence[str]) -> Dict[str, Any]:
    import ml_dtypes
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
    onnx.save(model, str(dst))
    return {"method": "bf16 weight storage (matmul and conv weights), fp32 compute", "bf16_weights": int(stored)}


def _quantize_dynamic(src: Path, dst: Path, ctx: BuildContext, keep: Sequence[str]) -> Dict[str, Any]:
    q = ctx.recipe.quantization
    settings = {"per_channel": bool(q.get("per_channel", False)), "reduce_range": bool(q.get("reduce_range", False)),
                "weight_type": q.get("weight_type", "int8"), "op_types": list(q.get("op_types", ["MatMul"]))}
    quantize_dynamic_int8(src, dst, exclude=keep, preprocess=bool(q.get("preprocess", True)), **settings)
    return {"method": "dynamic (onnxruntime quantize_dynamic): int8 weights, activations quantized per batch",
            **settings}


def _quantize_static(src: Path, dst: Path, ctx: BuildContext, keep: Sequence[str]) -> Dict[str, Any]:
    q = ctx.recipe.quantization
    batches, calib = calibration(ctx)
    settings = {"per_channel": bool(q.get("per_channel", True)), "reduce_range": bool(q.get("reduce_range", False)),
                "activation_type": q.get("activation_type", "int8"), "weight_type": q.get("weight_type", "int8"),
                "symmetric_activations": bool(q.get("symmetric_activations", True)),
                "symmetric_weights": bool(q.get("symmetric_weights", True)),
                "op_types": list(q.get("op_types", ["MatMul", "Gemm", "Conv"])),
                "calibrate_method": q.get("calibrate_method", "minmax")}
    quantize_qdq(src, dst, batches, exclude=keep, preprocess=bool(q.get("preprocess", True)), **settings)
    return {"method": "static Q/DQ (onnxruntime quantize_static) calibrated on real photos", **settings,
            "calibration": calib}


# precision -> {method: (step, whether the step can touch ToMe nodes, i.e. whether protection changes the graph)}
STEPS: Dict[str, Dict[str, tuple]] = {
    "fp32": {"none": (_fp32, False)},
    "fp16": {"float16": (_fp16, True)},
    "bf16": {"bf16_weights": (_bf16_weights, False)},
    "int8": {"dynamic": (_quantize_dynamic, True), "static_qdq": (_quantize_static, True)},
}
DEFAULT_METHOD = {"fp32": "none", "fp16": "float16", "bf16": "bf16_weights", "int8": "dynamic"}


def _method(precision: str, recipe) -> str:
    method = recipe.quantization.get("method", DEFAULT_METHOD[precision])
    if method not in STEPS[precision]:
        raise UserError(f"recipe quantization.method {method!r} does not make {precision}: "
                        f"choose {', '.join(STEPS[precision])}")
    return method


def _save_optimized(src: Path, dst: Path, level: str) -> None:
    if level == "disabled":
        shutil.copyfile(src, dst)
        return
    opts = session_options(level)
    opts.optimized_model_filepath = str(dst)
    import onnxruntime as ort

    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])


def _precision_ran(path: Path, optimization: str, batch: np.ndarray) -> Dict[str, Any]:
    """What ONNX Runtime really executed: matmul-like kernels by the element type they read, and the Casts."""
    with tempfile.TemporaryDirectory(prefix="tome-ort-profile-") as tmp:
        opts = session_options(optimization)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: batch})
        events = json.loads(Path(session.end_profiling()).read_text())
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


def _decision_runner(path: Path, optimization: str, tensors) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    model = with_decision_outputs(onnx.load(str(path)), tensors)
    session = create_session(model.SerializeToString(), optimization)
    names = [o.name for o in session.get_outputs()]
    return lambda x: dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))


def build(ctx: BuildContext) -> Dict[str, Any]:
    settings = ctx.recipe.build
    precision, method = ctx.precision, _method(ctx.precision, ctx.recipe)
    step, touches_tome = STEPS[precision][method]
    keep_fp32 = settings.get("keep_fp32", "tome")
    saved, session_level = settings.get("saved_optimization", "extended"), settings.get("session_optimization", "all")
    exported = onnx.load(str(ctx.onnx_path))
    protected = protected_node_names(exported, keep_fp32)
    tensors = decision_tensors(exported)
    artifact = ctx.workdir / "model.onnx"

    with tempfile.TemporaryDirectory(prefix="tome-ort-") as tmp:
        tmp = Path(tmp)
        source = tmp / "exported.onnx"
        shutil.move(str(ctx.onnx_path), source)

        def make(keep: Sequence[str], dst: Path) -> Dict[str, Any]:
            converted = tmp / f"converted-{len(keep)}.onnx"
            details = step(source, converted, ctx, keep)
            if precision == "int8":  # check the exclusion really happened (and, unprotected, what got quantized)
                touched = quantized_protected_nodes(onnx.load(str(converted)), protected)
                if keep and touched["replaced"]:
                    raise RuntimeError(f"quantization replaced protected ToMe nodes: {touched['replaced'][:5]}")
                details["tome_nodes_quantized"] = len(touched["replaced"])
                details["tome_nodes_reading_int8"] = len(touched["reading_int8"])
            details["tome_nodes_kept_fp32"] = len(keep)
            _save_optimized(converted, dst, saved)
            return details

        ctx.log(f"{precision}: {method}")
        details = make(protected, artifact)
        runtime = {"file": "model.onnx", "session_optimization": session_level}
        runner = OnnxRuntimeRunner(ctx.workdir, runner_manifest(ctx, runtime))
        validation = validate(ctx, runner, f"ONNX Runtime {precision} ({method})")
        ran = _precision_ran(artifact, session_level, decision_batches(ctx)[0])
        unprotected: Dict[str, Any] = {}

        def measure(with_protection: bool, batches: List[np.ndarray]):
            path = artifact
            if not with_protection:
                path = tmp / "unprotected.onnx"
                unprotected.update(make([], path))
            return artifact_merge_decisions(_decision_runner(path, session_level, tensors), tensors, batches)

        decisions = merge_decision_report(ctx, measure, keep_fp32, touches_tome)
        if isinstance(decisions.get("without_protection"), dict) and "tome_nodes_quantized" in unprotected:
            decisions["without_protection"]["tome_nodes_quantized"] = unprotected["tome_nodes_quantized"]
            decisions["without_protection"]["tome_nodes_reading_int8"] = unprotected["tome_nodes_reading_int8"]

    notes = [NOTES[precision]] if precision in NOTES else []
    return {
        "runtime": runtime,
        "saved_optimization": saved,
        "saved_optimization_reason": SAVE_REASONS.get(saved, ""),
        "precision_step": {"method": method, "keep_fp32": keep_fp32, **details},
        "precision_ran": ran,
        "validation": {"backend": "onnxruntime", "precision_ran": ran["summary"], **validation},
        "merge_decisions": decisions,
        "notes": notes,
    }


def check(opts, recipe) -> None:
    _method(recipe.precision, recipe)
    if opts.extra.get("calib_data") is not None:
        image_files(opts.extra["calib_data"])


TARGET = register(Target(
    name="onnxruntime",
    description="ONNX Runtime CPU: fp32 (optimised graph), int8 (dynamic or static Q/DQ), fp16/bf16 (no speed-up)",
    precisions=("fp32", "bf16", "fp16", "int8"),
    default_merge_impl="gather",
    build=build,
    requires=("onnxruntime",),
    recipe_schema={
        "build": {"saved_optimization": LEVELS, "session_optimization": LEVELS, "keep_fp32": KEEP_FP32_CHOICES,
                  "fp32_op_types": list},
        "quantization": {"method": ("none", "float16", "bf16_weights", "dynamic", "static_qdq"),
                         "per_channel": bool, "reduce_range": bool, "weight_type": ("int8", "uint8"),
                         "activation_type": ("int8", "uint8"), "symmetric_activations": bool,
                         "symmetric_weights": bool, "op_types": list,
                         "calibrate_method": ("minmax", "entropy", "percentile"), "preprocess": bool},
        "calibration": CALIBRATION_SCHEMA,
        "validation": VALIDATION_SCHEMA,
    },
    options=("calib_data",),
    check=check,
))
