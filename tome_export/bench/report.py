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
            if num is None or den is None or num.get("group") != den.get("group"):
                return None  # only ratios of throughputs timed side by side
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
    "merge_decision_agreement", "group", "measured_at", "reason",
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
               merge_decision_agreement=(q.get("merge_decisions") or {}).get("agreement"))
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


def best_within_budget(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per (model, batch, threads): the highest-throughput measured cell that stays within the accuracy budget.

    Budget: accuracy drop vs fp32 r=0 PyTorch where accuracy was measured, else top-1 agreement with it.
    """
    budget = results["config"]["budget"]
    best: Dict[Tuple, Dict[str, Any]] = {}
    for cell in results["cells"].values():
        q = results["variants"].get(cell.get("variant")) or {}
        if cell["status"] != "measured" or "fidelity" not in q:
            continue
        if q.get("accuracy_drop") is not None:
            ok, metric = q["accuracy_drop"] <= budget["accuracy_drop"], f"accuracy drop {100 * q['accuracy_drop']:.2f} pts"
        else:
            agreement = q["fidelity"]["top1_agreement"]
            ok, metric = agreement >= budget["top1_agreement"], f"top-1 agreement {agreement:.3f}"
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


def _models(results: Dict[str, Any]) -> List[str]:
    lines = []
    for key, info in results["models"].items():
        acc = info.get("reference_accuracy")
        extra = f"; fp32 r=0 PyTorch accuracy top-1 {_pct(acc['top1'])}, top-5 {_pct(acc['top5'])}" if acc else ""
        train = info.get("training")
        trained = f"; trained here, fp32 test accuracy {_pct(train['test_accuracy'])}" if train else ""
        pub = info.get("published")
        published = ("; published: " + ", ".join(f"{k} {v}" for k, v in pub.items())) if pub else ""
        lines.append(f"- Model `{key}`: {info['description']} ({info['tokens']} tokens, {info['blocks']} blocks); "
                     f"evaluation images: {info['eval_set']}{extra}{trained}{published}")
    return lines + [""]


def _best(results: Dict[str, Any]) -> List[str]:
    best = best_within_budget(results)
    if not best:
        return []
    b = results["config"]["budget"]
    lines = ["## Best stack within the accuracy budget", "",
             f"Highest throughput whose accuracy drop vs fp32 r=0 PyTorch is at most {100 * b['accuracy_drop']:.1f} "
             f"points (where accuracy was measured), else whose top-1 agreement with it is at least "
             f"{b['top1_agreement']:.2f}.", ""]
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
                     _f(fid.get("top1_agreement"), 3), _f(fid.get("mean_cosine"), 5), _f(fid.get("min_cosine"), 5),
                     _pct(acc.get("top1")) if acc else "–", _pct(acc.get("top5")) if acc else "–",
                     f"{100 * q['accuracy_drop']:+.2f} pts" if q.get("accuracy_drop") is not None else "–",
                     _decisions(dec, q)))
    return ["## Fidelity and accuracy (vs fp32 r=0 eager PyTorch)", ""] + _table(
        ["model", "backend", "precision", "r", "measured on", "GMACs/image", "top-1 agreement", "mean cosine", "min cosine", "top-1",
         "top-5", "accuracy drop", "merge decisions identical (merged groups kept)"], rows)


def _all_cells(measured: List[Dict[str, Any]]) -> List[str]:
    if not measured:
        return []
    rows = []
    for c in measured:
        art, mem = c.get("artifact") or {}, c.get("memory") or {}
        rows.append((c["backend"], c["precision"], c["r"], c["batch"], c["threads"], _f(c["median_ms"], 2),
                     _f(c["p90_ms"], 2), _f(c["p99_ms"], 2), _f(c["throughput_ips"]),
                     _x((c.get("derived") or {}).get("speedup")), _f(mem.get("peak_rss_mb"), 0),
                     _f(art["artifact_bytes"] / 2**20, 1) if art.get("artifact_bytes") else "–",
                     _f(art.get("build_seconds"), 1) + (" (cached)" if art.get("cached") else ""),
                     c["runs"], _loads(c.get("load_average", {}).get("before"))))
    return ["## All measured cells", ""] + _table(
        ["backend", "precision", "r", "batch", "threads", "median ms", "p90 ms", "p99 ms", "images/s", "speedup",
         "peak RSS MiB", "artifact MiB", "build s", "runs", "load avg before"], rows)


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


def report(results: Dict[str, Any], plots: Sequence[str] = ()) -> str:
    """report.md: what was measured, how, and the tables a reader needs."""
    cfg = results["config"]
    cells = list(results["cells"].values())
    measured = [c for c in cells if c["status"] == "measured"]
    groups: Dict[Tuple, List[Dict]] = defaultdict(list)
    for c in measured:
        groups[(c["model"], c["backend"], c["threads"])].append(c)
    lines = (_header(results, measured) + _models(results) + _best(results) + _losses(measured) + _stacked(groups, cfg)
             + _throughput(groups, cfg) + _fidelity(results, cells, measured) + _all_cells(measured)
             + _not_run(cells))
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
