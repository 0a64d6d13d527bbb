"""Export a (ToMe-patched) model to a static-shape ONNX graph.

Uses the torch dynamo exporter at opset >= 18: below 16 ScatterElements has no add-reduction and
exporters silently turn the merge into an overwrite. Only the batch dimension may be dynamic; every
token count is a constant. Node metadata (stack traces, source paths) is stripped so that two exports of
the same model are byte-identical.

ToMe nodes are named by role so downstream tools can find them without pattern matching:
``tome_match/<block>/...`` is the token-matching path (metric normalisation, scores, ranking, index
building) and ``tome_merge/<block>/...`` applies the merge (size weighting, gathers and scatter-adds or one-hot
products, the log-size attention bias). Quantizers and fp16 converters keep both in fp32.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import onnx
import torch

from .errors import UserError
from .graph_names import DYNAMIC_OPS, INPUT_NAME, MATCH_PREFIX, MERGE_PREFIX, OUTPUT_NAME, SOURCE_NAME
from .onnx_files import save_onnx

MIN_OPSET = 18


def max_opset() -> int:
    """The highest opset both the installed exporter writes and the installed onnx knows."""
    from torch.onnx import _constants

    return min(int(_constants.ONNX_MAX_OPSET), onnx.defs.onnx_opset_version())


class _WithSource(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.model.tome_outputs(x, trace_source=True)


def output_names(model: torch.nn.Module, trace_source: bool = False) -> List[str]:
    """The graph's outputs: those of the model's task (``logits`` for a model without one), then ``source``."""
    task = getattr(model, "tome_task", None)
    names = list(task.outputs) if task is not None else [OUTPUT_NAME]
    return names + ([SOURCE_NAME] if trace_source else [])


def _tome_name(node: onnx.NodeProto) -> str:
    """``tome_match/<block>/<name>`` or ``tome_merge/<block>/<name>`` for ToMe nodes, else the node's name."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    for scope in reversed(ast.literal_eval(scopes) if scopes else []):
        for suffix, prefix in ((".tome_merge.match", MATCH_PREFIX), (".tome_merge", MERGE_PREFIX)):
            if scope.endswith(suffix):
                return f"{prefix}{scope[: -len(suffix)]}/{node.name}"
    return node.name


def tome_nodes(model: onnx.ModelProto) -> Dict[str, List[str]]:
    """Names of the ToMe nodes of an exported graph: ``match`` (matching path) and ``merge`` (merge application)."""
    names = [n.name for n in model.graph.node]
    return {"match": [n for n in names if n.startswith(MATCH_PREFIX)],
            "merge": [n for n in names if n.startswith(MERGE_PREFIX)]}


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Name ToMe nodes by role, then drop per-node metadata (stack traces differ between runs, leak paths)."""
    graphs: List[onnx.GraphProto] = [model.graph]
    while graphs:
        graph = graphs.pop()
        graph.doc_string = ""
        for node in graph.node:
            node.name = _tome_name(node)
            del node.metadata_props[:]
            node.doc_string = ""
            graphs.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del model.metadata_props[:]


def static_shape_problems(model: onnx.ModelProto, dynamic_batch: bool) -> List[str]:
    """Reasons the graph is not static-shaped (empty when it is)."""
    problems = [f"node {n.name or n.op_type} is a {n.op_type}" for n in model.graph.node if n.op_type in DYNAMIC_OPS]
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if i == 0 and dynamic_batch:
                continue
            if not d.HasField("dim_value"):
                problems.append(f"{value.name} has a non-constant dimension {i} ({d.dim_param or '?'})")
    return problems


def export_onnx(
    model: torch.nn.Module,
    path: os.PathLike,
    input_shape: Sequence[int],
    *,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int = MIN_OPSET,
    trace_source: bool = False,
    metadata: Optional[Iterable[Tuple[str, str]]] = None,
) -> Path:
    """Write ``model`` (eval mode) as an ONNX graph with input ``images`` ``(B, C, H, W)``: one self-contained
    file, or over protobuf's 2 GB limit the graph plus one data file beside it (see :mod:`.onnx_files`).

    Outputs those of the model's task (:func:`output_names`: ``logits`` for ``classify``), and ``source`` with
    ``trace_source`` (which input tokens each final token holds).
    """
    if opset < MIN_OPSET:
        raise UserError(
            f"--opset {opset} is too low: ToMe's scatter-add needs opset >= 16 (lower opsets silently drop merges) "
            f"and the exporter needs >= {MIN_OPSET}; use --opset {MIN_OPSET} or higher"
        )
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    path = Path(path)
    module = _WithSource(model) if trace_source else model
    module.eval()
    example_batch = max(batch, 2) if dynamic_batch else batch
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(example_batch, *input_shape, generator=gen)
    outputs = output_names(model, trace_source)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    log = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            optimize=True,
        )
    proto = program.model_proto
    _strip_metadata(proto)
    if dynamic_batch:
        for value in list(proto.graph.input) + list(proto.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
    for key, value in metadata or ():
        proto.metadata_props.add(key=key, value=value)
    problems = static_shape_problems(proto, dynamic_batch)
    if problems:
        raise RuntimeError("exported graph is not static-shaped: " + "; ".join(problems[:5]))
    return save_onnx(proto, path)
