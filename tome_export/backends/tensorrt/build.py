"""The build shared by ``--target tensorrt`` and ``--target tensorrt-rtx``.

fp32 ToMe ONNX -> compatibility check -> precision in the graph (fp16/bf16 Casts or int8/fp8 Q/DQ, ToMe nodes
kept float32) -> check again -> validation on the CPU against PyTorch -> ``build_engine.sh`` always, and the
engine itself where the library (and for full TensorRT a GPU) is here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch

from ..._version import __version__
from ...errors import UserError, ValidationError
from ...export import SOURCE_NAME, export_onnx
from ...preprocess import Preprocessing
from ...recipes import Recipe
from ...validate import compare_logits, validation_batches
from .. import BuildContext
from .compat import tensorrt_problems
from .engine import Library, Profile, build_command, build_engine, engine_unavailable_reason, write_build_script
from .precision import convert_float_precision, weight_types
from ...quantize import calibration_batches, protected_node_names
from .qdq import quantize_for_tensorrt
from .validation import HOW_RUN, cpu_runner, source_agreement

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
OPTIONS = ("dynamic_batch", "require_engine", "scatter_plugin", "calib_data")
DEFAULT_PROFILE = "1:16:64"
ENGINE = "model.engine"
SCRIPT = "build_engine.sh"
TIMING_CACHE = "timing.cache"

RECIPE_SCHEMA: Dict[str, Dict[str, Any]] = {
    "build": {
        "keep_fp32": ("tome", "match", "none"),  # ToMe nodes kept float32 in every precision
        "keep_fp32_ops": list,  # op types kept float32 in fp16/bf16 as well
        "optimization_level": int,  # builder optimization level 0..5
        "timing_cache": bool,  # keep TensorRT's timing cache beside the engine (TensorRT-RTX has none)
        "scatter_plugin": bool,  # accept ScatterElements(add) via TensorRT's plugin (not TensorRT-RTX)
        "dynamic_profile": str,  # MIN:OPT:MAX for --dynamic-batch without one
        "compute_capabilities": list,  # TensorRT-RTX: target GPUs, e.g. ["89", "120"] (fp8 needs >= 8.9)
    },
    "quantization": {"per_channel": bool, "op_types": list},
    "calibration": {"images": int, "augment": bool, "seed": int, "method": ("minmax", "percentile", "entropy"),
                    "data_dir": str},
    "validation": {"images": int, "max_abs_diff": float, "min_cosine": float, "min_top1_agreement": float,
                   "merge_agreement": bool, "min_token_group_agreement": float},
}

# Used where a recipe (e.g. a user's --recipe) leaves a threshold out. The final token grouping is measured
# and reported but not gated by default: reduced precision flips near-tied matches and a flip cascades through
# later blocks (random-weight ViT-B/16 r=16: 63% of token groups kept in fp16, 19% in int8, at logit cosine
# >= 0.996), so a recipe gates it only where it sets min_token_group_agreement.
DEFAULT_THRESHOLDS = {
    "fp32": {"max_abs_diff": 1e-4, "min_cosine": 0.99999, "min_top1_agreement": 1.0},
    "fp16": {"min_cosine": 0.999, "min_top1_agreement": 0.875},
    "bf16": {"min_cosine": 0.99, "min_top1_agreement": 0.75},
    "int8": {"min_cosine": 0.98, "min_top1_agreement": 0.75},
    "fp8": {"min_cosine": 0.97, "min_top1_agreement": 0.625},
}


def profile_for(opts: Any, recipe: Recipe) -> Profile:
    """The engine's batch range: the static batch, or --dynamic-batch MIN:OPT:MAX, or the recipe's default."""
    if not opts.dynamic_batch:
        if "dynamic_batch" in opts.extra:
            raise UserError("a MIN:OPT:MAX profile needs --dynamic-batch; with --batch N the engine takes N images")
        return Profile(opts.batch, opts.batch, opts.batch)
    return Profile.parse(str(opts.extra.get("dynamic_batch") or recipe.build.get("dynamic_profile", DEFAULT_PROFILE)))


def _scatter_plugin(opts: Any, recipe: Recipe, library: Library) -> bool:
    wanted = bool(opts.extra.get("scatter_plugin") or recipe.build.get("scatter_plugin", False))
    if wanted and library.module != "tensorrt":
        raise UserError(f"{library.display} has no plugins, so no ScatterElements plugin: drop --scatter-plugin "
                        f"and use --merge-impl onehot (the default)")
    return wanted


def check_options(opts: Any, recipe: Recipe, library: Library) -> None:
    """Cheap checks before any model is loaded."""
    profile_for(opts, recipe)
    plugin = _scatter_plugin(opts, recipe, library)
    merge_impl = opts.merge_impl if opts.merge_impl != "auto" else recipe.merge_impl
    if merge_impl == "gather" and not plugin:
        hint = "or add --scatter-plugin (TensorRT's ScatterElements plugin)" if library.module == "tensorrt" else \
            "TensorRT-RTX has no plugins"
        raise UserError(f"--merge-impl gather puts ScatterElements(reduction=add) in the graph, which "
                        f"{library.display} cannot build without a plugin: use --merge-impl onehot, {hint}")
    calib_data = opts.extra.get("calib_data")
    if calib_data is not None and not Path(calib_data).is_dir():
        raise UserError(f"--calib-data {calib_data!r} is not a directory: pass a folder of JPEG/PNG photos")
    if opts.extra.get("require_engine"):
        reason = engine_unavailable_reason(library)
        if reason is not None:
            raise UserError(f"--require-engine: no {library.display} engine can be built here: {reason}; "
                            f"drop --require-engine to get the ONNX and build_engine.sh for the target machine")


def _check_graph(model: onnx.ModelProto, library: Library, plugin: bool, what: str) -> None:
    problems = tensorrt_problems(model, allow_scatter_plugin=plugin)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"the {what} cannot be built by {library.display}: {problems[0]}{more}")


def tensorrt_graph(
    onnx_path: Path,
    precision: str,
    recipe: Recipe,
    pre: Preprocessing,
    batch: int,
    calib_data: Optional[str] = None,
) -> Tuple[onnx.ModelProto, Dict[str, Any]]:
    """The TensorRT-bound graph of an fp32 ToMe export in ``precision``, and what was done (for the manifest)."""
    model = onnx.load(str(onnx_path))
    keep = protected_node_names(model, recipe.build.get("keep_fp32", "tome"))
    info: Dict[str, Any] = {"precision": precision, "kept_fp32_nodes": len(keep)}
    if precision in ("fp16", "bf16"):
        keep_ops = list(recipe.build.get("keep_fp32_ops", []))
        model = convert_float_precision(model, precision, keep, keep_ops)
        info.update(method=f"float32 -> {precision} conversion in the graph, Casts at the float32 boundaries",
                    kept_fp32_op_types=keep_ops)
    elif precision in ("int8", "fp8"):
        cal = recipe.calibration
        count = int(cal.get("images", 32))
        if count < 1:
            raise UserError(f"calibration.images must be >= 1, got {count}")
        batches = calibration_batches(pre, count, batch, data_dir=calib_data or cal.get("data_dir"),
                                      augment=bool(cal.get("augment", True)), seed=int(cal.get("seed", 0)))
        quant = recipe.quantization
        with tempfile.TemporaryDirectory(prefix="tome-trt-") as tmp:
            out = Path(tmp) / "qdq.onnx"
            summary = quantize_for_tensorrt(
                onnx_path, out, batches, precision, exclude=keep, per_channel=bool(quant.get("per_channel", True)),
                op_types=tuple(quant.get("op_types", ("MatMul", "Gemm", "Conv"))),
                calibrate_method=str(cal.get("method", "minmax")))
            model = onnx.load(str(out))
        info.update(method="explicit Q/DQ", quantization=summary,
                    calibration_data=str(calib_data or cal.get("data_dir") or "bundled sample photos"))
    elif precision != "fp32":
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    info["weights"] = weight_types(model)
    return model, info


def without_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` without the named outputs and every node and initializer only they needed."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    kept_outputs = [o for o in g.output if o.name not in names]
    del g.output[:]
    g.output.extend(kept_outputs)
    needed = {o.name for o in g.output}
    nodes = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            nodes.append(node)
            needed.update(node.input)
    del g.node[:]
    g.node.extend(reversed(nodes))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    infos = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(infos)
    return model


def _reference(model: torch.nn.Module, batches: List[np.ndarray], with_source: bool) -> Tuple[np.ndarray, List[np.ndarray]]:
    logits, sources = [], []
    with torch.no_grad():
        for x in batches:
            t = torch.from_numpy(x)
            if with_source:
                out, source = model.forward_with_source(t)
                sources.append(source.numpy())
            else:
                out = model(t)
            logits.append(out.numpy())
    return np.concatenate(logits), sources


def validate(ctx: BuildContext, graph: onnx.ModelProto, with_source: bool) -> Dict[str, Any]:
    """``graph`` in ONNX Runtime (CPU) vs the PyTorch fp32 ToMe model: logits and (``with_source``: the graph
    has a ``source`` output) the final token grouping."""
    v = ctx.recipe.validation
    limits = {**DEFAULT_THRESHOLDS[ctx.precision], **{k: float(v[k]) for k in v if k.startswith(("min_", "max_"))}}
    batches = validation_batches(ctx.preprocessing, ctx.batch, ctx.dynamic_batch, int(v.get("images", ctx.options.validation_images)))
    ref_logits, ref_sources = _reference(ctx.model, batches, with_source)
    run = cpu_runner(graph, ctx.precision)
    outputs = [run(x) for x in batches]
    metrics = compare_logits(ref_logits, np.concatenate([o[0] for o in outputs]))
    result: Dict[str, Any] = {"backend": "onnxruntime", "precision_ran": HOW_RUN[ctx.precision], **metrics}
    if with_source:
        result.update(source_agreement(ref_sources, [o[1] for o in outputs]))
    checks = {
        "max_abs_diff": lambda lim: metrics["max_abs_diff"] <= lim,
        "min_cosine": lambda lim: metrics["min_cosine"] >= lim,
        "min_top1_agreement": lambda lim: metrics["top1_agreement"] >= lim,
        "min_token_group_agreement": lambda lim: result.get("token_group_agreement", 1.0) >= lim,
    }
    failed = [f"{k} {lim:g}" for k, lim in limits.items() if k in checks and not checks[k](lim)]
    result["thresholds"] = limits
    result["passed"] = not failed
    if failed:
        raise ValidationError(
            f"the {ctx.precision} TensorRT graph run in ONNX Runtime misses the recipe's thresholds ({', '.join(failed)}): "
            f"cosine {metrics['min_cosine']:.5f}, top-1 agreement {metrics['top1_agreement']:.3f}, max |diff| "
            f"{metrics['max_abs_diff']:.3g}, token groups {result.get('token_group_agreement', 1.0):.3f}; nothing was written")
    return result


def build(ctx: BuildContext, library: Library) -> Dict[str, Any]:
    opts, recipe, settings = ctx.options, ctx.recipe, ctx.recipe.build
    check_options(opts, recipe, library)
    profile = profile_for(opts, recipe)
    plugin = _scatter_plugin(opts, recipe, library)
    calib_data = opts.extra.get("calib_data")
    _check_graph(onnx.load(str(ctx.onnx_path)), library, plugin, "exported fp32 graph")
    calib_batch = ctx.batch if not ctx.dynamic_batch else 8
    traced = bool(opts.trace_source)
    with_source = traced or (bool(recipe.validation.get("merge_agreement", True)) and any(ctx.schedule.r)
                             and hasattr(ctx.model, "forward_with_source"))
    with tempfile.TemporaryDirectory(prefix="tome-trt-") as tmp:
        source_path = ctx.onnx_path
        if with_source and not traced:
            # To compare merge decisions, convert an export that also outputs the source map; what ships is
            # that validated graph without the source output (and the nodes only it needed).
            ctx.log("exporting the source-tracing twin for merge-decision validation")
            source_path = export_onnx(ctx.model, Path(tmp) / "source.onnx", ctx.preprocessing.input_size,
                                      batch=ctx.batch, dynamic_batch=ctx.dynamic_batch, opset=opts.opset,
                                      trace_source=True)
        ctx.log(f"{ctx.precision}: precision in the graph")
        graph, precision_info = tensorrt_graph(source_path, ctx.precision, recipe, ctx.preprocessing, calib_batch, calib_data)
    _check_graph(graph, library, plugin, f"{ctx.precision} graph")
    ctx.log("validating in ONNX Runtime against PyTorch")
    validation = validate(ctx, graph, with_source)
    if with_source and not traced:
        graph = without_outputs(graph, [SOURCE_NAME])
        validation["merge_agreement_graph"] = "the shipped graph plus its source output (same conversion)"
    onnx.save_model(graph, str(ctx.onnx_path))  # model.onnx is now the graph the engine is built from

    level = int(settings.get("optimization_level", 3))
    caps = [str(c) for c in settings.get("compute_capabilities", [])]
    cache = TIMING_CACHE if library.timing_cache and settings.get("timing_cache", True) else None
    input_name = graph.graph.input[0].name
    image_shape = ctx.preprocessing.input_size
    command = build_command(library, ctx.onnx_path.name, ENGINE, input_name, image_shape, profile,
                            optimization_level=level, timing_cache=cache, compute_capabilities=caps)
    write_build_script(ctx.workdir / SCRIPT, library, command, f"{ctx.precision} ({precision_info.get('method', 'float32')})",
                       __version__)
    reason = engine_unavailable_reason(library)
    engine: Optional[Dict[str, Any]] = None
    if reason is None:
        ctx.log(f"building the {library.display} engine")
        engine = build_engine(library, ctx.onnx_path, ctx.workdir / ENGINE, input_name, image_shape, profile,
                              optimization_level=level, timing_cache=ctx.workdir / cache if cache else None,
                              compute_capabilities=caps)
        note = f"engine {ENGINE} built with {library.display} {engine['library_version']} " \
               f"({engine['bytes'] / 1e6:.1f} MB, {engine['build_seconds']} s)"
        if library.builds_without_gpu:
            note += "; kernels are compiled for the GPU on first run"
    elif opts.extra.get("require_engine"):
        raise UserError(f"--require-engine: no {library.display} engine can be built here: {reason}")
    else:
        note = f"engine NOT built here ({reason}): it must be built on the target GPU machine: " \
               f"copy this directory there and run ./{SCRIPT}"
    notes = [note]
    if validation.get("token_group_agreement", 1.0) < 1.0:
        notes.append(f"merge decisions: {validation['token_group_agreement']:.1%} of final token groups and "
                     f"{validation['source_images_identical']:.0%} of images as in PyTorch ToMe ({ctx.precision} "
                     f"rounding flips near-tied matches; logits are validated by cosine and top-1)")
    return {
        "validation": validation,
        "tensorrt": {
            "library": library.module,
            "onnx": ctx.onnx_path.name,
            "precision_in_graph": precision_info,
            "compatibility": {"problems": [], "scatter_plugin": plugin},
            "profile": {"input": input_name, **profile.to_dict()},
            "optimization_level": level,
            "build_script": SCRIPT,
            "build_command": " ".join(command),
            "engine_built": engine is not None,
            "engine": engine,
            "engine_note": note,
        },
        "notes": notes,
    }
