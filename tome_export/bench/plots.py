"""PNG plots of a benchmark (matplotlib, no display needed): per model, throughput vs batch size, speedup bars
(ToMe alone, the precision alone, both) and the quality vs throughput Pareto front."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Tuple

from ..files import atomic_write
from .quality import headline
from .report import by_node_kind, ordered

PLOTS_DIR = "plots"


def new_figure(rows: int, cols: int, width: float, height: float):
    """A figure of ``rows`` x ``cols`` axes (each ``width`` x ``height`` inches) drawn without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())
    return path


def throughput_vs_batch(cells: List[Dict], cfg: Dict, title: str, path: Path) -> Path:
    backends = ordered({c["backend"] for c in cells}, cfg["backends"])
    fig, axes = new_figure(1, len(backends), 5.0, 3.8)
    styles = ["-", "--", ":", "-."]
    for ax, backend in zip(axes[0], backends):
        lines: Dict[Tuple, List[Tuple[int, float]]] = defaultdict(list)
        for c in cells:
            if c["backend"] == backend:
                lines[(c["precision"], c["r"], c["threads"])].append((c["batch"], c["throughput_ips"]))
        for (precision, r, threads), points in sorted(lines.items(), key=lambda kv: (
                cfg["precisions"].index(kv[0][0]), cfg["r"].index(kv[0][1]), kv[0][2])):
            points.sort()
            label = f"{precision} {r}" + (f" t{threads}" if len(cfg["threads"]) > 1 else "")
            ax.plot([p[0] for p in points], [p[1] for p in points], styles[cfg["precisions"].index(precision) % 4],
                    marker="o", color=f"C{cfg['r'].index(r) % 10}", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg["batches"], [str(b) for b in cfg["batches"]])
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(backend)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: throughput vs batch size (colour: r, line: precision)")
    return save_figure(fig, path)


def speedup_bars(cells: List[Dict], cfg: Dict, title: str, path: Path) -> Path:
    threads = min(c["threads"] for c in cells)
    cells = [c for c in cells if c["threads"] == threads and c.get("derived", {}).get("speedup") is not None]
    backends = ordered({c["backend"] for c in cells}, cfg["backends"])
    batches = ordered({c["batch"] for c in cells}, cfg["batches"])
    fig, axes = new_figure(max(1, len(backends)), max(1, len(batches)), 4.6, 3.4)
    for i, backend in enumerate(backends):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            here = [c for c in cells if c["backend"] == backend and c["batch"] == batch]
            stacks = [c for c in here if c["precision"] != "fp32" and c["r"] != "r0"]
            groups = stacks or [c for c in here if c["r"] != "r0"] or [c for c in here if c["precision"] != "fp32"]
            groups.sort(key=lambda c: (cfg["precisions"].index(c["precision"]), cfg["r"].index(c["r"])))
            for k, c in enumerate(groups):
                d = c["derived"]
                bars = [("ToMe", d.get("speedup_tome"), "C0"), ("precision", d.get("speedup_precision"), "C1"),
                        ("both", d.get("speedup"), "C2")]
                for n, (label, value, colour) in enumerate(bars):
                    if value is not None:
                        ax.bar(k + (n - 1) * 0.27, value, 0.25, color=colour, label=label if k == 0 else None)
                if None not in (d.get("speedup_tome"), d.get("speedup_precision")):
                    product = d["speedup_tome"] * d["speedup_precision"]
                    ax.hlines(product, k + 0.15, k + 0.41, colors="k", label="ToMe x precision" if k == 0 else None)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xticks(range(len(groups)), [f"{c['precision']}\n{c['r']}" for c in groups], fontsize=8)
            ax.set_ylabel("speedup vs fp32 r0")
            ax.set_title(f"{backend}, batch {batch}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
            if groups:
                ax.legend(fontsize=7)
    fig.suptitle(f"{title}: speedups, measured side by side ({threads} thread(s))")
    return save_figure(fig, path)


def pareto(cells: List[Dict], variants: Dict[str, Dict], cfg: Dict, title: str, path: Path) -> Path:
    threads = min(c["threads"] for c in cells)
    cells = [c for c in cells if c["threads"] == threads and "fidelity" in (variants.get(c["variant"]) or {})]
    batches = ordered({c["batch"] for c in cells}, cfg["batches"])
    use_accuracy = all("accuracy" in variants[c["variant"]] for c in cells) and bool(cells)
    fig, axes = new_figure(1, max(1, len(batches)), 4.8, 3.8)
    markers = "osD^vP*X"
    for ax, batch in zip(axes[0], batches):
        points = []
        for c in (c for c in cells if c["batch"] == batch):
            q = variants[c["variant"]]
            y = q["accuracy"]["top1"] if use_accuracy else headline(q["fidelity"])[0]
            points.append((c["throughput_ips"], y))
            ax.scatter(c["throughput_ips"], y, color=f"C{cfg['backends'].index(c['backend']) % 10}",
                       marker=markers[cfg["precisions"].index(c["precision"]) % len(markers)],
                       label=f"{c['backend']} {c['precision']}")
            ax.annotate(c["r"], (c["throughput_ips"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], float("-inf")
        for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):  # fastest first; keep each quality record
            if y > best:
                front.append((x, y))
                best = y
        if front:
            front.sort()
            ax.plot([p[0] for p in front], [p[1] for p in front], color="k", lw=0.8, alpha=0.6, label="Pareto front")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        ax.set_xlabel("images / s")
        name = headline(variants[cells[0]["variant"]]["fidelity"])[1] if cells else "top-1 agreement"
        ax.set_ylabel("top-1 accuracy" if use_accuracy else f"{name} with fp32 r0 PyTorch")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: quality vs throughput ({threads} thread(s); labels: r)")
    return save_figure(fig, path)


def write_plots(out: Path, results: Dict[str, Any]) -> List[Path]:
    """The three plots for every model with measured cells (per kind of node that timed them, when the cells come
    from more than one: ``-node1``, ``-node2``, ...); returns their paths."""
    cfg = results["config"]
    written = []
    for key, info in results["models"].items():
        measured = [c for c in results["cells"].values() if c["model"] == key and c["status"] == "measured"]
        parts = by_node_kind(results, measured) if measured else []
        for i, (kind, cells) in enumerate(parts):
            title = info["model"] + (f" on {kind}" if kind else "")
            base = Path(out) / PLOTS_DIR / (f"{key}-node{i + 1}" if len(parts) > 1 else key)
            written.append(throughput_vs_batch(cells, cfg, title, base.with_name(base.name + "-throughput-vs-batch.png")))
            written.append(speedup_bars(cells, cfg, title, base.with_name(base.name + "-speedup-bars.png")))
            written.append(pareto(cells, results["variants"], cfg, title, base.with_name(base.name + "-pareto.png")))
    return written
