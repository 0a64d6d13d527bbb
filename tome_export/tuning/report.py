"""What a tuning run writes beside the winning artifact: the manifest's ``tune`` section (objective, budget,
every candidate and its figures, why the winner won), ``tune.md`` for people, and ``tune-pareto.png``
(quality vs throughput, the winner marked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..flops import flops_summary
from ..info import ModelInfo
from ..schedule import r_text
from .measure import Evaluation
from .select import Decision

REPORT, PLOT = "tune.md", "tune-pareto.png"


def candidate_entry(e: Evaluation, info: ModelInfo, decision: Decision) -> Dict[str, Any]:
    c, s = e.candidate, e.candidate.schedule
    entry: Dict[str, Any] = {
        "candidate": c.key, "precision": c.precision, "family": s.family if s.merges else "none",
        "r": r_text(s.r) if s.merges else "0", "r_schedule": list(s.blocks), "flops": flops_summary(info, s.blocks),
        "status": e.status, "probe": e.order, "cached": e.cached, "quality": e.quality, "within_budget": e.within,
        "timing": e.timing, "eligible": c.key in decision.eligible, "tie": c.key in decision.ties,
        "winner": e is decision.winner,
    }
    if e.reason:
        entry["reason"] = e.reason
    if e.built_on is not None:
        entry["built_on"] = e.built_on
    return entry


def tune_section(*, request: Any, checked: Any, bench: Any, decision: Decision, search: Any,
                 timing: Dict[str, Any], environment: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest's ``tune`` section (plain JSON)."""
    info: ModelInfo = bench.loaded.info
    w = decision.winner
    evaluations = sorted(bench.evaluations.values(), key=lambda e: e.order)
    reference = {"model": "fp32 r=0 eager PyTorch", "eval_set": bench.eval.name,
                 "random_weights": request.weights == "random" and request.checkpoint is None}
    if bench.eval.labels is not None and "logits" in bench.reference:
        reference["accuracy"] = float((bench.reference["logits"].argmax(1) == bench.eval.labels).mean())
    if request.task.name != "classify":
        reference["task"] = request.task.to_dict()
    return {
        "objective": f"highest throughput (images/s) at batch {request.batch} with "
                     f"{timing.get('threads', request.resolved_threads)} thread(s) on "
                     f"{'one node of the cluster' if timing.get('node') else 'this machine'}, within the budget",
        "budget": request.budget.to_dict(), "met_budget": decision.met_budget,
        "winner": {**candidate_entry(w, info, decision), "reason": decision.reason},
        "tome_paid": decision.tome_paid, "tome_verdict": decision.tome_verdict,
        "tome_by_precision": decision.per_precision, "reference": reference,
        "target": request.target, "batch": request.batch, "threads": timing.get("threads", request.resolved_threads),
        "precisions": list(checked.precisions), "precisions_left_out": dict(checked.left_out),
        "search": {
            "method": "fp32 eager screen, then per precision r=0 and bisection for the last schedule within the "
                      "budget in each family (constant, decreasing r:-1, per-block lists between two constants); "
                      "every built candidate timed side by side at the end",
            "seed": request.seed, "probes": bench.probes, "stopped": search.stopped,
            "screen": [{"r": r_text(e.candidate.schedule.r), "family": e.candidate.schedule.family,
                        "r_schedule": list(e.candidate.schedule.blocks), "quality": e.quality, "within": e.within,
                        "probe": e.order} for e in sorted(bench.screens.values(), key=lambda e: e.order)],
            "screen_bounds": {k: (r_text(v.r) if v is not None else None) for k, v in search.screen_bounds.items()},
        },
        "candidates": [candidate_entry(e, info, decision) for e in evaluations],
        "timing": timing, "tie_tolerance": request.tie_tolerance,
        "time_budget_min": request.time_budget_min, "elapsed_s": round(bench.elapsed(), 1),
        "cache": str(bench.cache), "environment": environment,
    }


# --- tune.md ------------------------------------------------------------------------------------------------------


def _quality_text(q: Dict[str, Any]) -> str:
    if not q:
        return "-"
    if "lost_images" in q:
        return f"{100 * q['accuracy']:.2f}% ({q['lost_images']} lost, net {q['accuracy_drop_pts']:+.2f} pts)"
    if "top1_agreement" not in q:
        kept = f", {q['kept']} tokens" if "kept" in q else ""
        return f"cosine {q['cosine']:.4f}{kept}"
    return f"{q['top1_agreement']:.3f} / {q['mean_cosine']:.4f}"


def _row(c: Dict[str, Any]) -> List[str]:
    t = c["timing"]
    ok = "yes" if c["within_budget"] else ("failed" if c["status"] == "failed" else "no")
    mark = "**winner**" if c["winner"] else ("tie" if c["tie"] else "")
    speed = (f"{t['throughput_ips']:.1f}", f"{t['median_ms']:.2f}") if "throughput_ips" in t else \
        (t.get("error", "not timed"), "-")
    return [str(c["probe"]), f"`{c['candidate']}`", c["family"], " ".join(map(str, c["r_schedule"])),
            f"{c['flops']['ratio']:.2f}x", _quality_text(c["quality"]), ok, *speed, mark]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *["| " + " | ".join(r) + " |" for r in rows]]


def _loads(values: Optional[Sequence[float]]) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "?"


def _context(section: Dict[str, Any], model: str) -> List[str]:
    env, timing = section["environment"], section["timing"]
    m = timing.get("node") or env.get("machine", {})  # the machine that timed the candidates
    return [
        f"- Model: `{model}`; target `{section['target']}`, batch {section['batch']}, {section['threads']} thread(s)",
        f"- Budget: {section['budget']['description']}",
        f"- Reference: {section['reference']['model']} on {section['reference']['eval_set']}"
        + (f" (top-1 {100 * section['reference']['accuracy']:.2f}%)" if "accuracy" in section["reference"] else ""),
        f"- Precisions searched: {', '.join(section['precisions'])}"
        + "".join(f"; {p} left out: {why}" for p, why in section["precisions_left_out"].items()),
        f"- Machine: {m.get('cpu_model', '?')}, {m.get('cpus')} logical CPUs (flags: "
        f"{', '.join(m.get('cpu_flags', []))}); load average (1/5/15 min) at start {_loads(env.get('load_start'))}, "
        f"while timing {_loads(timing.get('load_average', {}).get('before'))} -> "
        f"{_loads(timing.get('load_average', {}).get('after'))}",
        f"- Time: {section['elapsed_s'] / 60:.1f} of {section['time_budget_min']:g} minutes; {section['search']['probes']} "
        f"probes" + (f"; **stopped early** ({section['search']['stopped']})" if section["search"]["stopped"] else ""),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
    ] + ([f"- Cluster: Ray at `{env['cluster'].get('cluster')}`, {len(env['cluster'].get('nodes', []))} node(s); "
          f"candidates built and evaluated on any node, all timed together on `{m.get('host', '?')}`"
          + (f" (built again there, same sha256: {', '.join(timing['rebuilt_for_timing'])})"
             if timing.get("rebuilt_for_timing") else "")] if env.get("cluster") else []) + (["- **Random weights:** an untrained model's outputs barely depend on which tokens merge, so agreement with "
          "r=0 stays high even at extreme r: the r chosen here says nothing about a trained model (use its weights)."]
         if section["reference"].get("random_weights") else [])


def markdown(section: Dict[str, Any], model: str) -> str:
    """``tune.md``: the verdict first, then how it was reached and every candidate."""
    w, timing = section["winner"], section["timing"]
    verdict = "met" if section["met_budget"] else "**NOT met**"
    lines = [f"# Tuned `{model}` for `{section['target']}`", "",
             f"**Winner: `{w['candidate']}`** (r schedule {' '.join(map(str, w['r_schedule']))}; "
             f"{w['flops']['ratio']:.2f}x fewer MACs) — {w['reason']}. Budget {verdict}.", "",
             f"**{section['tome_verdict']}.**", "", *_context(section, model), ""]
    per = section["tome_by_precision"]
    if per:
        rows = [[p, f"{v['r0_ips']:.1f}" if v["r0_ips"] else "-", f"`{v['best_tome']}`" if v["best_tome"] else "none",
                 f"{v['best_tome_ips']:.1f}" if v["best_tome_ips"] else "-",
                 f"{v['tome_speedup']:.2f}x" if v["tome_speedup"] else "-"] for p, v in per.items()]
        lines += ["## ToMe vs no ToMe, per precision (within the quality budget, timed side by side)", "",
                  *_table(["precision", "r=0 images/s", "fastest ToMe", "images/s", "ToMe speed-up"], rows), ""]
    quality = "accuracy (lost images, net drop)" if section["budget"]["kind"] == "accuracy" else \
        "top-1 agreement / mean cosine"
    lines += ["## Candidates", "",
              f"Every built candidate, in the order the search probed it, timed together in one interleaved "
              f"measurement ({timing.get('rounds')} rounds x {timing.get('per_round')} runs after "
              f"{timing.get('warmup')} warm-ups); throughputs closer than {100 * section['tie_tolerance']:g}% are a "
              f"tie, broken by quality, then fewer merges, then precision order.", "",
              *_table(["probe", "candidate", "family", "r per block", "fewer MACs", quality, "within", "images/s",
                       "median ms", ""], [_row(c) for c in section["candidates"]]), "",
              "## Search", "", section["search"]["method"] + ".", ""]
    screen = section["search"]["screen"]
    if screen:
        lines += ["fp32 eager screen (bounds the builds; not artifacts):", "",
                  *_table(["probe", "family", "r per block", quality, "within"],
                          [[str(s["probe"]), s["family"], " ".join(map(str, s["r_schedule"])),
                            _quality_text(s["quality"]), "yes" if s["within"] else "no"] for s in screen]), ""]
    lines += [f"![quality vs throughput]({PLOT})", ""]
    return "\n".join(lines)


# --- the plot -----------------------------------------------------------------------------------------------------


def pareto_plot(section: Dict[str, Any], model: str, path: Path) -> Path:
    """Quality vs throughput of every timed candidate, the budget line, the Pareto front, the winner starred."""
    from ..bench.plots import new_figure, save_figure

    accuracy = section["budget"]["kind"] == "accuracy"
    fig, axes = new_figure(1, 1, 6.4, 4.6)
    ax = axes[0][0]
    points = []
    precisions = list(dict.fromkeys(c["precision"] for c in section["candidates"]))
    for c in section["candidates"]:
        if "throughput_ips" not in c["timing"]:
            continue
        x = c["timing"]["throughput_ips"]
        y = -c["quality"]["lost_pts"] if accuracy else c["quality"].get("top1_agreement", c["quality"].get("cosine"))
        points.append((x, y))
        ax.scatter(x, y, color=f"C{precisions.index(c['precision']) % 10}", marker="o" if c["within_budget"] else "x",
                   label=c["precision"], zorder=3)
        ax.annotate(c["r"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if c["winner"]:
            ax.scatter(x, y, s=260, marker="*", facecolors="none", edgecolors="k", linewidths=1.4, label="winner",
                       zorder=4)
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], color="k", lw=0.8, alpha=0.5, label="Pareto front")
    b = section["budget"]
    limit = b["min_cosine"] if b["kind"] == "cosine" else b["min_top1_agreement"]
    ax.axhline(-b["max_accuracy_drop_pts"] if accuracy else limit, color="C3", ls="--", lw=0.9,
               label="budget")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xlabel(f"images / s (batch {section['batch']}, {section['threads']} thread(s))")
    ax.set_ylabel("accuracy lost vs fp32 r=0 (points, negated)" if accuracy else
                  "mean feature cosine with fp32 r=0" if b["kind"] == "cosine" else "top-1 agreement with fp32 r=0")
    ax.grid(alpha=0.3)
    ax.set_title(f"{model} on {section['target']}: quality vs throughput (labels: r; x: outside the budget)",
                 fontsize=9)
    return save_figure(fig, path)
