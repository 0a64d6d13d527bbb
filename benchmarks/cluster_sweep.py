"""How long a bench sweep takes on 1 node and on N nodes, from the times a run on one node measured.

A sweep's unit on a cluster is a timing group's job; with one artifact per variant for every batch size (dynamic
batch), a model and backend's groups run one after another on one node (the first builds, the rest follow it), so
the unit that can go anywhere is the model and backend. This script reads the durations a run recorded and packs
the units onto N identical nodes, longest first (each to the node that frees up first, as Ray's queue hands
them out):

- results of this version: each group job's own seconds (``runs[-1].jobs``), summed per model and backend;
- older results (no job times): per model and backend, the time from the previous group's end (or the run's start)
  to its last group's end, from the ``measured_at`` timestamps; a run that resumed cached artifacts has no build
  time in it (say so when quoting).

It adds nothing it did not read, apart from the Ray executor's start-up and per-cell overhead when given the
output of benchmarks/cluster_overhead.py (``--overhead``). Usage:

    python benchmarks/cluster_sweep.py benchmarks/results/vit_b16_cpu/results.json --nodes 1 2 3 4
    python benchmarks/cluster_sweep.py OUT/results.json --nodes 1 2 4 8 16 --overhead benchmarks/results/cluster_overhead.json
"""

from __future__ import annotations

import argparse
import heapq
import json
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def _pair(group: str) -> str:
    """'RUN:model/backend/bB/tT' or 'model/backend/bB/tT' -> 'model/backend'."""
    return "/".join(group.split(":", 1)[-1].split("/")[:2])


def units(results: dict) -> Tuple[Dict[str, float], str]:
    """Seconds per model and backend, and where the numbers come from."""
    jobs = (results["runs"][-1] or {}).get("jobs") or {}
    if jobs:
        out: Dict[str, float] = {}
        for key, job in jobs.items():
            out[_pair(key)] = out.get(_pair(key), 0.0) + job["seconds"]
        return out, "each group job's own seconds"
    ends: Dict[str, datetime] = {}
    for cell in results["cells"].values():
        if cell.get("status") == "measured":
            at = datetime.fromisoformat(cell["measured_at"])
            ends[cell["group"]] = max(ends.get(cell["group"], at), at)
    previous = datetime.fromisoformat(results["runs"][-1]["started_at"])
    out = {}
    for group, end in sorted(ends.items(), key=lambda kv: kv[1]):
        out[_pair(group)] = out.get(_pair(group), 0.0) + (end - previous).total_seconds()
        previous = end
    return out, "intervals between the groups' measured_at timestamps (seconds resolution)"


def makespan(durations: List[float], nodes: int) -> float:
    """Longest first, each to the node that frees up first."""
    free = [0.0] * nodes
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(free, free[0] + d)
    return max(free)


def table(durations: Dict[str, float], nodes: List[int], cells: int, overhead: Optional[dict]) -> List[str]:
    start = overhead["summary"]["ray_start_s_median"] if overhead else 0.0
    per_cell = overhead["summary"]["ray_overhead_per_cell_s"] if overhead else 0.0
    one = sum(durations.values())
    lines = ["| nodes | sweep (min) | speed-up vs 1 node |", "|---|---|---|"]
    for n in nodes:
        total = makespan(list(durations.values()), n) + ((start + per_cell * cells / n) if n > 1 else 0.0)
        lines.append(f"| {n} | {total / 60:.1f} | {one / total:.2f}x |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+", help="results.json of runs on one node (their units add up)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--overhead", type=Path, help="cluster_overhead.json: adds Ray's start-up and per-cell overhead")
    args = p.parse_args()
    durations: Dict[str, float] = {}
    cells, sources = 0, set()
    for path in args.results:
        results = json.loads(path.read_text())
        found, source = units(results)
        durations.update({f"{path}:{k}": v for k, v in found.items()})
        cells += sum(1 for c in results["cells"].values() if c.get("status") == "measured")
        sources.add(source)
    overhead = json.loads(args.overhead.read_text()) if args.overhead else None
    print(f"{len(durations)} model/backend units, {cells} measured cells; durations from: {'; '.join(sorted(sources))}")
    for unit, seconds in sorted(durations.items(), key=lambda kv: -kv[1]):
        print(f"  {unit}: {seconds / 60:.1f} min")
    print("\n".join(table(durations, sorted(set(args.nodes)), cells, overhead)))


if __name__ == "__main__":
    main()
