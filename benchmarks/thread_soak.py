"""Thread soak of the CPU runners: one runner shared by several threads, thousands of calls, every result checked.

Builds vit_t16 (random weights, r=8) for each CPU target with the pipeline, computes single-threaded logits for a
set of inputs, then lets ``--threads`` threads call the same runner ``--calls`` times in total on those inputs and
counts the calls that raised and the calls whose logits differ (bit for bit) from the single-threaded ones.

    python benchmarks/thread_soak.py                                   # onnxruntime and openvino, 4 threads, 4000 calls
    python benchmarks/thread_soak.py --calls 400 --out /tmp/thread_soak

Writes <out>.json and <out>.md (default benchmarks/results/thread_soak). Exit status 1 when any call was wrong.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from tome_export.bench.timing import versions
from tome_export.manifest import dumps
from tome_export.pipeline import BuildRequest, build
from tome_export.runtime import load


def soak(directory: Path, threads: int, calls: int, inputs: int) -> Dict[str, Any]:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(inputs)]
    with load(directory, threads=1) as runner:
        expected = [runner(b) for b in batches]

        def call(i: int) -> str:
            try:
                return "ok" if np.array_equal(runner(batches[i % inputs]), expected[i % inputs]) else "wrong"
            except Exception as exc:  # counted, not hidden: a busy request shows up here
                return f"raised {type(exc).__name__}"

        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            outcomes = list(pool.map(call, range(calls)))
        seconds = time.perf_counter() - started
    counts: Dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"threads": threads, "calls": calls, "distinct_inputs": inputs, "outcomes": counts,
            "seconds": round(seconds, 2)}


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="onnxruntime,openvino")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--calls", type=int, default=4000)
    p.add_argument("--inputs", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "thread_soak")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tome-soak-") as tmp:
        for target in args.targets.split(","):
            out = Path(tmp) / target
            build(BuildRequest(model="vit_t16", r=8, target=target, weights="random", output=out))
            rows.append({"target": target, **soak(out, args.threads, args.calls, args.inputs)})
            print(rows[-1], file=sys.stderr)
    result = {"model": "vit_t16 random r=8 batch 1 fp32", "versions": versions(["tome_export", "onnxruntime", "openvino"]),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(dumps(result) + "\n")
    lines = ["# Thread soak of the CPU runners", "", f"Model: {result['model']}; one runner shared by the threads; "
             "a call is wrong when its logits differ bit for bit from the single-threaded logits of its input.", "",
             "| target | threads | calls | outcomes | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['threads']} | {r['calls']} | "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(r['outcomes'].items()))} | {r['seconds']} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0 if all(set(r["outcomes"]) == {"ok"} for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
