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
   back from the runtime model and recorded. The same properties are written beside the IR as
   ``openvino_config.json`` (``{"CPU": {...}}``) for ``benchmark_app -load_config`` and OpenVINO Model Server's
   ``plugin_config``: a plain ``compile_model("model.xml", "CPU")`` cannot see them (the IR has no place the CPU
   plugin reads them from).

Artifacts run with :class:`tome_export.runtime.openvino.OpenVINORunner`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Sequence, Tuple

import numpy as np

from ..errors import UserError
from ..graph_names import KEEP_FP32
from ..quality.calibration import Calibration
from ..quality.decisions import artifact_merge_decisions, decision_output_names, decision_tensors
from .base import BuildContext, BuildPlan, CalibrationOptions, Settings, Target, TargetResult
from .onnxruntime import CpuValidation
from . import register

CAPABILITY = {"f32": None, "bf16": "BF16", "f16": "FP16"}
COMPUTE_LAYERS = ("FullyConnected", "MatMul", "Convolution")
KEEP_PRECISION = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}


RUNNER = "tome_export.runtime.openvino:OpenVINORunner"
DEVICE_CONFIG = "openvino_config.json"  # the compile properties, for tools that do not read the manifest


@dataclass(frozen=True)
class OvBuild:
    inference_precision: Literal["f32", "bf16", "f16"] = "f32"  # the compile hint stored for the runner
    keep_fp32: Literal["tome", "match", "none"] = "tome"
    compress_to_fp16: bool = False  # fp16 weight compression of the saved IR


@dataclass(frozen=True)
class OvQuantization:
    method: Literal["nncf"] = "nncf"
    preset: Literal["performance", "mixed"] = "performance"
    fast_bias_correction: bool = True
    # NNCF's overflow fix stores weights in 7 bits so that int8 dot products cannot saturate on CPUs without VNNI
    # (their u8 x s8 kernels sum pairs into int16). auto: every layer when the building CPU lacks VNNI/AMX, where
    # the build is validated, else NNCF's default (the first layer).
    overflow_fix: Literal["auto", "enable", "first_layer_only", "disable"] = "auto"


@dataclass(frozen=True)
class OvSettings(Settings):
    build: OvBuild = OvBuild()
    quantization: OvQuantization = OvQuantization()
    calibration: Calibration = Calibration()
    validation: CpuValidation = CpuValidation()


def cpu_capabilities() -> List[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check(plan: BuildPlan) -> None:
    if plan.precision == "int8":
        try:
            import nncf  # noqa: F401
        except ImportError:
            raise UserError("--precision int8 for openvino quantizes with NNCF, which is not installed: "
                            "pip install 'tome-export[openvino-int8]'") from None
    hint = plan.settings.build.inference_precision
    needed = CAPABILITY[hint]
    if needed is not None:
        caps = cpu_capabilities()
        if needed not in caps:
            raise UserError(f"OpenVINO cannot run {hint} on this CPU (OPTIMIZATION_CAPABILITIES: {', '.join(caps)}); "
                            f"it would silently run another precision: use --precision fp32 or int8 "
                            f"(with build.inference_precision: f32)")


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


INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimd")  # asimd: Arm's kernels do not saturate


def overflow_fix(setting: str) -> str:
    """The overflow fix NNCF applies: ``setting``, or for ``auto`` what this CPU's int8 kernels need."""
    if setting != "auto":
        return setting
    from ..runtime.machine import cpu_description

    flags = set(cpu_description()["flags"])
    return "first_layer_only" if not flags or flags & set(INT8_DOT_PRODUCT_FLAGS) else "enable"


def _quantize(model, ctx: BuildContext, ignored: Sequence[str], batches: List[np.ndarray]):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    q = ctx.settings.quantization
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    kwargs: Dict[str, Any] = {}
    if ignored:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(ignored))
    fix = OverflowFix(overflow_fix(q.overflow_fix))
    with _quiet_nncf():
        return nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                             preset=presets[q.preset], subset_size=sum(len(b) for b in batches),
                             fast_bias_correction=q.fast_bias_correction,
                             advanced_parameters=AdvancedQuantizationParameters(overflow_fix=fix), **kwargs)


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


def write_device_config(path: Path, config: Dict[str, Any]) -> None:
    """The validated compile properties as ``{"CPU": {...}}``: the file ``benchmark_app -load_config`` reads, and
    the ``plugin_config`` OpenVINO Model Server takes. The IR cannot carry them: OpenVINO 2026.4's CPU plugin
    ignores ``runtime_options`` in the model's rt_info (checked: hints set there do not read back compiled)."""
    path.write_text(json.dumps({"CPU": config}, indent=2) + "\n")


def _versions(with_nncf: bool) -> Dict[str, str]:
    import openvino as ov

    versions = {"openvino": ov.__version__.split("-")[0]}
    if with_nncf:
        import nncf

        versions["nncf"] = nncf.__version__
    return versions


def _precision_step(ctx: BuildContext, converted: Any, protected: Sequence[str]) -> Tuple[Any, Dict[str, Any], List]:
    """The model to save (NNCF-quantized for int8), what was done, and the calibration batches used."""
    b = ctx.settings.build
    step: Dict[str, Any] = {"inference_precision": b.inference_precision, "keep_fp32": b.keep_fp32,
                            "weights_compressed_to_fp16": b.compress_to_fp16}
    if ctx.precision != "int8":
        return converted, step, []
    from ._shared import calibration

    batches, calib = calibration(ctx)
    ctx.log(f"int8: NNCF on {calib['images']} calibration images")
    model = _quantize(converted.clone(), ctx, protected, batches)
    leaks = _fake_quantized_inputs(model, protected)
    if leaks:
        raise RuntimeError(f"NNCF quantized {leaks} inputs of protected ToMe layers despite the ignored scope")
    step.update(method="nncf (model_type=TRANSFORMER)", preset=ctx.settings.quantization.preset,
                overflow_fix=overflow_fix(ctx.settings.quantization.overflow_fix),
                calibration=calib, tome_layers_ignored=len(protected), tome_inputs_quantized=leaks)
    return model, step, batches


def build(ctx: BuildContext) -> TargetResult:
    import onnx
    import openvino as ov

    from ..runtime.openvino import OpenVINORunner
    from ._shared import merge_decisions, validate

    b = ctx.settings.build
    runtime = {"file": "model.xml", "config": {"INFERENCE_PRECISION_HINT": b.inference_precision}}
    tensors = decision_tensors(onnx.load(str(ctx.onnx_path), load_external_data=False))
    converted = ov.convert_model(str(ctx.onnx_path))
    protected = _protected_ops(converted, b.keep_fp32)
    model, step, calibration_batches = _precision_step(ctx, converted, protected)
    step.update(_save(model, ctx.workdir, KEEP_FP32[b.keep_fp32], b.compress_to_fp16))
    write_device_config(ctx.workdir / DEVICE_CONFIG, runtime["config"])
    with OpenVINORunner(ctx.artifact_io(runtime)) as runner:
        ran = runtime_precisions(runner.compiled)
        validation = validate(ctx, runner, f"OpenVINO {ctx.precision} (inference precision {b.inference_precision})")
    if ran["inference_precision"] != b.inference_precision:
        raise RuntimeError(f"OpenVINO compiled with inference precision {ran['inference_precision']}, "
                           f"not {b.inference_precision}")

    def measure(directory: Path, batches: List[np.ndarray]):
        with OpenVINORunner(ctx.artifact_io(runtime, directory), extra_outputs=decision_output_names(tensors)) as r:
            return artifact_merge_decisions(r.infer, tensors, batches)

    with tempfile.TemporaryDirectory(prefix="tome-ov-") as tmp:
        def without_protection(batches: List[np.ndarray]):  # the same build without ignored scope and marks
            quantized = ctx.precision == "int8"
            plain = _quantize(converted.clone(), ctx, (), calibration_batches) if quantized else converted
            facts = {"tome_inputs_quantized": _fake_quantized_inputs(plain, protected) if quantized else 0}
            _save(plain, Path(tmp), (), b.compress_to_fp16)
            return measure(Path(tmp), batches), facts

        # Protection changes the graph when NNCF quantizes, or when the plugin lowers precision (bf16/f16 hints).
        differs = ctx.precision == "int8" or b.inference_precision != "f32"
        decisions = merge_decisions(ctx, lambda batches: measure(ctx.workdir, batches), b.keep_fp32, differs,
                                    without_protection)
    sections = {"precision_step": step, "precision_ran": ran, "backend_versions": _versions(ctx.precision == "int8"),
                "cpu_capabilities": cpu_capabilities()}
    validation = {"backend": f"openvino {ov.__version__.split('-')[0]}", "precision_ran": ran["summary"], **validation}
    return TargetResult(runtime=runtime, validation=validation, merge_decisions=decisions, sections=sections)


TARGET = register(Target(
    name="openvino",
    description="OpenVINO IR for the CPU plugin: fp32 (f32 hint), bf16/fp16 where the CPU has them, int8 (NNCF)",
    precisions=("fp32", "bf16", "fp16", "int8"),
    default_merge_impl="gather",
    runner=RUNNER,
    build=build,
    settings=OvSettings,
    options=CalibrationOptions,
    precision_defaults={p: {"build": {"inference_precision": h}}
                        for p, h in {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}.items()},
    check=check,
    runtime_extra="openvino",
    graph_file="model.xml",
    requires=("openvino",),  # and nncf for int8 (see check)
    install_hint="pip install 'tome-export[openvino]'",
    version_modules=("openvino", "nncf"),
))
