"""The build shared by ``--target tensorrt`` and ``--target tensorrt-rtx``.

fp32 ToMe ONNX -> compatibility check -> precision in the graph (fp16/bf16 Casts or int8/fp8 Q/DQ, ToMe nodes
kept float32) -> check again -> validation on the CPU against PyTorch -> ``build_engine.sh`` always, and the
engine itself where the library (and for full TensorRT a GPU) is here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import onnx

from ..._version import __version__
from ...errors import UserError
from ...float_precision import convert_float_precision, weight_types
from ...graph_names import SOURCE_NAME
from ...onnx_files import carry_metadata, save_onnx
from ...preprocess import Preprocessing
from ...quality.calibration import calibrate
from ...quality.validate import validate_against_torch
from ...quantization import protected_node_names
from ..base import BuildContext, TargetResult
from . import PRECISIONS, TensorRTSettings, profile_for, scatter_plugin
from .compat import tensorrt_problems
from .engine import (ENGINE, ONNX, SCRIPT, TIMING_CACHE, EngineSpec, Library, Profile, engine_note,
                     engine_unavailable_reason, write_build_script)
from .qdq import quantize_for_tensorrt
from .validation import HOW_RUN, cpu_runner


def _check_graph(model: onnx.ModelProto, library: Library, plugin: bool, what: str) -> None:
    problems = tensorrt_problems(model, allow_scatter_plugin=plugin)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"the {what} cannot be built by {library.display}: {problems[0]}{more}")


def _quantized(onnx_path: Path, precision: str, settings: TensorRTSettings, pre: Preprocessing,
               batch: Optional[int], calib_data: Optional[str], keep: Sequence[str]) -> Tuple[onnx.ModelProto, Dict]:
    """The int8/fp8 Q/DQ graph and what was done."""
    batches, calibration = calibrate(settings.calibration, pre, batch, calib_data)
    quant = settings.quantization
    with tempfile.TemporaryDirectory(prefix="tome-trt-") as tmp:
        out = Path(tmp) / "qdq.onnx"
        summary = quantize_for_tensorrt(onnx_path, out, batches, precision, exclude=keep,
                                        per_channel=quant.per_channel, op_types=quant.op_types,
                                        calibrate_method=settings.calibration.method)
        model = onnx.load(str(out))
    return model, {"method": "explicit Q/DQ", "quantization": summary, "calibration": calibration}


def tensorrt_graph(onnx_path: Path, precision: str, settings: TensorRTSettings, pre: Preprocessing,
                   batch: Optional[int], calib_data: Optional[str] = None) -> Tuple[onnx.ModelProto, Dict[str, Any]]:
    """The TensorRT-bound graph of an fp32 ToMe export in ``precision``, and what was done (for the manifest).

    ``batch``: the static batch calibration runs at (None: the recipe's calibration batch).
    """
    model = onnx.load(str(onnx_path))
    keep = protected_node_names(model, settings.build.keep_fp32)
    info: Dict[str, Any] = {"precision": precision, "kept_fp32_nodes": len(keep)}
    if precision in ("fp16", "bf16"):
        keep_ops = list(settings.build.keep_fp32_ops)
        model = convert_float_precision(model, precision, keep, keep_ops)
        info.update(method=f"float32 -> {precision} conversion in the graph, Casts at the float32 boundaries",
                    kept_fp32_op_types=keep_ops)
    elif precision in ("int8", "fp8"):
        model, done = _quantized(onnx_path, precision, settings, pre, batch, calib_data, keep)
        info.update(done)
    elif precision != "fp32":
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    info["weights"] = weight_types(model)
    return model, info


def without_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` without the named outputs and every node and initializer only they needed."""
    from onnx.utils import Extractor

    stored = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in stored]
    outputs = [o.name for o in model.graph.output if o.name not in names]
    pruned = Extractor(model).extract_model(inputs, outputs)
    pruned.graph.name = model.graph.name
    pruned.producer_name, pruned.producer_version = model.producer_name, model.producer_version
    carry_metadata(model, pruned)  # the extractor drops the model's own metadata
    return pruned


def validate(ctx: BuildContext, graph: onnx.ModelProto, with_source: bool) -> Dict[str, Any]:
    """``graph`` in ONNX Runtime (CPU) vs the PyTorch fp32 ToMe model: the task's outputs and (``with_source``: the
    graph has a ``source`` output) the final token grouping, against the recipe's thresholds."""
    outputs = ctx.plan.task.outputs + ((SOURCE_NAME,) if with_source else ())
    io = ctx.artifact_io({}, outputs=outputs)
    with cpu_runner(graph, ctx.precision, io) as runner:
        checked = validate_against_torch(ctx.model, runner.infer, ctx.validation_batches(),
                                         ctx.settings.validation.thresholds(),
                                         f"the {ctx.precision} TensorRT graph run in ONNX Runtime", with_source)
    return {"backend": "onnxruntime", "precision_ran": HOW_RUN[ctx.precision], **checked}


def _graph(ctx: BuildContext, library: Library, plugin: bool) -> Tuple[onnx.ModelProto, Dict, Dict[str, Any]]:
    """The validated TensorRT-bound graph, what was done to it, and its validation."""
    traced = ctx.plan.trace_source
    with_source = traced or (ctx.settings.validation.merge_agreement and any(ctx.schedule.r)
                             and hasattr(ctx.model, "forward_with_source"))
    with tempfile.TemporaryDirectory(prefix="tome-trt-") as tmp:
        source_path = ctx.onnx_path
        if with_source and not traced:
            # To compare merge decisions, convert an export that also outputs the source map; what ships is
            # that validated graph without the source output (and the nodes only it needed).
            from ...export import export_onnx

            ctx.log("exporting the source-tracing twin for merge-decision validation")
            source_path = export_onnx(ctx.model, Path(tmp) / "source.onnx", ctx.preprocessing.input_size,
                                      batch=ctx.plan.batch, dynamic_batch=ctx.plan.dynamic_batch, opset=ctx.plan.opset,
                                      trace_source=True)
        ctx.log(f"{ctx.precision}: precision in the graph")
        batch = None if ctx.plan.dynamic_batch else ctx.plan.batch
        graph, info = tensorrt_graph(source_path, ctx.precision, ctx.settings, ctx.preprocessing, batch,
                                     ctx.options.calib_data)
    _check_graph(graph, library, plugin, f"{ctx.precision} graph")
    ctx.log("validating in ONNX Runtime against PyTorch")
    validation = validate(ctx, graph, with_source)
    if with_source and not traced:
        graph = without_outputs(graph, [SOURCE_NAME])
        validation["merge_agreement_graph"] = "the shipped graph plus its source output (same conversion)"
    return graph, info, validation


def _engine(ctx: BuildContext, library: Library, profile: Profile, graph: onnx.ModelProto, method: str
            ) -> Tuple[Optional[Dict[str, Any]], str, Dict[str, Any]]:
    """``build_engine.sh`` always, the engine where it can be built here: (engine facts, note, command facts)."""
    b = ctx.settings.build
    spec = EngineSpec(library, graph.graph.input[0].name, tuple(ctx.preprocessing.input_size), profile,
                      b.optimization_level, TIMING_CACHE if library.timing_cache and b.timing_cache else None,
                      tuple(b.compute_capabilities))
    write_build_script(ctx.workdir / SCRIPT, library, spec.command(), f"{ctx.precision} ({method})", __version__)
    facts = spec.facts()
    reason = "--no-engine" if ctx.options.no_engine else engine_unavailable_reason(library)
    if reason is not None:
        if ctx.options.require_engine:
            raise UserError(f"--require-engine: no {library.display} engine can be built here: {reason}")
        return None, (f"engine NOT built here ({reason}): it must be built on the target GPU machine: copy this "
                      f"directory there and run `tome-export engine DIR` (builds, validates and records it) or "
                      f"./{SCRIPT}"), facts
    ctx.log(f"building the {library.display} engine")
    engine = spec.build(ctx.workdir, ctx.workdir / ENGINE)
    return engine, engine_note(library, engine), facts


def build(ctx: BuildContext, library: Library) -> TargetResult:
    profile = profile_for(ctx.plan)
    plugin = scatter_plugin(ctx.plan, library)
    exported = onnx.load(str(ctx.onnx_path), load_external_data=False)  # the graph, not its weights
    _check_graph(exported, library, plugin, "exported fp32 graph")
    graph, info, validation = _graph(ctx, library, plugin)
    carry_metadata(exported, graph)  # the source-tracing twin it may come from was exported without it
    save_onnx(graph, ctx.workdir / ONNX)  # the graph the engine is built from (with its data file over 2 GB)
    engine, note, facts = _engine(ctx, library, profile, graph, info.get("method", "float32"))
    notes = [note]
    if validation.get("token_group_agreement", 1.0) < 1.0:
        notes.append(f"merge decisions: {validation['token_group_agreement']:.1%} of final token groups and "
                     f"{validation['source_images_identical']:.0%} of images as in PyTorch ToMe ({ctx.precision} "
                     f"rounding flips near-tied matches; logits are validated by cosine and top-1)")
    tensorrt = {"library": library.module, "onnx": ONNX, "precision_in_graph": info,
                "compatibility": {"problems": [], "scatter_plugin": plugin}, **facts,
                "engine_built": engine is not None, "engine": engine, "engine_note": note}
    # the build validates the graph in ONNX Runtime; the engine is first run (and validated) on the GPU machine
    runtime = {"file": ENGINE, "library": library.module, "engine_note": note, "engine_validated": False}
    return TargetResult(runtime=runtime, validation=validation, notes=tuple(notes), sections={"tensorrt": tensorrt})
