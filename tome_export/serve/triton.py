"""A Triton Inference Server model from a built artifact: which backend, which files, and ``config.pbtxt``.

Two variants. ``python`` serves the artifact through :func:`tome_export.runtime.load` inside Triton's Python
backend, i.e. exactly the code path the build validated. ``native`` hands the graph to Triton's own backend:
``onnxruntime_onnx`` (onnx, onnxruntime targets), ``openvino`` (openvino target) or ``tensorrt_plan`` (a
TensorRT engine). Names, element types and dimensions come from the graph file; batching from the build's batch
profile; settings the native backends cannot express are returned as notes, never silently dropped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import UserError
from ..manifest import Manifest
from ..preprocess import Preprocessing
from ..resources import MAX_THREADS
from ..targets import get_target
from .signature import Signature, TensorSpec, artifact_signature

VARIANTS = ("python", "native")
DEFAULT_MAX_BATCH = 8  # CPU throughput gains little beyond 8 images per call (see README "Serving")
DEFAULT_QUEUE_DELAY_US = 1000
VERSION = "1"
ENGINE = "model.engine"
# What Triton's ModelConfig can hold: max_batch_size and preferred_batch_size are int32, the queue delay uint64.
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
MAX_NAME_BYTES = 255  # the model name is a directory name in the repository
PREPROCESSING_PREFIX = "preprocessing."

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
                "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}

# ONNX Runtime session level (the manifest's runtime.session_optimization) -> Triton's optimization.graph.level;
# None: leave it out, Triton's onnxruntime backend then applies ORT_ENABLE_ALL.
ORT_GRAPH_LEVELS: Dict[str, Optional[int]] = {"all": None, "extended": 1, "basic": -1, "disabled": 2}


@dataclass(frozen=True)
class TritonOptions:
    variant: str = "python"
    name: Optional[str] = None  # default: the artifact directory's name
    max_batch_size: Optional[int] = None  # default: the TensorRT profile's max, else DEFAULT_MAX_BATCH
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    threads: Optional[int] = None  # None: the backend's default


@dataclass(frozen=True)
class Batching:
    max_batch_size: int  # 0: the config's dims include the graph's fixed batch; Triton cannot batch
    dynamic: bool
    preferred: Tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class ModelPlan:
    """Everything that goes into ``<repository>/<name>/``."""

    name: str
    variant: str
    backend: str
    platform: Optional[str]
    default_model_filename: str
    files: Tuple[Tuple[str, str], ...]  # (path in the artifact, path in the version directory)
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    batching: Batching
    instance_kind: str
    queue_delay_us: int
    parameters: Dict[str, str] = field(default_factory=dict)
    graph_level: Optional[int] = None
    notes: Tuple[str, ...] = ()  # what the server may do differently from the validated build


def model_name(directory: Path, requested: Optional[str]) -> str:
    """A Triton model name (a directory name): letters, digits, '_', '.', '-'; the artifact's name by default."""
    if requested is not None:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", requested):
            raise UserError(f"--name {requested!r}: use letters, digits, '_', '.' and '-' (not first '.' or '-')")
        name = requested
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(os.path.abspath(directory)).name).lstrip(".-") or "model"
    if len(name) > MAX_NAME_BYTES:
        raise UserError(f"the model name {name[:40]}... has {len(name)} characters; a repository directory name "
                        f"takes at most {MAX_NAME_BYTES}: pass a shorter --name")
    return name


def preprocessing_parameters(pre: Preprocessing) -> Dict[str, str]:
    """The eval preprocessing as config parameters (a client rebuilds it with :func:`preprocessing_from_parameters`)."""
    values = pre.to_dict()
    return {PREPROCESSING_PREFIX + key: ",".join(map(str, value)) if isinstance(value, list) else str(value)
            for key, value in values.items()}


def preprocessing_from_parameters(parameters: Mapping[str, Any]) -> Preprocessing:
    """The preprocessing recorded in a model config's parameters (as ``tritonclient`` returns them, or plain)."""
    def text(key: str) -> str:
        value = parameters.get(PREPROCESSING_PREFIX + key)
        if value is None:
            raise UserError(f"the model config has no parameter {PREPROCESSING_PREFIX + key!r}: "
                            f"it was not written by tome-export")
        return value["string_value"] if isinstance(value, Mapping) else str(value)

    floats = lambda key: tuple(float(v) for v in text(key).split(","))  # noqa: E731
    return Preprocessing(input_size=tuple(int(v) for v in text("input_size").split(",")), mean=floats("mean"),
                         std=floats("std"), crop_pct=float(text("crop_pct")), crop_mode=text("crop_mode"),
                         interpolation=text("interpolation"))


def batching(manifest: Manifest, signature: Signature, options: TritonOptions) -> Batching:
    """max_batch_size and dynamic batching from the graph's batch dimension and the build's batch profile."""
    if not signature.batch_dynamic:
        fixed = signature.inputs[0].shape[0]
        if options.max_batch_size is not None:
            raise UserError(f"--max-batch-size {options.max_batch_size}: this artifact takes a static batch of "
                            f"{fixed}; rebuild it with --dynamic-batch to let Triton batch requests")
        return Batching(0, False, (), f"the graph has a static batch of {fixed}, so each request must carry exactly "
                        f"{fixed} image(s) (max_batch_size 0, batch in the dims) and Triton cannot batch requests; "
                        f"rebuild with --dynamic-batch for dynamic batching")
    profile = (manifest.section("tensorrt") or {}).get("profile")
    limit = int(profile["max"]) if profile else None
    if profile and int(profile["min"]) > 1:
        raise UserError(f"the engine's batch profile starts at {profile['min']} but Triton's dynamic batcher also "
                        f"sends smaller batches: rebuild with --dynamic-batch 1:{profile['opt']}:{profile['max']}")
    size = options.max_batch_size or limit or DEFAULT_MAX_BATCH
    if size < 1 or size > INT32_MAX or (limit is not None and size > limit):
        raise UserError(f"--max-batch-size {size}: choose 1..{min(limit or INT32_MAX, INT32_MAX)}"
                        + (f" (the engine's profile ends at {limit})" if limit else ""))
    preferred = (int(profile["opt"]),) if profile and 1 < int(profile["opt"]) < size else ()
    source = f"the engine's profile {profile['min']}:{profile['opt']}:{profile['max']}" if profile else \
        "the graph's dynamic batch dimension"
    return Batching(size, True, preferred, f"{source}: Triton combines requests into batches of up to {size}")


def _common_parameters(manifest: Manifest) -> Dict[str, str]:
    model = manifest.model
    build = {"tome_export.model": f"{model.get('alias')} ({model.get('source', 'timm')} {manifest.upstream_name}, "
                                  f"weights {model.get('weights')})",
             "tome_export.build": f"{manifest.target} {manifest.precision}, r {list(manifest.r_schedule)}",
             "tome_export.manifest_sha256": manifest.digest or ""}
    return {**build, **preprocessing_parameters(Preprocessing.from_dict(manifest.preprocessing))}


def _python_plan(directory: Path, manifest: Manifest, options: TritonOptions) -> Dict[str, Any]:
    files = [("manifest.json", "artifact/manifest.json")]
    files += [(rel, f"artifact/{rel}") for rel in sorted(manifest.artifacts)]
    gpu = get_target(manifest.target).device == "cuda"
    params = {"threads": str(options.threads)} if options.threads else {}
    no_engine = manifest.target.startswith("tensorrt") and not (Path(directory) / ENGINE).is_file()
    notes = (f"there is no {ENGINE} yet: run ./build_engine.sh in 1/artifact/ on the serving GPU machine before "
             f"starting the server",) if no_engine else ()
    if manifest.runtime.get("compiled") is False:  # an aoti-cuda build made without a GPU
        raise UserError(f"{str(directory)!r} holds no compiled package yet: run `tome-export engine {directory}` on "
                        f"the GPU machine first, then serve it")
    return {"backend": "python", "platform": None, "default_model_filename": "model.py", "files": tuple(files),
            "instance_kind": "KIND_GPU" if gpu else "KIND_CPU", "parameters": params, "notes": notes}


def _onnxruntime_plan(directory: Path, manifest: Manifest, options: TritonOptions) -> Dict[str, Any]:
    runtime = manifest.runtime
    graph = runtime.get("file", "model.onnx")
    external = [rel for rel in sorted(manifest.artifacts) if rel != graph and rel.startswith(graph)]
    level = runtime.get("session_optimization", "all")
    params = {"intra_op_thread_count": str(options.threads), "inter_op_thread_count": "1"} if options.threads else {}
    return {"backend": "onnxruntime", "platform": "onnxruntime_onnx", "default_model_filename": "model.onnx",
            "files": ((graph, "model.onnx"), *((rel, rel) for rel in external)), "instance_kind": "KIND_CPU",
            "parameters": params, "graph_level": ORT_GRAPH_LEVELS.get(level), "notes": ()}


def _openvino_plan(directory: Path, manifest: Manifest, options: TritonOptions) -> Dict[str, Any]:
    hint = manifest.runtime.get("config", {}).get("INFERENCE_PRECISION_HINT", "f32")
    params = {"PERFORMANCE_HINT": "LATENCY"}
    if options.threads:
        params["INFERENCE_NUM_THREADS"] = str(options.threads)
    notes: List[str] = []
    if hint == "bf16":
        params["HINT_BF16"] = "YES"
    else:
        notes.append(f"the build validated OpenVINO inference precision {hint}, but Triton's openvino backend has no "
                     f"parameter for it (HINT_BF16 is its only precision key): on CPUs where OpenVINO defaults to "
                     f"bf16 (AVX512-BF16 or AMX) the server computes bf16, which was not validated. Use "
                     f"--variant python, which compiles with INFERENCE_PRECISION_HINT={hint}")
    return {"backend": "openvino", "platform": None, "default_model_filename": "model.xml",
            "files": (("model.xml", "model.xml"), ("model.bin", "model.bin")), "instance_kind": "KIND_CPU",
            "parameters": params, "notes": tuple(notes)}


def _tensorrt_plan(directory: Path, manifest: Manifest, options: TritonOptions) -> Dict[str, Any]:
    info = manifest.section("tensorrt") or {}
    if manifest.target != "tensorrt":
        raise UserError("Triton has no TensorRT-RTX backend (its tensorrt_plan backend loads engines of full "
                        "TensorRT): serve this artifact with --variant python")
    if not (Path(directory) / ENGINE).is_file():
        raise UserError(f"{str(directory)!r} holds no {ENGINE} ({info.get('engine_note', 'no engine was built')}): "
                        f"run ./build_engine.sh there on the serving GPU machine, then serve it again")
    notes = [f"the engine runs only on the TensorRT version and GPU it was built with "
             f"({(info.get('engine') or {}).get('library_version', 'see build_engine.sh')}): Triton's TensorRT must match"]
    if ENGINE not in manifest.artifacts:
        notes.append(f"{ENGINE} was built after the artifact (build_engine.sh), so no manifest checksum covers it")
    return {"backend": "tensorrt", "platform": "tensorrt_plan", "default_model_filename": "model.plan",
            "files": ((ENGINE, "model.plan"),), "instance_kind": "KIND_GPU", "parameters": {}, "notes": tuple(notes)}


NATIVE_PLANS = {"onnx": _onnxruntime_plan, "onnxruntime": _onnxruntime_plan, "openvino": _openvino_plan,
                "tensorrt": _tensorrt_plan, "tensorrt-rtx": _tensorrt_plan}


def _in_range(flag: str, value: Optional[int], low: int, high: int, why: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise UserError(f"{flag} must be an integer from {low} to {high:,} ({why}), got {value!r}")


def check_options(options: TritonOptions) -> None:
    """Every number that goes into config.pbtxt, within what Triton's ModelConfig holds."""
    _in_range("--threads", options.threads, 1, MAX_THREADS, "CPU threads per model instance")
    _in_range("--max-batch-size", options.max_batch_size, 1, INT32_MAX, "Triton's max_batch_size is an int32")
    _in_range("--queue-delay-us", options.queue_delay_us, 0, UINT64_MAX,
              "Triton's max_queue_delay_microseconds is a uint64")


def plan_model(directory: Path, manifest: Manifest, options: TritonOptions) -> ModelPlan:
    """Decide backend, files and configuration for one artifact (``manifest`` already verified)."""
    if options.variant not in VARIANTS:
        raise UserError(f"--variant {options.variant!r}: choose {' or '.join(VARIANTS)}")
    check_options(options)
    signature = artifact_signature(directory, manifest)
    outputs = tuple(signature.output(name) for name in manifest.task_outputs)
    batch = batching(manifest, signature, options)
    if options.variant == "python":
        chosen = _python_plan(directory, manifest, options)
    else:
        if manifest.target not in NATIVE_PLANS:  # e.g. AOTInductor packages: no Triton backend loads them
            raise UserError(f"Triton has no native backend for --target {manifest.target} artifacts: serve this one "
                            f"with --variant python")
        chosen = NATIVE_PLANS[manifest.target](directory, manifest, options)
        if chosen["backend"] == "openvino" and batch.dynamic:
            # Triton's openvino backend rejects batches smaller than max_batch_size unless told to pad them.
            chosen["parameters"]["ENABLE_BATCH_PADDING"] = "YES"
            batch = replace(batch, preferred=(batch.max_batch_size,))
            chosen["notes"] += (f"Triton's openvino backend pads every batch to max_batch_size "
                                f"({batch.max_batch_size}) and computes the padding: keep --max-batch-size near "
                                f"the load",)
    unserved = [o.name for o in signature.outputs if o.name not in {spec.name for spec in outputs}]
    if unserved:
        chosen["notes"] += (f"only {', '.join(o.name for o in outputs)} served; the graph's other outputs "
                            f"({', '.join(unserved)}) are for local inspection (tome-export visualize --artifact)",)
    chosen["parameters"] = {**chosen["parameters"], **_common_parameters(manifest)}
    return ModelPlan(name=model_name(directory, options.name), variant=options.variant, inputs=signature.inputs,
                     outputs=outputs, batching=batch, queue_delay_us=options.queue_delay_us, **chosen)


def quote(text: str) -> str:
    """A protobuf text-format string literal (non-ASCII as escaped UTF-8 bytes)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        out.append("\\" + char if char in '"\\' else char if 32 <= byte < 127 else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def comment(text: str) -> str:
    """A protobuf text-format comment line: ``text`` with line breaks and other control characters escaped (a
    newline in an artifact's directory name would otherwise end the comment and leave the rest as config)."""
    return "# " + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _tensor_block(specs: Tuple[TensorSpec, ...], batched: bool) -> List[str]:
    lines = []
    for i, spec in enumerate(specs):
        if spec.dtype not in TRITON_TYPES:
            raise UserError(f"tensor {spec.name!r} has element type {spec.dtype}, which Triton has no type for")
        dims = spec.shape[1:] if batched else spec.shape
        lines += ["  {", f"    name: {quote(spec.name)}", f"    data_type: {TRITON_TYPES[spec.dtype]}",
                  f"    dims: [ {', '.join(map(str, dims))} ]", "  }" + ("," if i < len(specs) - 1 else "")]
    return lines


def render_config(plan: ModelPlan, header: List[str]) -> str:
    """``config.pbtxt`` text (protobuf text format of Triton's ModelConfig); ``header`` lines become comments."""
    batch = plan.batching
    lines = [comment(line) for line in header] + [f"name: {quote(plan.name)}", f"backend: {quote(plan.backend)}"]
    if plan.platform:
        lines.append(f"platform: {quote(plan.platform)}")
    lines += [f"default_model_filename: {quote(plan.default_model_filename)}",
              comment(batch.reason), f"max_batch_size: {batch.max_batch_size}",
              "input [", *_tensor_block(plan.inputs, batch.max_batch_size > 0), "]",
              "output [", *_tensor_block(plan.outputs, batch.max_batch_size > 0), "]"]
    if batch.dynamic:
        preferred = [f"  preferred_batch_size: [ {', '.join(map(str, batch.preferred))} ]"] if batch.preferred else []
        lines += ["dynamic_batching {", *preferred, f"  max_queue_delay_microseconds: {plan.queue_delay_us}", "}"]
    lines += ["instance_group [", "  {", "    count: 1", f"    kind: {plan.instance_kind}", "  }", "]"]
    if plan.graph_level is not None:
        lines += ["optimization {", "  graph {", f"    level: {plan.graph_level}", "  }", "}"]
    for key, value in plan.parameters.items():
        lines += ["parameters {", f"  key: {quote(key)}", f"  value {{ string_value: {quote(value)} }}", "}"]
    return "\n".join(lines) + "\n"
