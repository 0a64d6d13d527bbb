"""From raw cell records to what people read: derived ratios, results.csv, report.md and the plots.

Every derived number is computed here from the raw records (throughputs measured side by side in one group), so a
reader can recompute it from results.json.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .quality import headline, task_figure


CSV_NAME = "results.csv"
REPORT_NAME = "report.md"


# --- derived ratios ------------------------------------------------------------------------------------------


def _key(c: Dict[str, Any]) -> Tuple:
    return (c["model"], c["backend"], c["batch"], c["threads"], c["precision"], c["r"])


def derive(cells: Dict[str, Dict[str, Any]]) -> None:
    """Add ``derived`` to every measured cell: speedups against fp32 r=0 of its own group, stacking efficiency.

    speedup = throughput / throughput(fp32, r=0); speedup_tome = the fp32 cell at this r over the baseline;
    speedup_precision = this precision at r=0 over the baseline; stacking_efficiency =
    speedup / (speedup_tome x speedup_precision): 1 means ToMe and the precision multiply exactly.
    """
    measured = {_key(c): c for c in cells.values() if c.get("status") == "measured"}
    for key, cell in measured.items():
        model, backend, batch, threads, precision, r = key
        base = measured.get((model, backend, batch, threads, "fp32", "r0"))
        tome = measured.get((model, backend, batch, threads, "fp32", r))
        prec = measured.get((model, backend, batch, threads, precision, "r0"))

        def ratio(num: Optional[Dict], den: Optional[Dict]) -> Optional[float]:
            if num is None or den is None or num.get("group") != den.get("group") or num.get("node") != den.get("node"):
                return None  # only ratios of throughputs timed side by side, on one node
            return num["throughput_ips"] / den["throughput_ips"]

        derived: Dict[str, Any] = {"baseline": base["id"] if base else None, "speedup": ratio(cell, base),
                                   "speedup_tome": ratio(tome, base), "speedup_precision": ratio(prec, base),
                                   "stacking_efficiency": None}
        if r != "r0" and precision != "fp32" and None not in (derived["speedup"], derived["speedup_tome"],
                                                              derived["speedup_precision"]):
            derived["stacking_efficiency"] = derived["speedup"] / (derived["speedup_tome"] * derived["speedup_precision"])
        if base is None:
            derived["reason"] = "the fp32 r=0 baseline of this group was not measured"
        cell["derived"] = derived


# --- CSV -----------------------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "id", "status", "model_name", "backend", "target", "device", "precision", "r", "batch", "threads",
    "median_ms", "p90_ms", "p99_ms", "min_ms", "throughput_ips", "runs", "speedup", "speedup_tome",
    "speedup_precision", "stacking_efficiency", "gmacs", "flop_ratio", "peak_rss_mb", "artifact_mb", "build_seconds",
    "top1_agreement", "mean_cosine", "min_cosine", "accuracy_top1", "accuracy_top5", "accuracy_drop",
    "merge_decision_agreement", "group", "node", "measured_at", "reason", "task", "task_cosine", "task_figure",
)


def flat_row(cell: Dict[str, Any], variants: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    d, q = cell.get("derived") or {}, variants.get(cell["variant"]) or {}
    art, flops, mem = cell.get("artifact") or {}, cell.get("flops") or {}, cell.get("memory") or {}
    fid, acc = q.get("fidelity") or {}, q.get("accuracy") or {}
    row = {k: cell.get(k) for k in CSV_COLUMNS}
    row.update({k: d.get(k) for k in ("speedup", "speedup_tome", "speedup_precision", "stacking_efficiency")})
    row.update(gmacs=flops.get("gmacs"), flop_ratio=flops.get("ratio"), peak_rss_mb=mem.get("peak_rss_mb"),
               artifact_mb=round(art["artifact_bytes"] / 2**20, 2) if art.get("artifact_bytes") else None,
               build_seconds=art.get("build_seconds"), top1_agreement=fid.get("top1_agreement"),
               mean_cosine=fid.get("mean_cosine"), min_cosine=fid.get("min_cosine"), accuracy_top1=acc.get("top1"),
               accuracy_top5=acc.get("top5"), accuracy_drop=q.get("accuracy_drop"),
               merge_decision_agreement=(q.get("merge_decisions") or {}).get("agreement"),
               task=fid.get("task", "classify"), task_cosine=fid.get("cosine"),
               task_figure=task_figure(fid) if "task" in fid else None)
    return row


def to_csv(results: Dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for cell in results["cells"].values():
        writer.writerow(flat_row(cell, results["variants"]))
    return buf.getvalue()


# --- the Markdown report --------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _x(v: Optional[float], digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}x"


def _f(v: Optional[float], digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def ordered(values: Iterable[Any], order: Sequence[Any]) -> List[Any]:
    """The ``values`` that appear in ``order``, in that order."""
    values = set(values)
    return [v for v in order if v in values]


def best_within_budget(results: Dict[str, Any], cells: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Per (model, batch, threads): the highest-throughput measured cell that stays within the accuracy budget
    (among ``cells``, default all: throughputs are compared only among cells timed on one kind of node).

    Budget: accuracy drop vs fp32 r=0 PyTorch where accuracy was measured, else top-1 agreement with it (for the
    encoder tasks: their mean feature cosine with it, against the budget's ``cosine``).
    """
    budget = results["config"]["budget"]
    best: Dict[Tuple, Dict[str, Any]] = {}
    for cell in (results["cells"].values() if cells is None else cells):
        q = results["variants"].get(cell.get("variant")) or {}
        if cell["status"] != "measured" or "fidelity" not in q:
            continue
        if q.get("accuracy_drop") is not None:
            ok, metric = q["accuracy_drop"] <= budget["accuracy_drop"], f"accuracy drop {100 * q['accuracy_drop']:.2f} pts"
        else:
            agreement, name = headline(q["fidelity"])
            limit = budget["top1_agreement"] if name == "top-1 agreement" else budget.get("cosine", 0.99)
            ok, metric = agreement is not None and agreement >= limit, f"{name} {agreement:.3f}"
        key = (cell["model"], cell["batch"], cell["threads"])
        if ok and (key not in best or cell["throughput_ips"] > best[key]["cell"]["throughput_ips"]):
            best[key] = {"cell": cell, "metric": metric}
    return [best[k] for k in sorted(best)]


def _header(results: Dict[str, Any], measured: List[Dict[str, Any]]) -> List[str]:
    """Title, machine, versions, runs, config and how the numbers were measured."""
    cfg, env = results["config"], results["environment"]
    m = env["machine"]
    run = results["runs"][-1]
    lines = [f"# Benchmark `{cfg['name']}`: ToMe x precision x backend x batch", ""]
    if cfg.get("description"):
        lines += [cfg["description"].strip(), ""]
    gpu = ", ".join(env["gpu"]["devices"]) if env.get("gpu") else "none"
    lines += [
        f"- Machine: {m.get('cpu_model', '?')}, {m.get('cpus')} logical CPUs (flags: {', '.join(m.get('cpu_flags', []))}); "
        f"GPU: {gpu}; {m.get('platform')}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        *[f"- Run {r['run_id']}{' (--force)' if r.get('force') else ''}: {r['started_at']} to {r.get('finished_at', '?')}"
          f"{' on ' + r['machine'] if r.get('machine') and r.get('machine') != m.get('cpu_model') else ''}; "
          f"load average (1/5/15 min) at start {_loads(r.get('load_average'))}, at end {_loads(r.get('load_average_at_end'))}; "
          f"cells measured {r.get('counts', {}).get('measured', '?')}, resumed {r.get('counts', {}).get('resumed', '?')}, "
          f"skipped {r.get('counts', {}).get('skipped', '?')}, failed {r.get('counts', {}).get('failed', '?')}"
          for r in results["runs"] if r is run or r.get("counts", {}).get("measured")],
        f"- Config: {cfg.get('path') or cfg['name']}; threads {cfg['threads']}; batches {cfg['batches']}; "
        f"artifacts built with {'a dynamic batch dimension (one artifact serves every batch size)' if cfg['build']['dynamic_batch'] else 'a static batch per batch size'}, "
        f"merge lowering {cfg['build']['merge_impl']}",
        "",
        "**How this was measured.** For each model, backend, batch size and thread count, all (r, precision) "
        "variants were timed together in interleaved rounds (warm-up, then rounds in rotating order with a short "
        f"pause; {cfg['timing']['rounds']} rounds x {cfg['timing']['per_round']} runs by default), so machine noise "
        "hits them alike. Latency is the median (p90, p99) of those runs; throughput = batch / median. Every speedup "
        "is a ratio of throughputs timed side by side in that group, against fp32 r=0 on the same backend, batch and "
        "threads. Stacking efficiency = speedup(ToMe+precision) / (speedup(ToMe) x speedup(precision)): 1.00 means "
        "they multiply. Fidelity compares logits with fp32 r=0 eager PyTorch on the evaluation images; merge-decision "
        "agreement compares which tokens each block merged with fp32 PyTorch at the same r. GMACs are analytic, from "
        "the per-block token counts. Peak memory: " + (_method(measured) or "not measured") + ".",
        "",
    ]
    return lines + (["No cell was measured.", ""] if not measured else [])


def _reference_accuracy(acc: Optional[Dict[str, Any]]) -> str:
    """fp32 r=0 accuracy: top-1 and top-5 of a classifier, top-1 of a task's probe (named by its method)."""
    if not acc:
        return ""
    top5 = f", top-5 {_pct(acc['top5'])}" if acc.get("top5") is not None else ""
    method = f" ({acc['method']})" if acc.get("method") else ""
    return f"; fp32 r=0 PyTorch accuracy{method} top-1 {_pct(acc['top1'])}{top5}"


def _models(results: Dict[str, Any]) -> List[str]:
    lines = []
    for key, info in results["models"].items():
        acc = info.get("reference_accuracy")
        extra = _reference_accuracy(acc)
        train = info.get("training")
        trained = f"; trained here, fp32 test accuracy {_pct(train['test_accuracy'])}" if train else ""
        pub = info.get("published")
        published = ("; published: " + ", ".join(f"{k} {v}" for k, v in pub.items())) if pub else ""
        lines.append(f"- Model `{key}`: {info['description']} ({info['tokens']} tokens, {info['blocks']} blocks); "
                     f"evaluation images: {info['eval_set']}{extra}{trained}{published}")
    return lines + [""]


def _best(results: Dict[str, Any], cells: Optional[List[Dict[str, Any]]] = None) -> List[str]:
    best = best_within_budget(results, cells)
    if not best:
        return []
    b = results["config"]["budget"]
    lines = ["## Best stack within the accuracy budget", "",
             f"Highest throughput whose accuracy drop vs fp32 r=0 PyTorch is at most {100 * b['accuracy_drop']:.1f} "
             f"points (where accuracy was measured), else whose top-1 agreement with it is at least "
             f"{b['top1_agreement']:.2f} (encoder tasks: whose mean feature cosine with it is at least "
             f"{b.get('cosine', 0.99):.3f}).", ""]
    return lines + _table(
        ["model", "batch", "threads", "backend", "precision", "r", "images/s", "speedup vs its fp32 r=0", "quality"],
        [(e["cell"]["model_name"], e["cell"]["batch"], e["cell"]["threads"], e["cell"]["backend"],
          e["cell"]["precision"], e["cell"]["r"], _f(e["cell"]["throughput_ips"]),
          _x((e["cell"].get("derived") or {}).get("speedup")), e["metric"]) for e in best])


def tome_alone(cell: Dict[str, Any]) -> Optional[float]:
    """ToMe's own effect in a cell: its throughput over r=0 at the same precision, timed side by side."""
    d = cell.get("derived") or {}
    if cell["r"] == "r0" or d.get("speedup") is None or not d.get("speedup_precision"):
        return None
    return d["speedup"] / d["speedup_precision"]


def _losses(measured: List[Dict[str, Any]]) -> List[str]:
    """Where ToMe made things slower than r=0 at the same precision: stated, not left for the reader to find."""
    slower = [c for c in measured if (tome_alone(c) or 1.0) < 1.0]
    tried = [c for c in measured if tome_alone(c) is not None]
    if not tried:
        return []
    lines = ["## Where ToMe is slower than no ToMe", ""]
    if not slower:
        return lines + ["Nowhere: in every measured cell ToMe was at least as fast as r=0 at the same precision.", ""]
    lines += ["ToMe is slower than r=0 at the same precision (same backend, batch and threads) in these cells:", ""]
    lines += [f"- {c['backend']} ({c['device']}), {c['model_name']}, {c['precision']}, {c['r']}, batch {c['batch']}, "
              f"{c['threads']} thread(s): {tome_alone(c):.2f}x" for c in slower]
    by_backend: Dict[str, List[int]] = defaultdict(list)
    for c in slower:
        by_backend[c["backend"]].append(c["batch"])
    return lines + [""] + [f"On **{b}**, ToMe loses at batch size(s) {', '.join(map(str, sorted(set(v))))}."
                           for b, v in by_backend.items()] + [""]


def _stacked_cell(c: Optional[Dict[str, Any]], r: str, p: str) -> str:
    if c is None:
        return "–"
    d = c.get("derived") or {}
    text = _x(d.get("speedup"))
    if d.get("stacking_efficiency") is not None:
        text += f" ({d['stacking_efficiency']:.2f})"
    if r == "r0" and p == "fp32":
        text += f" = {_f(c['throughput_ips'])} im/s"
    return text


def _stacked(groups: Dict[Tuple, List[Dict]], cfg: Dict[str, Any]) -> List[str]:
    """Per backend and batch: speedup vs fp32 r=0, rows r, columns precision."""
    if not groups:
        return []
    lines = ["## Stacked speedup (rows r, columns precision)", "",
             "Speedup vs fp32 r=0 on the same backend, batch and threads; in brackets the stacking efficiency.", ""]
    for (model, backend, threads), members in groups.items():
        for batch in ordered({c["batch"] for c in members}, cfg["batches"]):
            at = {(c["r"], c["precision"]): c for c in members if c["batch"] == batch}
            precisions = ordered({p for _, p in at}, cfg["precisions"])
            lines += [f"**{backend}** — {members[0]['model_name']}, batch {batch}, {threads} thread(s)", ""]
            rows = [[r] + [_stacked_cell(at.get((r, p)), r, p) for p in precisions]
                    for r in ordered({r for r, _ in at}, cfg["r"])]
            lines += _table(["r"] + precisions, rows)
    return lines


def _throughput(groups: Dict[Tuple, List[Dict]], cfg: Dict[str, Any]) -> List[str]:
    if not groups:
        return []
    lines = ["## Throughput by batch size (images/s, speedup vs fp32 r=0 in brackets)", ""]
    for (model, backend, threads), members in groups.items():
        batches = ordered({c["batch"] for c in members}, cfg["batches"])
        at = {(c["r"], c["precision"], c["batch"]): c for c in members}
        lines += [f"**{backend}** — {members[0]['model_name']}, {threads} thread(s)", ""]
        rows = []
        for p in ordered({c["precision"] for c in members}, cfg["precisions"]):
            for r in ordered({c["r"] for c in members}, cfg["r"]):
                row = [p, r]
                for b in batches:
                    c = at.get((r, p, b))
                    row.append("–" if c is None else f"{_f(c['throughput_ips'])} ({_x((c.get('derived') or {}).get('speedup'))})")
                rows.append(row)
        lines += _table(["precision", "r"] + [f"batch {b}" for b in batches], rows)
    return lines


def _fidelity(results: Dict[str, Any], cells: List[Dict[str, Any]], measured: List[Dict[str, Any]]) -> List[str]:
    variants = results["variants"]
    if not variants:
        return []
    gmacs = {c["variant"]: c.get("flops") for c in measured}
    rows = []
    for vid, q in variants.items():
        cell = next((c for c in cells if c["variant"] == vid), None)
        if cell is None:
            continue
        fid, acc, dec = q.get("fidelity") or {}, q.get("accuracy") or {}, q.get("merge_decisions") or {}
        fl = gmacs.get(vid) or {}
        batch = q.get("static_batch")
        rows.append((cell["model_name"], cell["backend"], cell["precision"], cell["r"],
                     f"batch {batch}" if batch else ("dynamic" if "static_batch" in q else "–"),
                     f"{fl.get('gmacs', '–')} ({_x(fl.get('ratio'))} fewer)" if fl else "–",
                     _f(fid.get("top1_agreement"), 3), _f(fid.get("mean_cosine", fid.get("cosine")), 5),
                     _f(fid.get("min_cosine", fid.get("min_image_cosine")), 5), task_figure(fid),
                     _pct(acc.get("top1")) if acc else "–", _pct(acc.get("top5")) if acc else "–",
                     f"{100 * q['accuracy_drop']:+.2f} pts" if q.get("accuracy_drop") is not None else "–",
                     _decisions(dec, q)))
    return ["## Fidelity and accuracy (vs fp32 r=0 eager PyTorch)", "",
            "Encoder tasks: mean cosine of each embedding, patch or pooled token set with fp32 r=0's; top-1 is their "
            "real task figure where measured (digits: k-NN of embed, a linear probe on dense).", ""] + _table(
        ["model", "backend", "precision", "r", "measured on", "GMACs/image", "top-1 agreement", "mean cosine", "min cosine",
         "task figure", "top-1", "top-5", "accuracy drop", "merge decisions identical (merged groups kept)"], rows)


def _all_cells(measured: List[Dict[str, Any]]) -> List[str]:
    if not measured:
        return []
    several = len({c.get("node") for c in measured}) > 1  # which node timed each group, when it was not one
    rows = []
    for c in measured:
        art, mem = c.get("artifact") or {}, c.get("memory") or {}
        rows.append((c["backend"], c["precision"], c["r"], c["batch"], c["threads"], _f(c["median_ms"], 2),
                     _f(c["p90_ms"], 2), _f(c["p99_ms"], 2), _f(c["throughput_ips"]),
                     _x((c.get("derived") or {}).get("speedup")), _f(mem.get("peak_rss_mb"), 0),
                     _f(art["artifact_bytes"] / 2**20, 1) if art.get("artifact_bytes") else "–",
                     _f(art.get("build_seconds"), 1) + (" (cached)" if art.get("cached") else ""),
                     c["runs"], _loads(c.get("load_average", {}).get("before"))) + ((c.get("node", "?"),) if several else ()))
    return ["## All measured cells", ""] + _table(
        ["backend", "precision", "r", "batch", "threads", "median ms", "p90 ms", "p99 ms", "images/s", "speedup",
         "peak RSS MiB", "artifact MiB", "build s", "runs", "load avg before"] + (["node"] if several else []), rows)


def _not_run(cells: List[Dict[str, Any]]) -> List[str]:
    not_run = [c for c in cells if c["status"] != "measured"]
    if not not_run:
        return []
    by_reason: Dict[Tuple[str, str], List[str]] = defaultdict(list)
    for c in not_run:
        label = f"{c['backend']} {c['precision']} {c['r']} batch {c['batch']}"
        if label not in by_reason[(c["status"], c["reason"])]:
            by_reason[(c["status"], c["reason"])].append(label)
    return ["## Skipped and failed cells", ""] + _table(
        ["status", "backend / precision / r / batch", "reason"],
        [(status, ", ".join(labels), reason) for (status, reason), labels in by_reason.items()])


def node_kind(node: Optional[Dict[str, Any]]) -> Tuple[Any, ...]:
    """What makes two nodes' timings comparable: CPU model, logical cores and flags, GPUs, library versions."""
    if not node:
        return ()
    gpu = node.get("gpu") or {}
    return (node.get("cpu_model"), node.get("cpus"), tuple(node.get("cpu_flags") or ()), tuple(gpu.get("devices") or ()),
            tuple(sorted((node.get("versions") or {}).items())))


def _node_text(node: Dict[str, Any]) -> str:
    gpu = ", ".join((node.get("gpu") or {}).get("devices") or []) or "none"
    return (f"{node.get('cpu_model', '?')}, {node.get('cpus')} logical CPUs (flags: {', '.join(node.get('cpu_flags') or [])}); "
            f"GPU: {gpu}")


def _nodes(results: Dict[str, Any], measured: List[Dict[str, Any]]) -> List[str]:
    """Where the groups were timed, when that was not only the machine that wrote the report."""
    run, nodes = results["runs"][-1], results.get("nodes") or {}
    used = list(dict.fromkeys(c["node"] for c in measured if c.get("node") in nodes))
    executor = run.get("executor") or {}
    if executor.get("kind", "in-process") == "in-process" and len(used) <= 1:
        return []
    lines = []
    if executor.get("kind") == "ray":
        lines.append(f"- Executor: Ray {executor.get('ray_version', '')} at `{executor.get('cluster')}`, "
                     f"{len(executor.get('nodes') or [])} node(s); each timing group ran on one node, alone")
    for key in used:
        groups = len({c["group"] for c in measured if c.get("node") == key})
        versions = ", ".join(f"{k} {v}" for k, v in (nodes[key].get("versions") or {}).items())
        lines.append(f"- Node `{key}` ({groups} timing group(s)): {_node_text(nodes[key])}; versions: {versions}")
    return lines + [""]


def by_node_kind(results: Dict[str, Any], measured: List[Dict[str, Any]]) -> List[Tuple[str, List[Dict[str, Any]]]]:
    """Measured cells by the kind of node that timed them (one untitled part when every node was alike)."""
    env = results.get("environment") or {}
    here = {**(env.get("machine") or {}), "gpu": env.get("gpu"), "versions": env.get("versions") or {}}
    nodes = results.get("nodes") or {}
    kinds: Dict[Tuple, List[Dict[str, Any]]] = defaultdict(list)
    for c in measured:  # a cell that names no node was timed in this process, before nodes were recorded
        kinds[node_kind(nodes.get(c.get("node")) or here)].append(c)
    if len(kinds) <= 1:
        return [("", measured)]
    return [(_node_text(nodes.get(members[0].get("node")) or here), members) for members in kinds.values()]


def _demoted(lines: List[str]) -> List[str]:
    return ["#" + line if line.startswith("## ") else line for line in lines]


def _timed_tables(results: Dict[str, Any], measured: List[Dict[str, Any]]) -> List[str]:
    cfg = results["config"]
    groups: Dict[Tuple, List[Dict]] = defaultdict(list)
    for c in measured:
        groups[(c["model"], c["backend"], c["threads"])].append(c)
    return (_best(results, measured) + _losses(measured) + _stacked(groups, cfg) + _throughput(groups, cfg))


def report(results: Dict[str, Any], plots: Sequence[str] = ()) -> str:
    """report.md: what was measured, how, and the tables a reader needs. Timings from different kinds of node are
    never compared: each kind gets its own sections."""
    cells = list(results["cells"].values())
    measured = [c for c in cells if c["status"] == "measured"]
    parts = by_node_kind(results, measured)
    lines = _header(results, measured) + _nodes(results, measured) + _models(results)
    if len(parts) == 1:
        lines += _timed_tables(results, measured) + _fidelity(results, cells, measured) + _all_cells(measured)
    else:
        lines += ["Timings come from more than one kind of node: each kind has its own sections, and no number of one "
                  "is compared with a number of another.", ""]
        for title, members in parts:
            lines += [f"## Timed on {title}", ""] + _demoted(_timed_tables(results, members) + _all_cells(members))
        lines += _fidelity(results, cells, measured)
    lines += _not_run(cells)
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _decisions(dec: Dict[str, Any], q: Dict[str, Any]) -> str:
    if dec.get("agreement") is None:
        return f"– ({dec.get('reason', q.get('error', 'not measured'))})"
    groups = dec.get("group_agreement")
    return f"{dec['agreement']:.3f}" + (f" (groups {groups:.3f})" if groups is not None else "")


def _loads(values: Optional[Sequence[float]]) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _method(measured: Sequence[Dict[str, Any]]) -> Optional[str]:
    return next(((c.get("memory") or {}).get("method") for c in measured if (c.get("memory") or {}).get("method")), None)
