"""Merge-aware quantization of ONNX graphs: which ToMe nodes stay fp32, ONNX Runtime's quantizers, and a check
that a quantized graph really left the protected nodes alone.

Quantizing the token-matching path (the similarity MatMul, max/argmax, TopK, the ranking) changes *which*
tokens merge, and quantizing the size arithmetic (x·size, /size, log size) skews every merged token. So by
default both stay in fp32: the exported graph names those nodes ``tome_match/<block>/...`` and
``tome_merge/<block>/...`` (:mod:`tome_export.graph_names`), and quantizers exclude them by name. The ONNX
Runtime quantizers here serve the ``onnxruntime`` target (dynamic and static Q/DQ) and the TensorRT targets'
explicit Q/DQ.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import onnx

from .errors import UserError
from .graph_names import KEEP_FP32
from .onnx_files import data_location, needs_external_data, save_onnx


def protected_node_names(model: onnx.ModelProto, keep_fp32: str = "tome") -> List[str]:
    """Names of the nodes to keep in fp32: ``tome`` = matching path and merge arithmetic, ``match``, ``none``."""
    if keep_fp32 not in KEEP_FP32:
        raise UserError(f"keep_fp32 = {keep_fp32!r}: choose one of {', '.join(KEEP_FP32)}")
    prefixes = KEEP_FP32[keep_fp32]
    names = [n.name for n in model.graph.node if prefixes and n.name.startswith(prefixes)]
    if prefixes and not names and any(n.op_type in ("TopK", "CumSum") for n in model.graph.node):
        raise RuntimeError("the graph merges tokens but has no tome_match/ or tome_merge/ nodes: "
                           "it was not exported by tome_export.export_onnx")
    return names


def quantized_protected_nodes(quantized: onnx.ModelProto, protected: Iterable[str]) -> Dict[str, List[str]]:
    """Which protected nodes a quantizer touched anyway; both lists are empty when the exclusion really happened.

    ``replaced``: gone from the graph (turned into an integer op such as MatMulInteger). ``reading_int8``: still
    float, but reading a tensor that went through DequantizeLinear, i.e. int8-rounded values. ToMe nodes have no
    weights, so any dequantized input is an activation.
    """
    nodes = {n.name: n for n in quantized.graph.node}
    dequantized = {out for n in quantized.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    protected = list(protected)
    return {"replaced": [name for name in protected if name not in nodes],
            "reading_int8": [name for name in protected
                             if name in nodes and any(t in dequantized for t in nodes[name].input)]}


# --- ONNX Runtime quantizers -----------------------------------------------------------------------------


class _Reader:
    """An ORT CalibrationDataReader over preprocessed batches (duck-typed: ORT only calls get_next/rewind)."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray]) -> None:
        self.input_name, self.batches, self.index = input_name, list(batches), 0

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {self.input_name: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.batches, self.index = self.batches[start_index:end_index], 0


def _calibration_reader(input_name: str, batches: Sequence[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass

    return Reader(input_name, batches)


@contextlib.contextmanager
def _quiet_root_logger():
    """ORT's quantizers log advice and progress through the root logger; builds report results instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if name not in types:
        raise UserError(f"quantization type {name!r}: choose int8 or uint8")
    return types[name]


def preprocess_for_quantization(onnx_in: os.PathLike, onnx_out: os.PathLike, optimize: bool = False) -> Path:
    """ORT's recommended pre-processing (``quant_pre_process``): shape inference (and optionally ORT's basic
    graph optimisation, off by default: the exporter already optimised the graph, and constant folding would
    remove ToMe index-arithmetic nodes, blurring the check that quantization left every protected node alone).

    The exporter lists initializers in ``value_info``; ORT's quantizers rewrite some (a Gemm's transposed
    weight), and the stale entries then fail shape inference, so they are dropped first. ORT's symbolic shape
    inference is skipped: it fails on the ToMe graph, and every shape but the batch is a constant, which ONNX
    shape inference resolves. Node names survive, so ToMe exclusions still apply.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(onnx_in))
    weights = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    external = needs_external_data(model)
    cleaned = save_onnx(model, Path(onnx_out).with_name(f"cleaned-{Path(onnx_out).name}"))
    quant_pre_process(str(cleaned), str(onnx_out), skip_optimization=not optimize, skip_symbolic_shape=True,
                      save_as_external_data=external, all_tensors_to_one_file=True,
                      external_data_location=data_location(Path(onnx_out)))
    return Path(onnx_out)


def quantize_qdq(
    onnx_in: os.PathLike,
    onnx_out: os.PathLike,
    calibration: Sequence[np.ndarray],
    *,
    exclude: Sequence[str] = (),
    symmetric_activations: bool = True,
    symmetric_weights: bool = True,
    activation_type: str = "int8",
    weight_type: str = "int8",
    per_channel: bool = True,
    reduce_range: bool = False,
    op_types: Optional[Sequence[str]] = None,
    calibrate_method: str = "minmax",
    preprocess: bool = True,
    extra_options: Optional[Mapping[str, object]] = None,
) -> Path:
    """Static int8 quantization in Q/DQ format with ``calibration`` batches (ORT ``quantize_static``).

    Symmetric int8 activations and weights (the defaults) are what TensorRT consumes; ORT's CPU provider runs
    the same graph. ``exclude`` names nodes kept in fp32 (see :func:`protected_node_names`); ``op_types``
    limits what is quantized (None: every op ORT can quantize).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if calibrate_method not in methods:
        raise UserError(f"calibrate_method {calibrate_method!r}: choose one of {', '.join(methods)}")
    if not calibration:
        raise UserError("static quantization needs calibration batches")
    with tempfile.TemporaryDirectory(prefix="tome-qdq-") as tmp:
        source = preprocess_for_quantization(onnx_in, Path(tmp) / "pre.onnx") if preprocess else Path(onnx_in)
        model = onnx.load(str(source), load_external_data=False)
        input_name = model.graph.input[0].name
        present = {n.name for n in model.graph.node}
        options = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": symmetric_weights,
                   **(extra_options or {})}
        with _quiet_root_logger():
            quantize_static(
                str(source), str(onnx_out), _calibration_reader(input_name, calibration),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types) if op_types else None,
                per_channel=per_channel, reduce_range=reduce_range, activation_type=_quant_type(activation_type),
                weight_type=_quant_type(weight_type), nodes_to_exclude=[n for n in exclude if n in present],
                calibrate_method=methods[calibrate_method], extra_options=options,
            )
    return Path(onnx_out)


def quantize_dynamic_int8(
    onnx_in: os.PathLike,
    onnx_out: os.PathLike,
    *,
    exclude: Sequence[str] = (),
    per_channel: bool = False,
    reduce_range: bool = False,
    weight_type: str = "int8",
    op_types: Optional[Sequence[str]] = ("MatMul",),
    preprocess: bool = True,
    extra_options: Optional[Mapping[str, object]] = None,
) -> Path:
    """Dynamic int8 quantization (ORT ``quantize_dynamic``): int8 weights, activations quantized per batch."""
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="tome-dyn-") as tmp:
        source = preprocess_for_quantization(onnx_in, Path(tmp) / "pre.onnx") if preprocess else Path(onnx_in)
        present = {n.name for n in onnx.load(str(source), load_external_data=False).graph.node}
        with _quiet_root_logger():
            quantize_dynamic(
                str(source), str(onnx_out), op_types_to_quantize=list(op_types) if op_types else None,
                per_channel=per_channel, reduce_range=reduce_range, weight_type=_quant_type(weight_type),
                nodes_to_exclude=[n for n in exclude if n in present], extra_options=dict(extra_options or {}),
            )
    return Path(onnx_out)
