"""What a built graph takes and returns, read from the graph file itself (not from the manifest).

A serving configuration must name the graph's tensors exactly, so names, element types and shapes come from the
ONNX file or the OpenVINO IR; the manifest is only cross-checked against them. A dimension of -1 is dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Tuple

import numpy as np

from ..errors import UserError
from ..manifest import Manifest
from ..targets import get_target
from ..tasks import output_dtype


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int64, ...
    shape: Tuple[int, ...]  # -1: dynamic


@dataclass(frozen=True)
class Signature:
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    graph_file: str  # the file the tensors were read from, relative to the artifact directory

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise UserError(f"the graph {self.graph_file} has no output {name!r} "
                        f"(it has {', '.join(o.name for o in self.outputs)}): rebuild the artifact")

    @property
    def batch_dynamic(self) -> bool:
        """Whether the first input's leading (batch) dimension is dynamic."""
        return self.inputs[0].shape[0] == -1


ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
             "tensor(bool)": "bool", "tensor(bfloat16)": "bfloat16"}


def onnx_signature(path: Path) -> Signature:
    """Inputs and outputs of an ONNX graph (weights are not loaded), read with ``onnx``, or where only the runtime
    is installed with ONNX Runtime."""
    try:
        import onnx
    except ImportError:
        return _ort_signature(path)

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, google.protobuf errors, OSError
        raise UserError(f"{path} is not a readable ONNX file ({type(exc).__name__}): rebuild the artifact") from None
    initializers = {t.name for t in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, dtype, shape)

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    return Signature(inputs, tuple(spec(v) for v in model.graph.output), path.name)


def _ort_signature(path: Path) -> Signature:
    """The signature as an ONNX Runtime session sees it (a runtime-only install has no ``onnx``)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"reading {path.name} needs the Python package 'onnx' or 'onnxruntime': "
                        "pip install 'tome-export[onnxruntime]'") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise UserError(f"{path} is not a readable ONNX file ({type(exc).__name__}): rebuild the artifact") from None

    def spec(value: Any) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
        return TensorSpec(value.name, ORT_TYPES.get(value.type, value.type), shape)

    return Signature(tuple(spec(v) for v in session.get_inputs()), tuple(spec(v) for v in session.get_outputs()),
                     path.name)


def openvino_signature(path: Path) -> Signature:
    """Inputs and outputs of an OpenVINO IR, as OpenVINO itself reads them."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("reading an OpenVINO IR needs the Python package 'openvino': "
                        "pip install 'tome-export[openvino]'") from None

    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is not a readable OpenVINO IR ({first}): rebuild the artifact") from None

    def spec(port: Any) -> TensorSpec:
        shape = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
        return TensorSpec(port.get_any_name(), np.dtype(port.get_element_type().to_dtype()).name, shape)

    return Signature(tuple(spec(p) for p in model.inputs), tuple(spec(p) for p in model.outputs), path.name)


def manifest_signature(manifest: Manifest, graph_file: str) -> Signature:
    """Inputs and outputs of a compiled package that no tool here reads without running it (an AOTInductor
    ``.pt2``): what its build exported and validated, from the manifest. fp32 images in; the outputs with the shapes
    the manifest records (manifests before tasks: fp32 logits ``(batch, classes)`` and, where traced, the source map
    ``(batch, final tokens, tokens)``)."""
    batch = -1 if manifest.input.dynamic_batch else int(manifest.input.shape[0])
    shapes = {"logits": (batch, int(manifest.num_classes or -1)),
              "source": (batch, int((manifest.tokens_per_block or (-1,))[-1]), int(manifest.num_tokens or -1))}
    shapes.update({name: (batch, *(int(d) for d in shape[1:])) for name, shape in manifest.output_shapes.items()})
    images = TensorSpec(manifest.input.name, manifest.input.dtype, (batch, *manifest.input.image_shape))
    return Signature((images,), tuple(TensorSpec(n, output_dtype(n), shapes.get(n, (batch, -1)))
                                      for n in manifest.outputs), graph_file)


def artifact_signature(directory: Path, manifest: Manifest) -> Signature:
    """The graph's signature, checked against what the manifest says the artifact takes."""
    graph_file = get_target(manifest.target).graph_file  # the target knows which file its graph is
    name = manifest.runtime.get("file") or graph_file
    if Path(name).suffix not in (".onnx", ".xml", ".pt2"):  # an engine: tensors named as in the graph it came from
        name = graph_file
    path = Path(directory) / name
    if path.suffix == ".pt2":
        return manifest_signature(manifest, name)
    signature = openvino_signature(path) if path.suffix == ".xml" else onnx_signature(path)
    declared = manifest.input
    first = signature.inputs[0] if signature.inputs else None
    if first is None or len(signature.inputs) != 1:
        raise UserError(f"{path} takes {len(signature.inputs)} inputs; a tome-export graph takes one image batch")
    expected = tuple(-1 if isinstance(d, str) else int(d) for d in declared.shape)
    if first.name != declared.name or first.shape != expected:
        raise UserError(f"{path} takes {first.name} {list(first.shape)} but its manifest says "
                        f"{declared.name} {list(expected)}: the directory is inconsistent; rebuild it")
    return signature
