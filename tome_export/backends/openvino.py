"""Target ``openvino``: OpenVINO IR (``model.xml`` + ``model.bin``) for the CPU plugin in fp32, bf16, fp16 or int8.

Steps, each set by the recipe:

1. ``ov.convert_model`` of the exported ToMe ONNX; for int8, NNCF post-training quantization
   (``model_type=TRANSFORMER``) calibrated on real photos, with the ToMe nodes in the ignored scope (by name:
   OpenVINO keeps the ONNX node names as friendly names);
2. ``ov.save_model`` without fp16 weight compression; ToMe layers are marked in the IR to keep their original
   precision (the IR's ``DisablePrecisionConversion`` attribute, which the CPU plugin honours when it runs the
   rest of the graph in bf16/f16);
3. the inference precision is a compile property, ``INFERENCE_PRECISION_HINT``, stored in the manifest for the
   runner: without it the CPU plugin silently runs bf16 on CPUs with bf16 support. bf16/f16 are refused unless
   the CPU lists them in ``OPTIMIZATION_CAPABILITIES``. After compiling, the precision each layer ran in is read
   back from the runtime model and recorded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence

import numpy as np

from ..errors import UserError
from ..quantize import KEEP_FP32, artifact_merge_decisions, decision_output_names, decision_tensors, image_files
from ..runtime.openvino import OpenVINORunner, compile_config
from . import BuildContext, Target, register
from .common import (CALIBRATION_SCHEMA, KEEP_FP32_CHOICES, VALIDATION_SCHEMA, calibration, merge_decision_report,
                     runner_manifest, validate)

# recipe inference precision -> the CPU capability it needs (None: every CPU)
CAPABILITY = {"f32": None, "bf16": "BF16", "f16": "FP16"}
COMPUTE_LAYERS = ("FullyConnected", "MatMul", "Convolution")
KEEP_PRECISION = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}


def cpu_capabilities() -> List[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def _inference_precision(recipe) -> str:
    default = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}[recipe.precision]
    return recipe.build.get("inference_precision", default)


def check(opts, recipe) -> None:
    if recipe.precision == "int8":
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise UserError("--precision int8 for openvino quantizes with NNCF, which is not installed: "
                            "pip install 'tome-export[openvino]'") from None
    hint = _inference_precision(recipe)
    needed = CAPABILITY[hint]
    if needed is not None:
        caps = cpu_capabilities()
        if needed not in caps:
            raise UserError(f"OpenVINO cannot run {hint} on this CPU (OPTIMIZATION_CAPABILITIES: {', '.join(caps)}); "
                            f"it would silently run another precision: use --precision fp32 or int8 "
                            f"(with build.inference_precision: f32)")
    if opts.extra.get("calib_data") is not None:
        image_files(opts.extra["calib_data"])


def _protected_ops(model, keep_fp32: str) -> List[str]:
    prefixes = KEEP_FP32[keep_fp32]
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if prefixes and op.get_friendly_name().startswith(prefixes)]


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF logs every ignored node at INFO and draws progress bars on stdout; the build reports results."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _quantize(model, ctx: BuildContext, ignored: Sequence[str], batches: List[np.ndarray]):
    import nncf

    q = ctx.recipe.quantization
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    kwargs: Dict[str, Any] = {}
    if ignored:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(ignored))
    with _quiet_nncf():
        return nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                             preset=presets[q.get("preset", "performance")], subset_size=sum(len(b) for b in batches),
                             fast_bias_correction=bool(q.get("fast_bias_correction", True)), **kwargs)


def _fake_quantized_inputs(model, names: Sequence[str]) -> int:
    """How many inputs of the named ops come from a FakeQuantize (0: NNCF really left them alone)."""
    wanted = set(names)
    return sum(1 for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
               for target in op.output(0).get_target_inputs() if target.get_node().get_friendly_name() in wanted)


def mark_keep_precision(xml_path: Path, prefixes: Sequence[str]) -> int:
    """Mark the IR layers whose names start with ``prefixes`` to keep their precision; returns how many.

    The CPU plugin leaves layers carrying ``DisablePrecisionConversion`` in f32 when it lowers the rest to
    bf16/f16 (the attribute OpenVINO itself writes into IRs for precision-sensitive subgraphs).
    """
    if not prefixes:
        return 0
    tree = ET.parse(xml_path)
    marked = 0
    for layer in tree.getroot().iter("layer"):
        if not layer.get("name", "").startswith(tuple(prefixes)):
            continue
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ET.Element("rt_info")
            layer.insert(1 if layer.find("data") is not None else 0, rt_info)
        if not any(a.get("name") == KEEP_PRECISION["name"] for a in rt_info.iter("attribute")):
            ET.SubElement(rt_info, "attribute", KEEP_PRECISION)
        marked += 1
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
    return marked


def runtime_precisions(compiled) -> Dict[str, Any]:
    """The precision the CPU plugin chose for each layer, read back from the compiled model."""
    compute: Counter = Counter()
    tome: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind, precision = rt["layerType"].astype(str), rt["runtimePrecision"].astype(str)
        if kind in COMPUTE_LAYERS:
            compute[precision] += 1
        originals = rt["originalLayersNames"].astype(str)
        if kind not in ("Reshape", "Const", "Input", "Output") and any(p in originals for p in KEEP_FP32["tome"]):
            tome[precision] += 1
    hint = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    summary = ", ".join(f"{n} {p}" for p, n in compute.most_common())
    return {"inference_precision": hint, "summary": f"inference precision {hint}; compute layers: {summary}",
            "compute_layers": dict(compute), "tome_layers": dict(tome)}


def _save(model, directory: Path, prefixes: Sequence[str], compress: bool) -> Dict[str, int]:
    import openvino as ov

    directory.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(directory / "model.xml"), compress_to_fp16=compress)
    return {"layers_marked_keep_precision": mark_keep_precision(directory / "model.xml", prefixes)}


def _decision_runner(xml_path: Path, config: Mapping[str, Any], tensors) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml_path))
    model.add_outputs(decision_output_names(tensors))
    compiled = core.compile_model(model, "CPU", compile_config(config))

    def run(x: np.ndarray) -> Dict[str, np.ndarray]:
        return {name: value for port, value in compiled(x).items() for name in port.get_names()}

    return run


def _versions(with_nncf: bool) -> Dict[str, str]:
    import openvino as ov

    versions = {"openvino": ov.__version__.split("-")[0]}
    if with_nncf:
        import nncf

        versions["nncf"] = nncf.__version__
    return versions


def build(ctx: BuildContext) -> Dict[str, Any]:
    import onnx
    import openvino as ov

    settings = ctx.recipe.build
    keep_fp32 = settings.get("keep_fp32", "tome")
    prefixes = KEEP_FP32[keep_fp32]
    hint = _inference_precision(ctx.recipe)
    compress = bool(settings.get("compress_to_fp16", False))
    config = {"INFERENCE_PRECISION_HINT": hint}
    tensors = decision_tensors(onnx.load(str(ctx.onnx_path), load_external_data=False))
    quantize = ctx.precision == "int8"

    converted = ov.convert_model(str(ctx.onnx_path))
    ctx.onnx_path.unlink()  # the artifact is the IR
    batches: List[np.ndarray] = []
    step: Dict[str, Any] = {"inference_precision": hint, "keep_fp32": keep_fp32, "weights_compressed_to_fp16": compress}
    protected = _protected_ops(converted, keep_fp32)
    if quantize:
        batches, calib = calibration(ctx)
        ctx.log(f"int8: NNCF on {calib['images']} calibration images")
        model = _quantize(converted.clone(), ctx, protected, batches)
        leaks = _fake_quantized_inputs(model, protected)
        if leaks:
            raise RuntimeError(f"NNCF quantized {leaks} inputs of protected ToMe layers despite the ignored scope")
        step.update(method="nncf (model_type=TRANSFORMER)", preset=ctx.recipe.quantization.get("preset", "performance"),
                    calibration=calib, tome_layers_ignored=len(protected), tome_inputs_quantized=leaks)
    else:
        model = converted
    step.update(_save(model, ctx.workdir, prefixes, compress))

    runtime = {"file": "model.xml", "config": config}
    runner = OpenVINORunner(ctx.workdir, runner_manifest(ctx, runtime))
    ran = runtime_precisions(runner.compiled)
    validation = validate(ctx, runner, f"OpenVINO {ctx.precision} (inference precision {hint})")
    if ran["inference_precision"] != hint:
        raise RuntimeError(f"OpenVINO compiled with inference precision {ran['inference_precision']}, not {hint}")
    unprotected: Dict[str, Any] = {}

    def measure(with_protection: bool, decision_batches: List[np.ndarray]):
        xml = ctx.workdir / "model.xml"
        if not with_protection:  # the same build without ignored scope and marks, measured and discarded
            plain = _quantize(converted.clone(), ctx, (), batches) if quantize else converted
            unprotected["tome_inputs_quantized"] = _fake_quantized_inputs(plain, protected) if quantize else 0
            _save(plain, Path(tmp), (), compress)
            xml = Path(tmp) / "model.xml"
        return artifact_merge_decisions(_decision_runner(xml, config, tensors), tensors, decision_batches)

    # Protection changes the graph when NNCF quantizes, or when the plugin lowers precision (bf16/f16 hints).
    differs = quantize or hint != "f32"
    with tempfile.TemporaryDirectory(prefix="tome-ov-") as tmp:
        decisions = merge_decision_report(ctx, measure, keep_fp32, differs)
    if isinstance(decisions.get("without_protection"), dict):
        decisions["without_protection"].update(unprotected)
    return {
        "runtime": runtime,
        "precision_step": step,
        "precision_ran": ran,
        "validation": {"backend": f"openvino {ov.__version__.split('-')[0]}", "precision_ran": ran["summary"],
                       **validation},
        "merge_decisions": decisions,
        "backend_versions": _versions(quantize),
        "cpu_capabilities": cpu_capabilities(),
        "notes": [],
    }


TARGET = register(Target(
    name="openvino",
    description="OpenVINO IR for the CPU plugin: fp32 (f32 hint), bf16/fp16 where the CPU has them, int8 (NNCF)",
    precisions=("fp32", "bf16", "fp16", "int8"),
    default_merge_impl="gather",
    build=build,
    requires=("openvino",),  # and nncf for int8 (see check)
    recipe_schema={
        "build": {"inference_precision": tuple(CAPABILITY), "keep_fp32": KEEP_FP32_CHOICES, "compress_to_fp16": bool},
        "quantization": {"method": ("nncf",), "preset": ("performance", "mixed"), "fast_bias_correction": bool},
        "calibration": CALIBRATION_SCHEMA,
        "validation": VALIDATION_SCHEMA,
    },
    options=("calib_data",),
    check=check,
))
