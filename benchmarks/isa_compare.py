"""Run one artifact under several CPU instruction-set limits and show where the outputs part: logits, intermediate
tensors, and (OpenVINO) which kernel ran each layer.

oneDNN, under OpenVINO's CPU plugin, picks its kernels by the CPU's features at run time, and
``ONEDNN_MAX_CPU_ISA`` caps them (values: SSE41, AVX, AVX2, AVX2_VNNI, AVX512_CORE, AVX512_CORE_VNNI,
AVX512_CORE_BF16, AVX512_CORE_FP16, AVX512_CORE_AMX, ...). The variable is read when the library loads, so each
setting runs in its own process. On an AMX machine, compare AMX on and off:

    python benchmarks/isa_compare.py DIR --isa default --isa AVX512_CORE_VNNI --out isa-report

On a machine without AVX-512 the only comparison available is downwards, e.g. ``--isa default --isa SSE41``.

For each setting it runs the artifact's stored self-check views (or the bundled photos) through the runner
deployments use (``tome_export.runtime``), twice: as built (its logits, and for OpenVINO the kernel and precision
each layer ran with) and with intermediate tensors exposed as extra outputs (``--tensors``: ``tome`` for the ToMe layers,
``all`` for every layer, or a regular expression on layer and tensor names). Exposing a tensor can change
how the backend fuses the graph: the report says whether the logits with exposed tensors still match the logits as
built; where they do not, narrow ``--tensors``.

Writes <out>.json and <out>.md: per setting, the logits against the PyTorch outputs stored at build (cosine, top-1),
the layers whose kernel differs between settings, and the intermediate tensors in graph order with the first one
that parts (cosine below ``--part-below``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

PRESETS = {"tome": r"^(tome_match|tome_merge)/", "all": r"."}
ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"


# --- in each setting's own process ------------------------------------------------------------------------------


def tensor_names(directory: Path, runtime: Dict[str, Any], pattern: str) -> List[str]:
    """Output tensor names of the artifact's graph that match ``pattern``, in graph order."""
    rx = re.compile(PRESETS.get(pattern, pattern))
    path = directory / str(runtime.get("file", "model.onnx"))
    if path.suffix == ".xml":
        import openvino as ov

        model = ov.Core().read_model(str(path))
        names = [name for op in model.get_ordered_ops() if op.get_type_name() not in ("Constant", "Parameter", "Result")
                 for out in op.outputs() for name in sorted(out.get_names())[:1]
                 if rx.search(op.get_friendly_name()) or rx.search(name)]
    else:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        names = [out for node in graph.node for out in node.output[:1] if rx.search(node.name) or rx.search(out)]
    return list(dict.fromkeys(names))


def kernels(runner: Any) -> Optional[List[Dict[str, str]]]:
    """OpenVINO: each executed layer's type, kernel (``primitiveType``), precision and original layers."""
    compiled = getattr(runner, "compiled", None)
    if compiled is None:
        return None
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        get = lambda key: rt[key].astype(str) if key in rt else ""  # noqa: E731
        layers.append({"name": op.get_friendly_name(), "type": get("layerType"), "kernel": get("primitiveType"),
                       "precision": get("runtimePrecision"), "original": get("originalLayersNames")})
    return layers


def inputs_of(artifact: Any, runner: Any) -> np.ndarray:
    from tome_export.images import sample_photos
    from tome_export.runtime import selfcheck

    record = artifact.manifest.self_check
    if record.get("file"):
        return selfcheck.SelfCheckData.read(artifact.directory / record["file"]).inputs
    return runner.preprocess_batch(sample_photos(4))


def worker(args: argparse.Namespace) -> None:
    from tome_export.runtime import open_artifact, selfcheck

    artifact = open_artifact(args.artifact)
    output = artifact.io.outputs[0]
    result: Dict[str, Any] = {}
    with artifact.load(args.threads, self_check=False) as runner:
        x = inputs_of(artifact, runner)
        rows, ids = selfcheck.run_views(runner, x, output)
        result.update(environment=runner.environment(), kernels=kernels(runner), ids=ids.tolist())
        arrays = {"logits": rows}
    names = tensor_names(artifact.directory, artifact.io.runtime, args.tensors) if args.tensors != "none" else []
    if names:
        with artifact.load(args.threads, extra_outputs=names, self_check=False) as runner:
            exposed = [n for n in names if n in runner.output_names]
            plan = selfcheck.run_plan(len(x), runner.batch_size)
            runs = [runner.infer(np.ascontiguousarray(x[p]), [output] + exposed) for p in plan]
        arrays["logits_exposed"] = np.concatenate([r[output] for r in runs])
        for i, name in enumerate(exposed):
            arrays[f"t{i}"] = np.concatenate([r[name] for r in runs])
        result["tensors"] = exposed
    np.savez(args.worker_out, **arrays)
    Path(args.worker_out).with_suffix(".json").write_text(json.dumps(result))


# --- the comparison ---------------------------------------------------------------------------------------------


def run_setting(artifact: Path, isa: str, args: argparse.Namespace, scratch: Path) -> Dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != ISA_VARIABLE}
    if isa != "default":
        env[ISA_VARIABLE] = isa
    out = scratch / f"{isa}.npz"
    command = [sys.executable, __file__, str(artifact), "--worker-out", str(out), "--tensors", args.tensors]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"isa": isa, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    with np.load(out) as data:
        arrays = {k: data[k] for k in data.files}
    return {"isa": isa, **json.loads(out.with_suffix(".json").read_text()), "arrays": arrays}


def figures(a: np.ndarray, b: np.ndarray) -> Dict[str, float]:
    from tome_export.runtime.selfcheck import logit_cosines

    a64, b64 = a.astype(np.float64).reshape(len(a), -1), b.astype(np.float64).reshape(len(b), -1)
    cosines = logit_cosines(a64, b64)
    cosines[(a64 == b64).all(1)] = 1.0  # identical rows (all-zero masks included) agree
    return {"min_cosine": float(cosines.min()), "max_abs_diff": float(np.abs(a64 - b64).max())}


def against_reference(artifact: Path, setting: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    from tome_export.manifest import load_manifest
    from tome_export.runtime import selfcheck

    manifest = load_manifest(artifact, verify=False)
    if not manifest.self_check.get("file"):
        return None
    data = selfcheck.SelfCheckData.read(artifact / manifest.self_check["file"])
    metrics = selfcheck.row_metrics(data.reference, setting["arrays"]["logits"], np.array(setting["ids"]))
    return {k: metrics[k] for k in ("min_cosine", "max_abs_diff", "top1_agreement", "views")}


def kernel_changes(a: Dict[str, Any], b: Dict[str, Any]) -> List[Dict[str, str]]:
    if not a.get("kernels") or not b.get("kernels"):
        return []
    theirs = {layer["name"]: layer for layer in b["kernels"]}
    return [{"layer": layer["name"], "type": layer["type"], a["isa"]: f"{layer['kernel']} {layer['precision']}",
             b["isa"]: f"{theirs[layer['name']]['kernel']} {theirs[layer['name']]['precision']}"}
            for layer in a["kernels"] if layer["name"] in theirs
            and (layer["kernel"], layer["precision"]) != (theirs[layer["name"]]["kernel"], theirs[layer["name"]]["precision"])]


def tensor_parting(a: Dict[str, Any], b: Dict[str, Any], below: float) -> Dict[str, Any]:
    names = [n for n in a.get("tensors", []) if n in b.get("tensors", [])]
    table = []
    for name in names:
        ta = a["arrays"][f"t{a['tensors'].index(name)}"]
        tb = b["arrays"][f"t{b['tensors'].index(name)}"]
        table.append({"tensor": name, **(figures(ta, tb) if ta.shape == tb.shape else {"shape": "differs"})})
    first = next((row for row in table if row.get("min_cosine", 1.0) < below), None)
    return {"tensors": table, "first_parting": first}


def compare(artifact: Path, settings: List[Dict[str, Any]], below: float) -> Dict[str, Any]:
    report: Dict[str, Any] = {"artifact": str(artifact), "settings": []}
    for s in settings:
        entry = {"isa": s["isa"], "error": s.get("error")}
        if "arrays" in s:
            entry.update(environment=s["environment"], against_reference=against_reference(artifact, s))
            if "logits_exposed" in s["arrays"]:
                entry["exposing_tensors_changes_logits"] = figures(s["arrays"]["logits"], s["arrays"]["logits_exposed"])
        report["settings"].append(entry)
    ok = [s for s in settings if "arrays" in s]
    report["pairs"] = [{"a": a["isa"], "b": b["isa"], "logits": figures(a["arrays"]["logits"], b["arrays"]["logits"]),
                        "kernel_changes": kernel_changes(a, b), **tensor_parting(a, b, below)}
                       for i, a in enumerate(ok) for b in ok[i + 1:]]
    return report


def markdown(report: Dict[str, Any]) -> str:
    lines = [f"# ISA comparison of {report['artifact']}", "", "| setting | CPU | vs PyTorch: min cosine | top-1 | "
             "exposing tensors moves logits by |", "|---|---|---|---|---|"]
    from tome_export.runtime.machine import describe_cpu

    for s in report["settings"]:
        if s.get("error"):
            lines.append(f"| {s['isa']} | failed: {s['error']} | | | |")
            continue
        ref = s.get("against_reference") or {}
        moved = (s.get("exposing_tensors_changes_logits") or {}).get("max_abs_diff")
        lines.append(f"| {s['isa']} | {describe_cpu(s['environment']['cpu'])} | {ref.get('min_cosine', '-')} | "
                     f"{ref.get('top1_agreement', '-')} | {moved if moved is not None else '-'} |")
    for pair in report["pairs"]:
        lines += ["", f"## {pair['a']} vs {pair['b']}", "", f"logits: min cosine {pair['logits']['min_cosine']:.6f}, "
                  f"max abs diff {pair['logits']['max_abs_diff']:.3g}; {len(pair['kernel_changes'])} layers ran "
                  f"another kernel or precision", ""]
        lines += [f"- {c['layer']} ({c['type']}): {c[pair['a']]} -> {c[pair['b']]}" for c in pair["kernel_changes"][:40]]
        first = pair["first_parting"]
        lines += ["", f"first tensor that parts: {json.dumps(first) if first else 'none'}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="a directory written by tome-export")
    p.add_argument("--isa", action="append", help=f"a {ISA_VARIABLE} value, or 'default' (repeat; default: "
                   "default and SSE41)")
    p.add_argument("--tensors", default="tome", help="intermediate tensors to compare: tome, all, none or a regex")
    p.add_argument("--part-below", type=float, default=0.999, help="a tensor parts below this cosine (default 0.999)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the backend's)")
    p.add_argument("--out", type=Path, default=Path("isa-compare"), help="writes OUT.json and OUT.md")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_out:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="isa-compare-") as tmp:
        settings = [run_setting(args.artifact, isa, args, Path(tmp)) for isa in (args.isa or ["default", "SSE41"])]
    report = compare(args.artifact, settings, args.part_below)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    Path(f"{args.out}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
