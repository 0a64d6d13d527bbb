"""What a built artifact (or a bare ToMe ``model.onnx``) holds, in readable form or as JSON.

``inspect_path(path) -> report`` (a JSON-able dict) and ``format_report(report) -> text``. For a build
directory the report is the manifest (schedule, tokens, FLOPs, precision, validation) plus what is on disk
now (sizes, checksum status) and what the graphs contain (op histograms with the ToMe nodes apart, token
counts per ToMe block from shape inference, the TensorRT-compatibility verdict). For a bare ONNX file only
the graph part can be derived. Imports no torch itself (the TensorRT checker may).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import UserError, build_stack_missing
from .files import sha256_file
from .graph_names import MATCH_PREFIX, MERGE_PREFIX, block_of, block_order
from .manifest import MANIFEST, Manifest, read_manifest, unchanged_since_build
from .manifest_schema import newer_version_note


# --- graphs -----------------------------------------------------------------------------------------


def _dims(value: Any) -> List[Any]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def _io(values: Any) -> List[Dict[str, Any]]:
    import onnx

    return [{"name": v.name, "shape": _dims(v),
             "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
             if v.type.tensor_type.elem_type else "?"} for v in values]


def tome_blocks(model: Any) -> List[Dict[str, Any]]:
    """Per ToMe block: tokens in and out, from shape inference (None where shapes are unknown).

    Tokens in: the token axis of the keys the matching averages over heads (its ReduceMean); tokens out: the
    token axis of the size-weighted average (the merge's Div).
    """
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here; the op histogram needs none
        inferred = model
    shapes = {v.name: _dims(v) for v in list(inferred.graph.value_info) + list(inferred.graph.input)
              + list(inferred.graph.output)}
    blocks: Dict[str, Dict[str, Any]] = {}
    for node in inferred.graph.node:
        if not node.name.startswith((MATCH_PREFIX, MERGE_PREFIX)):
            continue
        entry = blocks.setdefault(block_of(node.name), {"block": block_of(node.name), "tokens_in": None,
                                                         "tokens_out": None})
        if node.name.startswith(MATCH_PREFIX) and node.op_type == "ReduceMean":
            shape = shapes.get(node.input[0], [])
            if len(shape) == 4 and isinstance(shape[2], int):
                entry["tokens_in"] = shape[2]
        if node.name.startswith(MERGE_PREFIX) and node.op_type == "Div":
            shape = shapes.get(node.output[0], [])
            if len(shape) == 3 and isinstance(shape[1], int):
                entry["tokens_out"] = shape[1]
    for entry in blocks.values():
        if entry["tokens_in"] is not None and entry["tokens_out"] is not None:
            entry["r"] = entry["tokens_in"] - entry["tokens_out"]
    return sorted(blocks.values(), key=lambda e: block_order(e["block"]))


def tensorrt_verdict(model: Any) -> Dict[str, Any]:
    """The TensorRT-compatibility checker's answer, strict and with the ScatterElements plugin allowed."""
    from .targets.tensorrt.compat import tensorrt_problems

    strict = list(tensorrt_problems(model))
    plugin = list(tensorrt_problems(model, allow_scatter_plugin=True))
    if not strict:
        verdict = "compatible"
    elif not plugin:
        verdict = "compatible only with the ScatterElements plugin (TensorRT with libnvinfer_plugin, not TensorRT-RTX)"
    else:
        verdict = f"not compatible ({len(plugin)} problem{'s' * (len(plugin) != 1)})"
    return {"available": True, "verdict": verdict, "problems": strict, "problems_with_scatter_plugin": plugin}


def graph_summary(path: Path) -> Dict[str, Any]:
    """Op histogram (ToMe matching / merging / other), inputs, outputs, opset, ToMe blocks, TensorRT verdict (an
    ``error`` instead where the graph cannot be read, or ``onnx`` is not installed: a runtime-only install)."""
    try:
        import onnx
    except ImportError:
        return {"error": f"{path.name}: the graph's details need the Python package 'onnx' (not installed: a "
                         f"runtime-only install); pip install onnx to see them", "missing": "onnx"}

    try:
        model = onnx.load(str(path), load_external_data=False)  # the graph, not gigabytes of weights
    except Exception as exc:  # a truncated or foreign file: say so in the report
        return {"error": f"cannot read {path.name} as ONNX ({type(exc).__name__})"}
    roles: Dict[str, collections.Counter] = {"tome_match": collections.Counter(), "tome_merge": collections.Counter(),
                                             "other": collections.Counter()}
    for node in model.graph.node:
        role = "tome_match" if node.name.startswith(MATCH_PREFIX) else (
            "tome_merge" if node.name.startswith(MERGE_PREFIX) else "other")
        roles[role][node.op_type] += 1
    ops = sum(roles.values(), collections.Counter())
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "nodes": len(model.graph.node),
        "opset": opset,
        "ir_version": model.ir_version,
        "inputs": _io(model.graph.input),
        "outputs": _io(model.graph.output),
        "metadata": {p.key: p.value for p in model.metadata_props},
        "ops": dict(ops.most_common()),
        **{f"{role}_ops": dict(c.most_common()) for role, c in roles.items()},
        "tome_blocks": tome_blocks(model),
        "tensorrt": tensorrt_verdict(model),
    }


# --- directories ------------------------------------------------------------------------------------


def checksum_status(directory: Path, manifest: Dict[str, Any]) -> Dict[str, Any]:
    """Each listed artifact: size on disk and ``ok`` / ``modified`` / ``missing``; files the manifest does not list."""
    files = {}
    for rel, entry in manifest.get("artifacts", {}).items():
        path = directory / rel
        if not path.is_file():
            files[rel] = {"status": "missing", "bytes": None}
            continue
        want = entry.get("sha256") if isinstance(entry, dict) else None
        files[rel] = {"status": "ok" if sha256_file(path) == want else "modified", "bytes": path.stat().st_size}
    listed = set(files) | {MANIFEST}
    unlisted = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                      if p.is_file() and p.relative_to(directory).as_posix() not in listed)
    manifest_ok = unchanged_since_build(manifest)
    ok = manifest_ok and all(f["status"] == "ok" for f in files.values())
    return {"ok": ok, "manifest_unchanged": manifest_ok, "files": files, "unlisted": unlisted}


def inspect_path(path: os.PathLike) -> Dict[str, Any]:
    """The report of a build directory or of a bare ``.onnx`` file."""
    path = Path(path)
    if path.is_file():
        if path.name == MANIFEST:
            return inspect_path(path.parent)
        graph = graph_summary(path)
        if graph.get("missing"):
            raise UserError(build_stack_missing(graph["missing"], "inspecting a bare graph"))
        if "error" in graph:
            raise UserError(f"{graph['error']}: pass a .onnx model or a directory written by tome-export")
        return {"path": str(path), "kind": "onnx", "bytes": path.stat().st_size, "sha256": sha256_file(path),
                "graphs": {path.name: graph}}
    if not path.is_dir():
        raise UserError(f"{str(path)!r} does not exist: pass a directory written by tome-export or a .onnx file")
    manifest = read_manifest(path, verify=False)
    checks = checksum_status(path, manifest)
    graphs = {rel: graph_summary(path / rel) for rel in sorted(manifest["artifacts"])
              if rel.endswith(".onnx") and checks["files"][rel]["status"] != "missing"}
    return {"path": str(path), "kind": "artifact", "manifest": manifest, "checksums": checks, "graphs": graphs,
            "newer_version": newer_version_note(manifest)}


# --- text -------------------------------------------------------------------------------------------


def _size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _runs(values: List[int]) -> str:
    """``[16, 16, 16, 10]`` -> ``16 x3, 10``."""
    out: List[str] = []
    for v in values:
        if out and out[-1].split(" x")[0] == str(v):
            head, _, count = out[-1].partition(" x")
            out[-1] = f"{head} x{int(count or 1) + 1}"
        else:
            out.append(str(v))
    return ", ".join(out)


def _histogram(ops: Dict[str, int], limit: int = 12) -> str:
    items = list(ops.items())
    text = " ".join(f"{op} {n}" for op, n in items[:limit])
    return text + (f" (+{len(items) - limit} more op types)" if len(items) > limit else "") if items else "none"


def _graph_lines(name: str, g: Dict[str, Any]) -> List[str]:
    if "error" in g:
        return [f"graph {name}: {g['error']}"]
    io = lambda vs: ", ".join(f"{v['name']} {v['shape']} {v['dtype']}" for v in vs)  # noqa: E731
    lines = [f"graph {name}: {g['nodes']} nodes, opset {g['opset']}, IR {g['ir_version']}",
             f"  inputs     {io(g['inputs'])}",
             f"  outputs    {io(g['outputs'])}"]
    n_match, n_merge = sum(g["tome_match_ops"].values()), sum(g["tome_merge_ops"].values())
    lines.append(f"  ToMe match {n_match} nodes: {_histogram(g['tome_match_ops'])}")
    lines.append(f"  ToMe merge {n_merge} nodes: {_histogram(g['tome_merge_ops'])}")
    lines.append(f"  other      {sum(g['other_ops'].values())} nodes: {_histogram(g['other_ops'])}")
    if g["tome_blocks"]:
        blocks = ", ".join(f"{b['block'].split('.')[-1]}:{b['tokens_in']}->{b['tokens_out']}" for b in g["tome_blocks"])
        lines.append(f"  ToMe blocks {len(g['tome_blocks'])} (block:tokens in->out) {blocks}")
    else:
        lines.append("  ToMe blocks none (no tome_match/ or tome_merge/ nodes: not a ToMe graph, or r=0)")
    if "tome_export.r_schedule" in g["metadata"]:
        lines.append(f"  r (metadata) {g['metadata']['tome_export.r_schedule']}")
    if "tome_export.preprocessing" in g["metadata"]:
        try:
            described = json.loads(g["metadata"]["tome_export.preprocessing"])
            lines.append(f"  preprocessing (metadata) {described['steps']}; mean {described['mean']}, "
                         f"std {described['std']}")
        except (ValueError, KeyError, TypeError):
            lines.append("  preprocessing (metadata) unreadable: not written by this version of tome-export")
    trt = g["tensorrt"]
    lines.append(f"  TensorRT   {trt['verdict']}")
    problems = trt.get("problems_with_scatter_plugin") or trt.get("problems") or []
    for problem in problems[:3]:
        lines.append(f"             - {problem}")
    if len(problems) > 3:
        lines.append(f"             (and {len(problems) - 3} more; --json lists all)")
    return lines


def _interval(v: Dict[str, Any]) -> str:
    """The top-1 agreement's 95 % interval as text (empty for manifests written before it was recorded)."""
    interval = v.get("top1_interval_95")
    return f" (95% interval {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""


def _validation_line(v: Dict[str, Any], precision: Optional[str]) -> str:
    parts = []
    if isinstance(v.get("max_abs_diff"), (int, float)):
        limit = (v.get("thresholds") or {}).get("max_abs_diff", v.get("threshold_max_abs_diff"))
        parts.append(f"max |diff| {v['max_abs_diff']:.2e}" + (f" (allowed {limit:g})" if limit is not None else ""))
    if isinstance(v.get("min_cosine"), (int, float)):
        parts.append(f"min cosine {v['min_cosine']:.6f}")
    if isinstance(v.get("top1_agreement"), (int, float)):
        parts.append(f"top-1 agreement {v['top1_agreement']:.3f}{_interval(v)}")
    shown = {"backend", "precision_ran", "passed", "max_abs_diff", "threshold_max_abs_diff", "min_cosine",
             "top1_agreement", "top1_interval_95", "images", "runs", "thresholds"}
    others = {k: val for k, val in (v.get("thresholds") or {}).items() if k != "max_abs_diff"}  # that one: allowed
    if others:
        parts.append(f"thresholds {json.dumps(others)}")
    parts += [f"{k} {json.dumps(val)}" for k, val in v.items() if k not in shown]  # what targets add
    images = f" on {v['images']} images" if "images" in v else ""
    if "runs" in v:
        images += f" ({v['runs']} runs over the batch sizes)"
    verdict = "passed" if v.get("passed") else "FAILED"
    return (f"validation {v.get('backend')} at {v.get('precision_ran', precision)}: {verdict}{images}; "
            + ", ".join(parts))


def _engine_line(trt: Any) -> Optional[str]:
    """A TensorRT build's engine: what built it, where, and how it validated against the ONNX."""
    if not isinstance(trt, dict):
        return None
    engine = trt.get("engine")
    if not engine:
        return f"engine     none: {trt.get('engine_note', 'not built')}"
    device = engine.get("device") or {}
    where = f" on {device['name']} (compute capability {device.get('compute_capability', '?')})" \
        if device.get("name") else ""
    text = (f"engine     {engine.get('file')} {_size(engine.get('bytes', 0))}, {engine.get('library')} "
            f"{engine.get('library_version')}, built in {engine.get('build_seconds')} s{where}; ")
    v = trt.get("engine_validation")
    if v is None:  # built by the build itself, before the handoff step existed or on the build machine
        return text + "validated: the ONNX it was built from (above); the engine itself was not run"
    if not v.get("run"):
        return text + f"NOT validated ({v.get('reason')}): {v.get('how')}"
    return text + (f"validation against the ONNX {'passed' if v.get('passed') else 'FAILED'} on {v.get('images')} "
                   f"photos: min cosine {v.get('min_cosine', 0):.6f}, top-1 agreement {v.get('top1_agreement', 0):.3f}")


def _where_validated_lines(m: Manifest) -> List[str]:
    """The machine and runtime the build validated on, and what the artifact checks itself against where it runs."""
    from .runtime.machine import describe_cpu

    lines = []
    on = m.validated_on
    if on:
        versions = ", ".join(f"{k} {v}" for k, v in sorted((on.get("versions") or {}).items()))
        device = (on.get("device") or {}).get("name") if isinstance(on.get("device"), dict) else None
        lines.append(f"validated on {describe_cpu(on.get('cpu') or {})}{', ' + device if device else ''}"
                     f"{', ' + versions if versions else ''}")
    check = m.self_check
    if check:
        built = check.get("on_build_machine")
        figures = (f"; on the build machine min cosine {built['min_cosine']:.6f}, max |diff| "
                   f"{built['max_abs_diff']:.3g}" if built else "; not run on the build machine")
        lines.append(f"self-check {check.get('views')} stored views ({check.get('file')}), thresholds "
                     f"{json.dumps(check.get('thresholds'))}{figures}; runs before the first use on each machine "
                     f"(tome-export verify runs it now)")
    elif not m.failed:
        lines.append("self-check none (built before artifacts carried one): runtime.load cannot tell whether it "
                     "computes here what it computed when built")
    return lines


def _model_line(model: Dict[str, Any], upstream: Optional[str]) -> str:
    seed = f" seed {model['seed']}" if model.get("weights") == "random" else ""
    checkpoint = f" {model['checkpoint']}" if model.get("checkpoint") else ""
    text = (f"model      {model.get('alias')} ({upstream}, {model.get('family')}), weights {model.get('weights')}"
            f"{seed}{checkpoint}")
    if model.get("preprocessing_guessed"):
        return text + f"\npreprocessing GUESSED: {model['preprocessing_guessed']}"
    return text + (f"; preprocessing from {model['preprocessing_from']}" if model.get("preprocessing_from") else "")


def _outputs(m: Manifest) -> str:
    """The outputs with their shapes where the manifest records them."""
    return ", ".join(f"{name} {list(m.output_shapes[name])}" if name in m.output_shapes else name
                     for name in m.outputs)


def _task_line(m: Manifest) -> Optional[str]:
    """What a tokens artifact keeps: its token count against the patches it takes (a 576 -> 144 style figure)."""
    shapes = m.output_shapes
    if m.task.name != "tokens" or "tokens" not in shapes or "token_owners" not in shapes:
        return None
    kept, patches = shapes["tokens"][1], shapes["token_owners"][1]
    return f"tokens out {kept} of {patches} patches ({patches / kept:.2f}x fewer for the model downstream)"


def manifest_lines(m: Manifest) -> List[str]:
    """The manifest's facts as aligned text lines (model, target, input, schedule, FLOPs, validation, what the
    target added)."""
    from .quality.decisions import summary_line

    lines = [_model_line(m.model, m.upstream_name),
             f"target     {m.target} {m.precision}, merge {m.merge_impl}, opset {m.opset}, proportional attention "
             f"{'on' if m.prop_attn else 'off'}",
             f"input      {m.input.name} {list(m.input.shape)} {m.input.dtype}; outputs {_outputs(m)}",
             f"task       {m.task.describe()}"]
    kept = _task_line(m)
    if kept:
        lines.append(f"{'':10s} {kept}")
    if m.r_schedule:
        capped = "  (capped: requested " + _runs(list(m.r_requested)) + ")" if m.r_capped else ""
        lines.append(f"r          {_runs(list(m.r_schedule))}{capped}")
        lines.append(f"tokens     {m.num_tokens} ({m.num_protected} protected) -> "
                     f"{' '.join(map(str, m.tokens_per_block))}")
    fl = m.flops
    if fl:
        lines.append(f"FLOPs      {fl.get('gmacs')} GMACs vs {fl.get('gmacs_r0')} at r=0: {fl.get('ratio')}x fewer")
    if m.failed:
        lines.append(f"FAILED     validation failed; kept for inspection only (--keep-failed), never loadable: "
                     f"{m.failed.get('reason')}")
    if m.validation:
        lines.append(_validation_line(m.validation, m.precision))
    lines += _where_validated_lines(m)
    engine = _engine_line(m.section("tensorrt"))
    if engine:
        lines.append(engine)
    added = {**m.sections, "runtime": m.runtime, "notes": list(m.notes)}
    merges = summary_line(m.merge_decisions or {})  # the per-block figures: --json
    if merges:
        lines.append(f"merges     {merges}")
    lines += [f"note       {note}" for note in added.pop("notes")]
    for key in sorted(k for k, v in added.items() if v):  # what the target added (settings, quantization, ...)
        value = added[key]
        items = sorted(value.items()) if isinstance(value, dict) else [("", value)]
        for i, (name, item) in enumerate(items):  # one setting per line, nested names dotted
            text = _readable(item, f"{name}.") if isinstance(item, dict) and item else f"{name} {_readable(item)}"
            lines.append(f"{key if i == 0 else '':10s} {text.strip()}")
    return lines


def _readable(value: Any, prefix: str = "") -> str:
    """A section as ``name value`` pairs (nested names dotted), for people; ``--json`` keeps the structure."""
    if isinstance(value, dict):
        return "; ".join(_readable(v, f"{prefix}{k}.") if isinstance(v, dict) and v else f"{prefix}{k} {_readable(v)}"
                         for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_readable(v) for v in value) + "]"
    return "-" if value is None else str(value)


def _checksum_lines(c: Dict[str, Any]) -> List[str]:
    lines = [f"file       {rel} {_size(f['bytes'])} sha256 {f['status']}" for rel, f in c["files"].items()]
    lines += [f"file       {rel} not in the manifest" for rel in c["unlisted"]]
    state = "ok" if c["ok"] else "FAILED" + ("" if c["manifest_unchanged"] else " (manifest.json was edited)")
    return lines + [f"checksums  {state}"]


def format_report(report: Dict[str, Any]) -> str:
    """The report as aligned text lines."""
    lines: List[str] = []
    if report["kind"] == "onnx":
        lines += [f"file       {report['path']} ({_size(report['bytes'])}, sha256 {report['sha256'][:16]}...)",
                  "manifest   none: r schedule, FLOPs and validation are recorded only in build directories"]
    else:
        m = Manifest.from_dict(report["manifest"])
        lines.append(f"artifact   {report['path']}")
        if report.get("newer_version"):
            lines.append(f"version    {report['newer_version']}")
        lines += manifest_lines(m)
        lines += _checksum_lines(report["checksums"])
        lines.append("built by   " + ", ".join(f"{k} {val}" for k, val in m.versions.items())
                     + (f" in {m.build_seconds} s" if m.build_seconds is not None else ""))
    for name, g in report["graphs"].items():
        lines += _graph_lines(name, g)
    return "\n".join(lines)


def checksum_failures(report: Dict[str, Any]) -> Optional[str]:
    """What does not verify in an artifact's report (None when everything does, or for a bare graph)."""
    checks = report.get("checksums")
    if checks is None or checks["ok"]:
        return None
    bad = [f"{rel} {f['status']}" for rel, f in checks["files"].items() if f["status"] != "ok"]
    return ", ".join(bad) or "manifest.json edited"


def build_summary(path: Path, m: Manifest) -> List[str]:
    """What the command line prints after a build."""
    from .quality.decisions import summary_line

    v, fl, model = m.validation, m.flops, m.model
    agreement = (f", top-1 agreement {v['top1_agreement']:.3f}{_interval(v)}" if "top1_agreement" in v else
                 f", mean {'patch' if m.task.name != 'embed' else 'embedding'} cosine {v['mean_vector_cosine']:.5f}"
                 if "mean_vector_cosine" in v else "")
    lines = [f"wrote {path}",
             f"  model      {model['alias']} ({model['source']} {model['name']}, weights {model['weights']})",
             f"  task       {m.task.describe()}; outputs {_outputs(m)}",
             f"  r          {list(m.r_schedule)}{'  (capped)' if m.r_capped else ''}",
             f"  tokens     {m.num_tokens} -> {list(m.tokens_per_block)}",
             f"  GMACs      {fl['gmacs']} vs {fl['gmacs_r0']} at r=0 ({fl['ratio']}x fewer)",
             f"  validation {v['backend']}: max |diff| {v['max_abs_diff']:.2e}, min cosine {v['min_cosine']:.5f}"
             f"{agreement} on {v['images']} images"]
    kept = _task_line(m)
    if kept:
        lines.append(f"  {kept}")
    if "precision_ran" in v:
        lines.append(f"  ran        {v['precision_ran']}")
    merges = summary_line(m.merge_decisions or {})
    if merges:
        lines.append(f"  merges     {merges}")
    return lines + [f"  note       {note}" for note in m.notes]
