"""The report of benchmarks/gpu_speedup.py: the GPU issue's targets against a results dict, and its markdown."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

VIT_B, VIT_L = "ViT-B/16 224 r=16", "ViT-L/16 384 r=23"
# The GPU issue's targets: ViT-B/16 r=16 fp16 CUDA-graph speed-up per batch, and the others.
TARGETS_VIT_B = {256: 1.85, 64: 1.7, 8: 1.3, 1: 1.0}
TARGET_VIT_L_64 = 1.85
TARGET_FINETUNE = 1.3
TARGET_BIAS_OVER_NO_BIAS = 1.15  # attention time with the size bias / without it, at most
TRAIN = "training step (bf16 autocast, AdamW), "


def _speedup(results: Dict[str, Any], model: str, batch: int, mode: str = "CUDA graph",
             table: str = "inference") -> Optional[float]:
    return next((r["speedup"] for r in results[table] if r["model"] == model and r["batch"] == batch
                 and r["mode"] == mode and r["variant"] == "ToMe" and not r["section"]
                 and r["dtype"] in ("float16", "bf16-autocast")), None)


def best_attention(results: Dict[str, Any], batch: int) -> Optional[Dict[str, Any]]:
    """The formulation with the smallest time over no bias at ``batch`` (attention rows)."""
    rows = [r for r in results.get("attention", []) if r["batch"] == batch and r["over_no_bias"] is not None
            and r["variant"] != "no bias (SDPA)"]
    return min(rows, key=lambda r: r["over_no_bias"], default=None)


def target_verdicts(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The issue's targets against the measured default ToMe (the design table's choice), fp16, CUDA graph."""
    checks = [(f"{VIT_B}, fp16 CUDA graph, batch {b}", _speedup(results, VIT_B, b), need, "≥")
              for b, need in sorted(TARGETS_VIT_B.items(), reverse=True)]
    checks.append((f"{VIT_L}, fp16 CUDA graph, batch 64", _speedup(results, VIT_L, 64), TARGET_VIT_L_64, "≥"))
    for batch in sorted(TARGETS_VIT_B, reverse=True):
        best = best_attention(results, batch)
        what = f"attention with the size bias / without it, batch {batch}" + (f" ({best['variant']})" if best else "")
        checks.append((what, best and best["over_no_bias"], TARGET_BIAS_OVER_NO_BIAS, "≤"))
    for mode in ("eager", "CUDA graph", "torch.compile + CUDA graph"):
        checks.append((f"{VIT_B}, fine-tuning step ({mode}), batch 64",
                       _speedup(results, VIT_B, 64, TRAIN + mode, "finetune"), TARGET_FINETUNE, "≥"))
    return [{"what": what, "measured": got, "target": need, "direction": way,
             "met": None if got is None else (got >= need if way == "≥" else got <= need)}
            for what, got, need, way in checks]


def losses(results: Dict[str, Any]) -> List[str]:
    """Where the default ToMe is slower than no ToMe, in words."""
    return [f"{r['model']}, {r['mode']}, {r['dtype']}, batch {r['batch']}: {r['speedup']:.2f}x "
            f"({r['ms']:.3f} ms with ToMe)"
            for r in results["inference"] + results["finetune"]
            if r["variant"] == "ToMe" and not r["section"] and r["speedup"] is not None and r["speedup"] < 1.0]


def markdown(results: Dict[str, Any], gpu_plan: Sequence[Dict[str, Any]]) -> str:
    env = results["environment"]
    lines = ["# ToMe speed-up on a GPU (PyTorch)", "",
             f"Device: {env.get('gpu') or 'CPU (smoke or dry run: no GPU figures)'}; driver {env.get('driver')}; "
             f"CUDA {env.get('cuda')}; torch {env['torch']}; triton {env.get('triton')}; timm {env.get('timm')}; "
             f"{env['time']}; wall {results.get('wall_s')} s.", "",
             "Random weights (seeded, the same in every variant of a row); medians of "
             f"{results['method']['rounds']} interleaved rounds timed with {results['method']['timer']}. "
             "Speed-up = no ToMe ms / ToMe ms, measured side by side. `ToMe` is the default on CUDA: the design "
             "the table `tome_export/kernels/gpu_designs.json` picks for this GPU and batch (written by the "
             "designs section of this run); `ToMe <attention>/<merge>` forces one design; `gather` / `onehot` are "
             "the portable lowerings that exports use.", ""]
    if results.get("note"):
        lines += [f"**Note.** {results['note']}", ""]
    for label, facts in results["flops"].items():
        lines.append(f"- {label}: {facts['gmacs_r0']} → {facts['gmacs']} GMACs ({facts['ratio']}x fewer), "
                     f"tokens per block {facts['tokens_per_block']}")
    lines += targets_section(results) + designs_section(results)
    lost = losses(results)
    lines += ["", "## Where ToMe loses on this device", ""] + ([f"- {w}" for w in lost] or
                                                               ["- nowhere in the measured cells"])
    lines += table_sections(results) + attention_section(results) + block_section(results)
    for profile in results["profile"]:
        lines += profile_section(profile)
    missing = unmeasured(results, gpu_plan)
    if results["skipped"] or missing:
        lines += ["", "## Not measured", ""] + [f"- {s}" for s in results["skipped"] + missing]
    return "\n".join(lines) + "\n"


def targets_section(results: Dict[str, Any]) -> List[str]:
    if results.get("smoke") or results.get("dry"):
        return []
    lines = ["", "## Targets", "", "| what | measured | target | met |", "|---|---|---|---|"]
    for t in results.get("targets") or target_verdicts(results):
        got = "not measured" if t["measured"] is None else f"{t['measured']:.2f}x"
        lines.append(f"| {t['what']} | {got} | {t.get('direction', '≥')} {t['target']}x | {t['met']} |")
    return lines


def designs_section(results: Dict[str, Any]) -> List[str]:
    if not results.get("designs"):
        return []
    lines = ["", "## Designs chosen (written to the design table)", "",
             "| from batch | attention, fastest first | merge kernels per block |", "|---|---|---|"]
    lines += [f"| {d['min_batch']} | {', '.join(d['attention'])} | {d['merge']} |" for d in results["designs"]]
    return lines


def table_sections(results: Dict[str, Any]) -> List[str]:
    """One table per (model, mode, dtype, section): batches down, variants across, ms and speed-up in each cell."""
    lines: List[str] = []
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in results["inference"] + results["finetune"]:
        groups.setdefault((r["model"], r["mode"], r["dtype"], r["section"]), []).append(r)
    for (model, mode, dtype, section), rows in groups.items():
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        title = ", ".join(p for p in (model, mode, dtype, section) if p)
        lines += ["", f"## {title}", "", "| batch | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for batch in dict.fromkeys(r["batch"] for r in rows):
            cells = []
            for v in variants:
                r = next((r for r in rows if r["batch"] == batch and r["variant"] == v), None)
                cells.append("" if r is None else f"{r['ms']:.3f} ms" +
                             ("" if r["speedup"] is None or v == "no ToMe" else f" ({r['speedup']:.2f}x)"))
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return lines


def attention_section(results: Dict[str, Any]) -> List[str]:
    rows = results.get("attention", [])
    if not rows:
        return []
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["", "## Attention calls alone (the model's biased calls, one CUDA graph each)", "",
             "Time of every attention call that carries a bias, per forward; in brackets the ratio to the same "
             "calls without the bias. `padded` includes writing the bias channels, not the wider projections.",
             "", "| batch | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for batch in dict.fromkeys(r["batch"] for r in rows):
        cells = []
        for v in variants:
            r = next((r for r in rows if r["batch"] == batch and r["variant"] == v), None)
            cells.append("" if r is None else f"{r['ms']:.3f} ms ({r['over_no_bias']:.2f}x)")
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    kernels = {r["variant"]: r["kernels"] for r in rows if r.get("kernels")}
    if kernels:
        lines += ["", "Kernels each formulation ran (largest batch):", ""]
        lines += [f"- {v}: {', '.join(k)}" for v, k in kernels.items()]
    return lines


def block_section(results: Dict[str, Any]) -> List[str]:
    block = results.get("fused_block_us")
    if not block:
        return []
    names = list(dict.fromkeys(n for v in block.values() for n in v))
    lines = ["", "## One merging block's fused kernels, CUDA graph, fp16 (µs)", "",
             "| shape | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(f"{v.get(n, '')}" for n in names) + " |" for label, v in block.items()]
    return lines


def profile_section(profile: Dict[str, Any]) -> List[str]:
    per = profile["ms_per_forward"]
    kinds = list(dict.fromkeys(k for v in per.values() for k in v if k != "total")) + ["total"]
    lines = ["", f"## Kernel time per forward, batch {profile['batch']}, {profile['dtype']} (eager, profiler)", "",
             "| kind | " + " | ".join(per) + " |", "|---|" + "---|" * len(per)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(f"{per[v].get(kind, 0.0):.3f} ms" for v in per) + " |")
    return lines


def unmeasured(results: Dict[str, Any], gpu_plan: Sequence[Dict[str, Any]]) -> List[str]:
    """Sections of the GPU plan with no results (a run cut short by its time budget or device time)."""
    if results.get("smoke") or results.get("dry"):
        return []
    done = {(r["model"], r["mode"], r["dtype"], r["section"]) for r in results["inference"]}
    done |= {(r["model"], r["mode"]) for r in results["finetune"]}
    out = []
    for section in gpu_plan:
        subject, kind = section["subject"].label, section["kind"]
        if kind == "finetune":
            measured = (subject, TRAIN + section["mode"]) in done
        elif kind in ("profile", "attention"):
            measured = bool(results.get(kind))
        elif kind == "fused_block":
            measured = bool(results.get("fused_block_us"))
        else:
            dtype = str(section["dtype"]).replace("torch.", "")
            measured = (subject, section["mode"], dtype, section.get("label", "")) in done
        if not measured:
            out.append(f"{kind}, {subject}, {section.get('mode', '')} {section.get('label', '')}: not run".replace(
                " ,", ",").replace("  ", " "))
    return out
