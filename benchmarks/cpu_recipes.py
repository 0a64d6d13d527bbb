"""Issue 3 benchmark: ToMe x quantization on CPU backends (ONNX Runtime, OpenVINO), side by side in one run.

Builds the artifacts users get (``tome-export --target onnxruntime|openvino --precision fp32|int8``, random
weights: speed does not depend on them) for r=0 and r=16 at each static batch size, then times every artifact
of a batch size in interleaved rounds (each runtime's worker threads get a pause to stop spinning before the
next block). Reports, from medians of one run:

* ToMe speed-up, r=16 vs r=0, per backend + precision and batch size;
* stacking efficiency = speedup(ToMe + int8) / (speedup(ToMe) x speedup(int8)), each against the same backend's
  fp32 r=0 (1.0: the two speed-ups multiply; below: they overlap);
* the best stack's throughput against ONNX Runtime fp32 r=0.

    python benchmarks/cpu_recipes.py                                   # ViT-B/16, 2 threads, batch 1 and 8
    python benchmarks/cpu_recipes.py --model vit_t16 --rounds 2 --per-round 2 --out /tmp/quick   # smoke test

Writes <out>.json (raw, machine, versions) and <out>.md. Builds are cached in --cache (delete to rebuild).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from tome_export import BuildOptions, build
from tome_export.backends.openvino import cpu_capabilities
from tome_export.bench.timing import machine, measure_interleaved, versions
from tome_export.images import sample_photos
from tome_export.manifest import dumps, read_manifest
from tome_export.recipes import recipe_for
from tome_export.runtime.onnxruntime import OnnxRuntimeRunner
from tome_export.runtime.openvino import OpenVINORunner

HERE = Path(__file__).resolve().parent

# name -> (target, precision, recipe overrides, fp32 baseline of the same backend, CPU capability needed)
CONFIGS: Dict[str, Tuple[str, str, Dict[str, Dict[str, Any]], Optional[str], Optional[str]]] = {
    "ort-fp32": ("onnxruntime", "fp32", {}, None, None),
    "ort-int8": ("onnxruntime", "int8", {}, "ort-fp32", None),
    "ov-f32": ("openvino", "fp32", {}, None, None),
    "ov-int8": ("openvino", "int8", {}, "ov-f32", None),
    "ov-int8-bf16": ("openvino", "int8", {"build": {"inference_precision": "bf16"}}, "ov-f32", "BF16"),
}
# Benchmark builds skip the second, unprotected quantization that only measures merge decisions.
SPEED_ONLY = {"validation": {"compare_unprotected": False}}
RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "openvino": OpenVINORunner}
TARGETS = {"tome": {"ort-fp32": (1.9, 2.0), "ov-f32": (1.9, 2.0)}, "stacking": 0.95}  # from the issue


def recipe_file(cache: Path, name: str) -> Path:
    """The config's recipe: the built-in one with the config's overrides, as a user's edited copy."""
    target, precision, overrides, _, _ = CONFIGS[name]
    data = recipe_for(target, precision).to_dict()
    data.pop("file")
    for section, values in {**overrides, **SPEED_ONLY}.items():
        data[section] = {**(data.get(section) or {}), **values}
    path = cache / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False))
    return path


def build_cached(cache: Path, model: str, name: str, r: int, batch: int) -> Path:
    out = cache / f"{model}-{name}-r{r}-b{batch}"
    if not (out / "manifest.json").is_file():
        print(f"building {out.name}", flush=True)
        build(BuildOptions(model=model, r=r, weights="random", batch=batch, output=out, force=True,
                           recipe=recipe_file(cache, name)))
    return out


def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def analyse(rows: Dict[str, Dict[str, Any]], configs: List[str], r: int) -> Dict[str, Any]:
    """ToMe speed-ups, int8 speed-ups, stacking efficiencies and the best stack, from median latencies."""
    t = {key: row["median_ms"] for key, row in rows.items()}
    tome = {c: ratio(t[f"{c}/r0"], t[f"{c}/r{r}"]) for c in configs}
    stacking = {}
    for c in configs:
        base = CONFIGS[c][3]
        if base is None or base not in configs:
            continue
        s_tome, s_quant = t[f"{base}/r0"] / t[f"{base}/r{r}"], t[f"{base}/r0"] / t[f"{c}/r0"]
        s_both = t[f"{base}/r0"] / t[f"{c}/r{r}"]
        stacking[c] = {"baseline": base, "speedup_tome": round(s_tome, 3), "speedup_quant": round(s_quant, 3),
                       "speedup_both": round(s_both, 3), "efficiency": round(s_both / (s_tome * s_quant), 3)}
    best = min((k for k in t if k.endswith(f"/r{r}")), key=lambda k: t[k])
    return {"tome_speedup": tome, "stacking": stacking,
            "best_stack": {"config": best, "median_ms": t[best],
                           "throughput_ips": rows[best]["throughput_ips"],
                           "vs_ort_fp32_r0": ratio(t["ort-fp32/r0"], t[best]) if "ort-fp32/r0" in t else None}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--cache", type=Path, default=HERE / ".cache")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cpu_recipes")
    args = p.parse_args()

    caps = cpu_capabilities()
    configs = [c for c in args.configs if CONFIGS[c][4] is None or CONFIGS[c][4] in caps]
    skipped = {c: f"CPU lacks {CONFIGS[c][4]}" for c in args.configs if c not in configs}
    results: Dict[str, Any] = {
        "benchmark": "ToMe x quantization, ONNX Runtime and OpenVINO CPU", "model": args.model, "r": args.r,
        "threads": args.threads, "rounds": args.rounds, "per_round": args.per_round,
        "machine": {**machine(), "openvino_cpu_capabilities": caps, "load_average_start": os.getloadavg()},
        "versions": versions(["tome_export", "torch", "timm", "onnx", "onnxruntime", "openvino", "nncf", "numpy"]),
        "configs": {c: {"target": CONFIGS[c][0], "precision": CONFIGS[c][1], "overrides": CONFIGS[c][2]}
                    for c in configs},
        "skipped": skipped, "batches": {},
    }
    for batch in args.batches:
        dirs = {f"{c}/r{r}": build_cached(args.cache, args.model, c, r, batch) for c in configs for r in (0, args.r)}
        manifests = {key: read_manifest(d, verify=False) for key, d in dirs.items()}
        # One runtime runs at a time; measure_interleaved pauses before each block so the previous one's worker
        # threads (ORT spin-waits after a run) are idle again.
        runners = {key: RUNNERS[manifests[key]["target"]](d, manifests[key], threads=args.threads)
                   for key, d in dirs.items()}
        x = next(iter(runners.values())).preprocess_batch(sample_photos(batch))
        print(f"batch {batch}: timing {len(runners)} artifacts", flush=True)
        timings = measure_interleaved({k: (lambda run=run: run(x)) for k, run in runners.items()},
                                      rounds=args.rounds, per_round=args.per_round)
        rows = {}
        for key, timing in timings.items():
            m = manifests[key]
            rows[key] = {**timing.summary(batch), "gmacs": m["flops"]["gmacs"],
                         "precision_ran": m["validation"].get("precision_ran"),
                         "min_cosine_vs_pytorch": round(m["validation"]["min_cosine"], 6),
                         "top1_agreement": m["validation"]["top1_agreement"],
                         "merge_agreement": (m.get("merge_decisions", {}).get("as_built") or {}).get("agreement")}
        del runners
        results["batches"][str(batch)] = {"rows": rows, **analyse(rows, configs, args.r)}
        a = results["batches"][str(batch)]
        print(f"batch {batch}: ToMe " + ", ".join(f"{c} {s:.2f}x" for c, s in a["tome_speedup"].items())
              + "; stacking " + ", ".join(f"{c} {s['efficiency']:.2f}" for c, s in a["stacking"].items())
              + f"; best {a['best_stack']['config']} {a['best_stack']['vs_ort_fp32_r0']}x ORT fp32 r=0", flush=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(dumps(results) + "\n")
    args.out.with_suffix(".md").write_text(report(results))
    print(f"wrote {args.out}.json and .md")


def report(res: Dict[str, Any]) -> str:
    m, v = res["machine"], res["versions"]
    lines = [
        f"# {res['benchmark']}: {res['model']}, r={res['r']} vs r=0",
        "",
        f"Machine: {m.get('cpu_model')} ({m.get('cpus')} vCPUs; flags {', '.join(m.get('cpu_flags', []))}; "
        f"OpenVINO capabilities {', '.join(m['openvino_cpu_capabilities'])}), {res['threads']} threads, "
        f"load average {m['load_average_start'][0]:.2f} at start, {m['load_average_end'][0]:.2f} at end.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        f"Timing: {res['rounds']} interleaved rounds x {res['per_round']} runs per artifact, medians; "
        "random weights (speed does not depend on them); static batch per artifact.",
        "",
    ]
    if res["skipped"]:
        lines += ["Skipped: " + ", ".join(f"{c} ({why})" for c, why in res["skipped"].items()), ""]
    for batch, data in res["batches"].items():
        lines += [f"## Batch {batch}", "",
                  "| artifact | median ms | p90 ms | images/s | GMACs | ran | min cosine vs PyTorch | top-1 | merge agreement |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, row in data["rows"].items():
            agree = row["merge_agreement"]
            lines.append(f"| {key} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | {row['throughput_ips']:.1f} | "
                         f"{row['gmacs']} | {row['precision_ran']} | {row['min_cosine_vs_pytorch']:.5f} | "
                         f"{row['top1_agreement']:.3f} | {'' if agree is None else f'{agree:.3f}'} |")
        lines += ["", f"ToMe r={res['r']} vs r=0 (same backend and precision; issue target >= "
                      f"{'1.9x' if batch == '1' else '2.0x'} for ort-fp32 and ov-f32):", ""]
        want = {"1": 0, "8": 1}.get(batch)
        for c, s in data["tome_speedup"].items():
            goal = TARGETS["tome"].get(c)
            mark = "" if goal is None or want is None else (" (met)" if s >= goal[want] else " (missed)")
            lines.append(f"- {c}: {s:.2f}x{mark}")
        lines += ["", "Stacking efficiency = speedup(ToMe+int8) / (speedup(ToMe) x speedup(int8)), "
                      f"each vs the backend's fp32 r=0 (issue target >= {TARGETS['stacking']}):", ""]
        for c, s in data["stacking"].items():
            mark = " (met)" if s["efficiency"] >= TARGETS["stacking"] else " (missed)"
            lines.append(f"- {c} (vs {s['baseline']}): ToMe {s['speedup_tome']:.2f}x, quantization "
                         f"{s['speedup_quant']:.2f}x, both {s['speedup_both']:.2f}x, efficiency "
                         f"{s['efficiency']:.3f}{mark}")
        best = data["best_stack"]
        lines += ["", f"Best stack: {best['config']}, {best['throughput_ips']:.1f} images/s, "
                      f"{best['vs_ort_fp32_r0']}x the throughput of ort-fp32/r0.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
