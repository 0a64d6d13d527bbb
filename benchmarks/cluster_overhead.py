"""What the Ray executor costs per cell against running in this process, on one machine (issue 24's target: at
most 5% of a small cell's time).

The same small bench config runs alternately in this process and with ``--cluster ray`` (a local Ray started for
the run, one node: the same machine and cores, so the only difference is the executor), each run a fresh
``tome-export bench`` process with ``--force`` on artifacts built beforehand (building is the same work either way
and is left out; the warm-up run builds them). Per run: wall time, the executor's start-up (starting Ray and
connecting; paid once per run, not per cell) and the time the jobs themselves took. Reported:

  per-cell overhead = (Ray wall - Ray start-up - in-process wall) / cells, as a fraction of in-process wall / cells,

as the median over the repeats, beside every run's numbers, the machine and its load. Run on a quiet machine:

    python benchmarks/cluster_overhead.py                      # vit_t16, ~10-15 minutes on 2 cores
    python benchmarks/cluster_overhead.py --smoke              # the small digits model, 1 repeat: checks the script

Writes benchmarks/results/cluster_overhead.{json,md} (--smoke: under /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "tome-export"

# A small cell: ViT-Ti/16 (5.7M parameters), ONNX Runtime fp32, r=0 and r=8, batch 1 and 8, 2 threads, the default
# timing settings (5 rounds x 5 runs after 2 warm-up calls).
FULL = {"name": "cluster_overhead", "models": [{"model": "vit_t16", "weights": "random", "seed": 0}],
        "r": [0, 8], "precisions": ["fp32"], "backends": ["onnxruntime"], "batches": [1, 8], "threads": [2],
        "memory": False, "quality": {"images": 8, "decision_images": 8}}
SMOKE = {"name": "cluster_overhead_smoke",
         "models": [{"model": "digits_vit", "kwargs": {"depth": 2, "embed_dim": 96, "num_heads": 3},
                     "train": {"epochs": 6, "lr": 1.0e-3, "seed": 0}}],
         "r": [0, 8], "precisions": ["fp32"], "backends": ["onnxruntime"], "batches": [1, 2], "threads": [1],
         "timing": {"warmup": 1, "rounds": 2, "per_round": 2, "pause_s": 0.0}, "memory": False,
         "quality": {"images": 2, "decision_images": 2}}


def bench(config: Path, out: Path, cache: Path, cluster: bool) -> dict:
    """One `tome-export bench` run: its wall time and what results.json says about it."""
    args = [str(EXE), "bench", "--config", str(config), "--out", str(out), "--cache", str(cache), "--force", "-q"]
    started = time.perf_counter()
    done = subprocess.run(args + (["--cluster", "ray"] if cluster else []), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"bench failed ({'ray' if cluster else 'in-process'}):\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][-1]
    return {"executor": "ray" if cluster else "in-process", "wall_s": round(wall, 3),
            "start_s": (run.get("executor") or {}).get("start_seconds", 0.0),
            "jobs_s": round(sum(j["seconds"] for j in run["jobs"].values()), 3),
            "cells": sum(run["counts"].values()), "load_before": run["load_average"],
            "load_after": run.get("load_average_at_end")}


def summarise(runs: list, cells: int) -> dict:
    here = [r["wall_s"] for r in runs if r["executor"] == "in-process"]
    ray = [r["wall_s"] - r["start_s"] for r in runs if r["executor"] == "ray"]
    cell_s = statistics.median(here) / cells
    overhead = (statistics.median(ray) - statistics.median(here)) / cells
    return {"cells": cells, "in_process_cell_s": round(cell_s, 3), "ray_overhead_per_cell_s": round(overhead, 3),
            "overhead_fraction": round(overhead / cell_s, 4),
            "ray_start_s_median": round(statistics.median(r["start_s"] for r in runs if r["executor"] == "ray"), 3),
            "target": "overhead_fraction <= 0.05"}


def markdown(report: dict) -> str:
    s, m = report["summary"], report["machine"]
    lines = [f"# Ray executor overhead per cell ({report['config']['name']})", "",
             f"- Machine: {m.get('cpu_model')}, {m.get('cpus')} logical CPUs (flags: {', '.join(m.get('cpu_flags', []))})",
             f"- Config: {report['config']['models'][0]['model']}, {report['config']['backends']}, r {report['config']['r']}, "
             f"batches {report['config']['batches']}, threads {report['config']['threads']}; {s['cells']} cells; "
             f"artifacts built beforehand; --force each run", "",
             f"In-process: {s['in_process_cell_s']:.2f} s per cell (median run). Ray (local, one node), start-up left "
             f"out: {s['ray_overhead_per_cell_s']:+.2f} s per cell = **{100 * s['overhead_fraction']:+.1f}%** "
             f"(target <= 5%). Ray's start-up, once per run: {s['ray_start_s_median']:.1f} s (median).", "",
             "| run | executor | wall s | start-up s | jobs s | load before | load after |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report["runs"], 1):
        lines.append(f"| {i} | {r['executor']} | {r['wall_s']:.1f} | {r['start_s']:.1f} | {r['jobs_s']:.1f} | "
                     f"{'/'.join(f'{v:.1f}' for v in r['load_before'])} | "
                     f"{'/'.join(f'{v:.1f}' for v in (r['load_after'] or []))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="the small digits model, one repeat (checks the script)")
    p.add_argument("--repeats", type=int, default=3, help="runs per executor, alternating (default 3)")
    p.add_argument("--out", type=Path, help="where to write (default benchmarks/results; --smoke: a temp dir)")
    args = p.parse_args()
    config = SMOKE if args.smoke else FULL
    repeats = 1 if args.smoke else args.repeats
    out = args.out or (Path(tempfile.mkdtemp(prefix="cluster-overhead-")) if args.smoke else ROOT / "benchmarks" / "results")
    work = Path(tempfile.mkdtemp(prefix="cluster-overhead-work-"))
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cache = work / "artifacts"
    print("warm-up: building the artifacts (not timed)", file=sys.stderr)
    bench(config_path, work / "warm", cache, cluster=False)
    runs = []
    for i in range(repeats):
        for cluster in (False, True):
            runs.append(bench(config_path, work / f"run{i}-{'ray' if cluster else 'here'}", cache, cluster))
            print(f"  {runs[-1]}", file=sys.stderr)
    sys.path.insert(0, str(ROOT))
    from tome_export.bench.timing import machine

    report = {"config": config, "machine": machine(), "runs": runs, "summary": summarise(runs, runs[0]["cells"])}
    out.mkdir(parents=True, exist_ok=True)
    name = "cluster_overhead" + ("_smoke" if args.smoke else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / name}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
