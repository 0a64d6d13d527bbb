"""Issue 2 benchmark: ToMe r=16 vs r=0, fp32, ONNX Runtime CPU, side by side in one run.

Builds the artifacts users get (`tome-export --target onnx`, random weights; speed does not depend on
the weights), for each batch size and merge lowering, then times them in interleaved rounds.

    python benchmarks/core_onnxruntime.py                       # ViT-B/16, r=16, batch 1 and 8, 2 threads
    python benchmarks/core_onnxruntime.py --model vit_t16 --rounds 2 --out /tmp/quick   # smoke test

Writes <out>.json (raw, with machine and versions) and <out>.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tome_export import BuildOptions, build
from tome_export.bench.timing import machine, measure_interleaved, versions
from tome_export.images import sample_photos
from tome_export.manifest import dumps
from tome_export.runtime import load

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--impls", nargs="+", default=["gather", "onehot"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--out", type=Path, default=HERE / "results" / "core_onnxruntime")
    args = p.parse_args()

    configs = [("r0", 0, "gather")] + [(f"r{args.r}-{impl}", args.r, impl) for impl in args.impls]
    results = {"benchmark": "ToMe vs r=0, fp32 ONNX Runtime CPU", "model": args.model, "r": args.r,
               "threads": args.threads, "machine": machine(),
               "versions": versions(["tome_export", "torch", "timm", "onnx", "onnxruntime"]), "batches": {}}
    for batch in args.batches:
        runners, manifests = {}, {}
        for name, r, impl in configs:
            out = args.cache / f"{args.model}-{name}-b{batch}"
            if not (out / "manifest.json").is_file():
                build(BuildOptions(model=args.model, r=r, weights="random", batch=batch, merge_impl=impl, output=out))
            runners[name] = load(out, threads=args.threads)
            manifests[name] = json.loads((out / "manifest.json").read_text())
        x = runners["r0"].preprocess_batch(sample_photos(batch))
        timings = measure_interleaved({n: (lambda run=run: run(x)) for n, run in runners.items()},
                                      rounds=args.rounds, per_round=args.per_round)
        base = timings["r0"].median_ms
        rows = {}
        for name, t in timings.items():
            m = manifests[name]
            rows[name] = {**t.summary(batch), "speedup_vs_r0": round(base / t.median_ms, 3),
                          "flop_ratio_vs_r0": m["flops"]["ratio"], "merge_impl": m["merge_impl"],
                          "validation_max_abs_diff": m["validation"]["max_abs_diff"],
                          "tokens_per_block": m["tokens_per_block"]}
        results["batches"][str(batch)] = rows
        print(f"batch {batch}: " + ", ".join(f"{n} {v['median_ms']:.1f} ms ({v['speedup_vs_r0']:.2f}x)"
                                             for n, v in rows.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(dumps(results) + "\n")
    args.out.with_suffix(".md").write_text(report(results))
    print(f"wrote {args.out}.json and .md")


def report(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"# {res['benchmark']}: {res['model']}, r={res['r']}",
        "",
        f"Machine: {m.get('cpu_model')} ({m.get('cpus')} vCPUs; {', '.join(m.get('cpu_flags', []))}), "
        f"{res['threads']} ORT threads. Versions: "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".",
        "Median of interleaved rounds; speedup = median(r=0) / median(config), measured side by side in one run.",
        "",
        "| batch | config | median ms | p90 ms | images/s | speedup vs r=0 | FLOP ratio | max abs diff vs PyTorch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, rows in res["batches"].items():
        for name, v in rows.items():
            lines.append(f"| {batch} | {name} | {v['median_ms']:.1f} | {v['p90_ms']:.1f} | {v['throughput_ips']:.1f} | "
                         f"{v['speedup_vs_r0']:.2f}x | {v['flop_ratio_vs_r0']:.2f}x | {v['validation_max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
