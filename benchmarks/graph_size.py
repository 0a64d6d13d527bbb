"""Graph size of ToMe exports: ONNX nodes and TensorRT-RTX network layers per merging block, per lowering.

Exports the model (random weights; sizes do not depend on them) at r=0 and at r for each merge lowering,
counts the ONNX nodes (all, and those named ``tome_match/`` / ``tome_merge/``) and parses each graph with
TensorRT-RTX's ONNX parser to count the layers of the network it builds. "Added per merging block" is
(count at r - count at r=0) / number of merging blocks.

TensorRT-RTX has no plugins, so it refuses the gather lowering's ScatterElements(reduction=add); TensorRT
proper runs it as one plugin layer. For a comparable count the gather graph is parsed a second time with
each reducing ScatterElements set to reduction "none" (same inputs and outputs, one layer, like the plugin).
The numbers are those of the parser, not of a built engine (the builder fuses and folds further).

    python benchmarks/graph_size.py                          # vit_t16, r=16, batch 1 and dynamic batch
    python benchmarks/graph_size.py --model vit_b16 --out /tmp/graph_size

Writes <out>.json and <out>.md. Counts are deterministic for the versions recorded in the file.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import onnx

from tome_export import create_model, patch
from tome_export.bench.timing import versions
from tome_export.export import export_onnx, tome_nodes
from tome_export.manifest import dumps
from tome_export.merge import MERGE_IMPLS
from tome_export.models import model_info
from tome_export.preprocess import Preprocessing
from tome_export.schedule import resolve_schedule

HERE = Path(__file__).resolve().parent


def rtx_layers(model: onnx.ModelProto) -> Dict[str, object]:
    """Layers of the network TensorRT-RTX's ONNX parser builds, or the parser's first error."""
    import tensorrt_rtx as trt

    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        return {"parsed": False, "error": str(parser.get_error(0).desc()) if parser.num_errors else "unknown"}
    kinds = collections.Counter(str(network.get_layer(i).type).split(".")[-1] for i in range(network.num_layers))
    return {"parsed": True, "layers": network.num_layers, "layer_types": dict(sorted(kinds.items()))}


def without_scatter_reduction(model: onnx.ModelProto) -> Optional[onnx.ModelProto]:
    """A copy whose reducing ScatterElements plain-scatter instead (None when there is none)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    changed = False
    for node in copy.graph.node:
        if node.op_type == "ScatterElements":
            for attr in node.attribute:
                if attr.name == "reduction" and attr.s != b"none":
                    attr.s, changed = b"none", True
    return copy if changed else None


def block_order(block: str) -> tuple:
    """Sort key of block names in model order (``blocks.2`` before ``blocks.10``)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", block))


def graph_counts(model: onnx.ModelProto) -> Dict[str, object]:
    roles = tome_nodes(model)
    tome = roles["match"] + roles["merge"]
    per_block = collections.Counter(name.split("/")[1] for name in tome)
    blocks = sorted(per_block, key=block_order)
    first_ops = collections.Counter(n.op_type for n in model.graph.node
                                    if n.name in tome and blocks and n.name.split("/")[1] == blocks[0])
    counts: Dict[str, object] = {
        "onnx_nodes": len(model.graph.node), "tome_nodes": len(tome),
        "tome_nodes_per_block": {b: per_block[b] for b in blocks},
        "first_block_ops": dict(sorted(first_ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "rtx": rtx_layers(model),
    }
    relaxed = without_scatter_reduction(model)
    if relaxed is not None:
        counts["rtx_scatter_as_one_layer"] = rtx_layers(relaxed)
    return counts


def export(name: str, r: int, impl: str, dynamic_batch: bool, path: Path) -> onnx.ModelProto:
    model, _ = create_model(name, weights="random", seed=0)
    patch(model, r, merge_impl=impl)
    export_onnx(model, path, Preprocessing.from_model(model).input_size, batch=1, dynamic_batch=dynamic_batch)
    return onnx.load(str(path))


def added(config: Dict[str, object], base: Dict[str, object], blocks: int, key: str) -> Optional[float]:
    if not config[key].get("parsed"):
        return None
    return round((config[key]["layers"] - base["rtx"]["layers"]) / blocks, 1)


def measure(name: str, r: int, merging: int, dynamic_batch: bool) -> Dict[str, object]:
    """Counts of r=0 and of r with each lowering, for a batch of 1 or a dynamic batch."""
    results: Dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = graph_counts(export(name, 0, "gather", dynamic_batch, Path(tmp) / "r0.onnx"))
        results["r0"] = base
        for impl in MERGE_IMPLS:
            config = graph_counts(export(name, r, impl, dynamic_batch, Path(tmp) / f"{impl}.onnx"))
            config["added_onnx_nodes_per_block"] = round((config["onnx_nodes"] - base["onnx_nodes"]) / merging, 1)
            config["added_rtx_layers_per_block"] = added(config, base, merging, "rtx")
            if "rtx_scatter_as_one_layer" in config:
                config["added_rtx_layers_per_block_scatter_as_one_layer"] = added(
                    config, base, merging, "rtx_scatter_as_one_layer")
            results[f"r{r}-{impl}"] = config
    return results


def report(res: dict) -> str:
    lines = [
        f"# Graph size of ToMe exports: {res['model']}, r={res['r']}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ". "
        f"{res['merging_blocks']} merging blocks. Layers: TensorRT-RTX's ONNX parser (network layers before the "
        "builder's fusions). Gather lowering: TensorRT-RTX refuses ScatterElements(reduction=add); the count in "
        "brackets parses it with each reducing scatter as one plain scatter layer (TensorRT proper runs it as one "
        "plugin layer).",
    ]
    for batch, configs in res["batches"].items():
        lines += ["", f"## {batch.replace('_', ' ')}", ""] + table(configs)
    lines += ["", "ToMe nodes of the first merging block (batch 1), by op type:", ""]
    for name, c in res["batches"]["batch_1"].items():
        if name != "r0":
            lines.append(f"- {name}: " + ", ".join(f"{op} {k}" for op, k in c["first_block_ops"].items()))
    return "\n".join(lines) + "\n"


def table(configs: Dict[str, dict]) -> List[str]:
    lines = ["| config | ONNX nodes | ToMe nodes | added nodes / block | RTX layers | added layers / block |",
             "|---|---|---|---|---|---|"]
    for name, c in configs.items():
        rtx = c["rtx"]
        layers = str(rtx["layers"]) if rtx["parsed"] else "refused"
        per_block = c.get("added_rtx_layers_per_block")
        per_block = "" if name == "r0" else (f"{per_block}" if per_block is not None else "-")
        relaxed = c.get("rtx_scatter_as_one_layer")
        if relaxed and relaxed["parsed"]:
            layers += f" ({relaxed['layers']})"
            per_block += f" ({c['added_rtx_layers_per_block_scatter_as_one_layer']})"
        lines.append(f"| {name} | {c['onnx_nodes']} | {c['tome_nodes']} | {c.get('added_onnx_nodes_per_block', '')} "
                     f"| {layers} | {per_block} |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_t16")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--out", type=Path, default=HERE / "results" / "graph_size")
    args = p.parse_args(argv)
    if importlib.util.find_spec("tensorrt_rtx") is None:
        print("graph_size: needs TensorRT-RTX's Python package; pip install tensorrt-rtx-cu12", file=sys.stderr)
        return 2
    model, _ = create_model(args.model, weights="random", seed=0)
    info = model_info(model)
    schedule = resolve_schedule(args.r, info.num_blocks, info.num_tokens, info.num_protected)
    merging = sum(1 for v in schedule.r if v > 0)
    results = {"model": args.model, "r": args.r, "merging_blocks": merging, "tokens_per_block": list(schedule.tokens),
               "versions": versions(["tome_export", "torch", "onnx", "tensorrt_rtx"]),
               "batches": {"batch_1": measure(args.model, args.r, merging, False),
                           "dynamic_batch": measure(args.model, args.r, merging, True)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(dumps(results) + "\n")
    args.out.with_suffix(".md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
