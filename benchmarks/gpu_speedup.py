"""ToMe speed-up on a CUDA GPU in PyTorch: no ToMe vs ToMe (fused kernel, gather, onehot), side by side.

One prepared command for a lent H100/H200 (targets of the GPU issue, fp16, CUDA graphs):

    PYTHONPATH=. python benchmarks/gpu_speedup.py                   # writes benchmarks/results/gpu_speedup.{json,md}
    python benchmarks/gpu_speedup.py --smoke --out /tmp/gpu_smoke   # CPU smoke path: tiny model, eager, seconds

What it measures, in priority order (a time budget drops the tail and says so in the results):

1. checks: the fused Triton kernel against its CPU implementation (the portable lowering) on random keys with
   ties, and the extra-channel attention against the mask, on the GPU;
2. ViT-B/16 224 px r=16, fp16, CUDA-graph replay, batch 1/8/64/256: no ToMe, ToMe fused / gather / onehot,
   and the fused model with each proportional-attention lowering forced (mask, extra channel);
3. ViT-L/16 384 px r=23, fp16, CUDA graph, batch 8 and 64;
4. a fine-tuning step (ViT-B/16, batch 64, bf16 autocast, AdamW, ``trainable=True``);
5. ViT-B/16 bf16 CUDA graph; eager fp16 and bf16; a kernel profile at batch 256; torch.compile + CUDA graph.

Every variant of a row runs in the same process on the same weights (random, seeded), in interleaved rounds
(the order rotates each round), timed with CUDA events; the median of the rounds is reported. The "no ToMe"
baseline is the unpatched timm model (timm's own fused attention).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tome_export import create_model, model_info, patch, resolve_schedule  # noqa: E402
from tome_export.bench.timing import cuda_graph  # noqa: E402
from tome_export.flops import flops_summary  # noqa: E402
from tome_export.models import base as tome_base  # noqa: E402

# batch -> the speed-up the issue asks for (ViT-B/16 r=16 fp16 CUDA graph), and the other targets.
TARGETS_VIT_B = {256: 1.75, 64: 1.5, 8: 1.0, 1: 0.85}
TARGET_VIT_L_64 = 1.8
TARGET_FINETUNE = 1.3


@dataclass(frozen=True)
class Subject:
    """One model of the benchmark: what to build and how ToMe is set."""

    label: str
    name: str
    r: int
    img_size: int
    kwargs: Dict[str, Any] = field(default_factory=dict)


VIT_B = Subject("ViT-B/16 224 r=16", "vit_b16", 16, 224)
VIT_L = Subject("ViT-L/16 384 r=23", "vit_large_patch16_384", 23, 384)
SMOKE = Subject("ViT-Ti/16 64 r=4 (smoke)", "vit_t16", 4, 64, {"img_size": 64, "depth": 4})
DRY_L = Subject("ViT-Ti/16 96 r=6 (dry)", "vit_t16", 6, 96, {"img_size": 96, "depth": 3})

# variant -> how the model is patched (None: not patched); attention: force a proportional-attention lowering
VARIANTS: Dict[str, Optional[Dict[str, Any]]] = {
    "no ToMe": None,
    "ToMe fused": {"merge_impl": "gather", "fused": True},
    "ToMe gather": {"merge_impl": "gather", "fused": False},
    "ToMe onehot": {"merge_impl": "onehot", "fused": False},
}
ATTENTION_FORCED = {"ToMe fused, channel attention": 0}  # the default is the mask


class Clock:
    """The run's time budget: later sections are skipped (and recorded as such) once it is spent."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


def environment(device: torch.device) -> Dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for mod in ("timm", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["gpu"] = None
    return env


def build_models(subject: Subject, variants: Sequence[str], dtype: torch.dtype, device: torch.device,
                 train: bool = False) -> Dict[str, torch.nn.Module]:
    """The subject once with seeded random weights, then one copy per variant (patched as the variant says)."""
    base, _ = create_model(subject.name, weights="random", seed=0, **subject.kwargs)
    models = {}
    for name in variants:
        model = copy.deepcopy(base)
        spec = VARIANTS[name.split(",")[0]]
        if spec is not None:
            patch(model, subject.r, trainable=train, **spec)
        models[name] = model.to(device=device, dtype=dtype).train(train)
    return models


def with_attention_lowering(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the proportional-attention lowering a forced variant names (the default otherwise)."""
    threshold = ATTENTION_FORCED.get(name)
    if threshold is None:
        return fn

    def call() -> Any:
        saved, tome_base.CHANNEL_MIN_TOKENS = tome_base.CHANNEL_MIN_TOKENS, threshold
        try:
            return fn()
        finally:
            tome_base.CHANNEL_MIN_TOKENS = saved
    return call


def _timed_ms(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) * 1e3 / iters
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / iters


def side_by_side(calls: Dict[str, Callable[[], Any]], device: torch.device, rounds: int,
                 round_ms: float) -> Dict[str, Dict[str, Any]]:
    """Median ms per call of each variant over interleaved rounds (order rotated every round)."""
    iters = {}
    for name, fn in calls.items():
        fn()
        once = _timed_ms(fn, 2, device)
        iters[name] = max(1, min(200, int(round_ms / max(once, 1e-3))))
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    names = list(calls)
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            samples[name].append(_timed_ms(calls[name], iters[name], device))
    return {name: {"ms": statistics.median(v), "rounds_ms": [round(s, 4) for s in v], "iters_per_round": iters[name]}
            for name, v in samples.items()}


def _forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return model(x)
    return call


def inference_rows(subject: Subject, models: Dict[str, torch.nn.Module], dtype: torch.dtype, mode: str,
                   batches: Sequence[int], device: torch.device, opts: argparse.Namespace,
                   section: str = "") -> List[Dict[str, Any]]:
    """One row per (batch, variant): median ms per batch and the speed-up over no ToMe in the same rounds."""
    rows = []
    for batch in batches:
        if opts.clock.left() < opts.reserve_s / 2:
            opts.skipped.append(f"{subject.label}, {mode}, batch {batch}: time budget spent")
            continue
        x = torch.randn(batch, 3, subject.img_size, subject.img_size, device=device, dtype=dtype)
        calls = {}
        for name, model in models.items():
            runnable = torch.compile(model) if mode.startswith("torch.compile") else model
            fn = with_attention_lowering(name, _forward(runnable, x))
            try:
                calls[name] = cuda_graph(fn) if "CUDA graph" in mode else fn
                calls[name]()
            except Exception as exc:  # a variant that fails must not lose the others' measurements
                opts.skipped.append(f"{subject.label}, {mode}, batch {batch}, {name}: failed: "
                                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                calls.pop(name, None)
                print(f"   FAILED: {opts.skipped[-1]}", flush=True)
        timed = side_by_side(calls, device, opts.rounds, opts.round_ms)
        base = timed.get("no ToMe", {}).get("ms")
        for name, t in timed.items():
            rows.append({"model": subject.label, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
                         "section": section, "batch": batch, "variant": name, "ms": round(t["ms"], 4),
                         "images_per_s": round(batch / t["ms"] * 1e3, 1),
                         "speedup": None if base is None else round(base / t["ms"], 3),
                         "rounds_ms": t["rounds_ms"], "iters_per_round": t["iters_per_round"]})
        print_rows(rows[-len(timed):])
        del calls
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return rows


def print_rows(rows: Sequence[Dict[str, Any]]) -> None:
    for row in rows:
        speed = "" if row["speedup"] is None else f"  {row['speedup']:.2f}x"
        print(f"  {row['model']:<26} {row['mode']:<28} {row['dtype']:<9} bs{row['batch']:<4} "
              f"{row['variant']:<31} {row['ms']:9.3f} ms{speed}", flush=True)


def finetune_rows(subject: Subject, batch: int, device: torch.device, opts: argparse.Namespace, graph: bool = False,
                  variants: Sequence[str] = ("no ToMe", "ToMe fused", "ToMe gather")) -> List[Dict[str, Any]]:
    """One AdamW step with bf16 autocast per call; ``trainable=True`` patches (no proportional attention).

    ``graph``: the whole step (forward, backward, optimizer) captured as one CUDA graph and replayed.
    """
    models = build_models(subject, variants, torch.float32, device, train=True)
    x = torch.randn(batch, 3, subject.img_size, subject.img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    calls = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, capturable=graph and device.type == "cuda")

        def step(m=model, o=opt) -> None:
            o.zero_grad(set_to_none=True)  # inside a graph: backward then writes the grads it allocated at capture
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph):
                loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
        calls[name] = cuda_graph(step) if graph else step
    timed = side_by_side(calls, device, opts.rounds, opts.round_ms * 4)
    base = timed["no ToMe"]["ms"]
    mode = ("CUDA-graph" if graph else "eager") + " training step (bf16 autocast, AdamW)"
    rows = [{"model": subject.label, "mode": mode, "dtype": "bf16-autocast", "section": "", "batch": batch,
             "variant": name, "ms": round(t["ms"], 4), "images_per_s": round(batch / t["ms"] * 1e3, 1),
             "speedup": round(base / t["ms"], 3), "rounds_ms": t["rounds_ms"], "iters_per_round": t["iters_per_round"]}
            for name, t in timed.items()]
    print_rows(rows)
    return rows


_KERNEL_KINDS = (("attention", ("fmha", "flash", "attention", "cudnn", "sdpa")),
                 ("ToMe fused kernels", ("_best_b_kernel", "_plan_kernel", "_merge_kernel", "_merge_backward")),
                 ("convolution", ("fprop", "conv", "nchw", "nhwc")),
                 ("GEMM", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul")),
                 ("layernorm", ("layer_norm", "layernorm")), ("GELU", ("gelu",)),
                 ("sort / top-k", ("sort", "radix", "topk")), ("gather / scatter / index", ("gather", "scatter", "index")))


def kernel_profile(models: Dict[str, torch.nn.Module], batch: int, img_size: int, dtype: torch.dtype,
                   device: torch.device) -> Dict[str, Dict[str, float]]:
    """GPU kernel time per forward by kind (eager; the same kernels a CUDA graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    x = torch.randn(batch, 3, img_size, img_size, device=device, dtype=dtype)
    for name, model in models.items():
        fwd = _forward(model, x)
        fwd()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fwd()
            sync()
        kinds: Dict[str, float] = {}
        for event in prof.key_averages():
            us = event.device_time_total if device.type == "cuda" else event.self_cpu_time_total
            if us <= 0 or event.key.startswith(("ProfilerStep", "aten::", "cudaGraph")):
                continue
            key = event.key.lower()
            kind = next((k for k, words in _KERNEL_KINDS if any(w in key for w in words)), "other elementwise / copies")
            kinds[kind] = kinds.get(kind, 0.0) + us / 3 / 1e3
        out[name] = {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        out[name]["total"] = round(sum(kinds.values()), 3)
    return out


def kernel_checks(device: torch.device) -> Dict[str, Any]:
    """The fused kernel's decisions against its CPU implementation; extra-channel vs mask attention errors."""
    from tome_export.kernels.fused_merge import merge_plan, merge_tokens

    gen = torch.Generator().manual_seed(0)
    cases = []
    for batch, heads, tokens, head_dim, r, protected in ((4, 12, 197, 64, 16, 1), (2, 16, 577, 64, 23, 1),
                                                         (3, 6, 65, 64, 12, 5), (2, 4, 50, 80, 20, 0)):
        keys = torch.randn(batch, heads, tokens, head_dim, generator=gen)
        keys[:, :, 10] = keys[:, :, 12]  # exact ties, in scores and in best-scores
        keys[:, :, 30] = keys[:, :, 12]
        size = torch.randint(1, 6, (batch, tokens), generator=gen).float()
        x = torch.randn(batch, tokens, 96, generator=gen)
        got = [t.cpu() for t in merge_plan(keys.to(device), size.to(device), r, protected, torch.float32)]
        want = merge_plan(keys, size, r, protected, torch.float32)
        merged = merge_tokens(x.to(device), size.to(device), *[t.to(device) for t in want[:3]], *[
            t.to(device) for t in want[4:]]).cpu()
        cases.append({"shape": [batch, heads, tokens, head_dim], "r": r, "protected": protected,
                      "plans_equal": all(torch.equal(g, w) for i, (g, w) in enumerate(zip(got, want)) if i != 3),
                      "max_abs_merge_diff": float((merged - merge_tokens(x, size, *want[:3], *want[4:])).abs().max())})
    return {"fused_kernel_vs_portable": cases, "attention": attention_check(device)}


def attention_check(device: torch.device) -> Dict[str, float]:
    """Relative error against an fp64 reference of the mask and extra-channel lowerings, fp16 and bf16."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(8, 12, 101, 64, generator=gen) for _ in range(3))
    log_size = torch.randint(1, 9, (8, 1, 1, 101), generator=gen).float().log()
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8 + log_size.double(), -1) @ v.double()
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        args = [t.to(device, dtype) for t in (q, k, v)]
        bias = log_size.to(device)
        mask = torch.nn.functional.scaled_dot_product_attention(*args, attn_mask=bias.to(dtype))
        channel = tome_base.channel_attention(*args, bias)
        for name, got in (("mask", mask), ("channel", channel)):
            err = (got.double().cpu() - ref).norm() / ref.norm()
            out[f"{name}_{str(dtype).replace('torch.', '')}_rel_error"] = float(err)
    return out


def kernel_timings(device: torch.device, opts: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """CUDA-graph time of one block's fused matching alone and with its merge matmul, at typical shapes (fp16)."""
    from tome_export.kernels.fused_merge import merge_plan, merge_weighted

    out = {}
    shapes = {"ViT-B/16 224, batch 1": (1, 12, 197, 64, 16), "ViT-B/16 224, batch 256": (256, 12, 197, 64, 16),
              "ViT-L/16 384, batch 64": (64, 16, 577, 64, 23)}
    for label, (batch, heads, tokens, dim, r) in shapes.items():
        qkv = torch.randn(batch, tokens, 3, heads, dim, device=device, dtype=torch.float16)
        keys = qkv.permute(2, 0, 3, 1, 4)[1]  # strided, as a block hands them over
        x = torch.randn(batch, tokens, heads * dim, device=device, dtype=torch.float16)
        size = torch.randint(1, 4, (batch, tokens, 1), device=device).float()
        calls = {"match + plan": cuda_graph(lambda: merge_plan(keys, size[..., 0], r, 1, torch.float16)),
                 "match + plan + merge": cuda_graph(lambda: merge_weighted(x, keys, size, r, 1))}
        timed = side_by_side(calls, device, opts.rounds, opts.round_ms)
        out[label] = {name: round(t["ms"] * 1e3, 2) for name, t in timed.items()}  # microseconds
    return out


def model_check(device: torch.device) -> Dict[str, float]:
    """ViT-B/16 r=16 in fp32: logits of the fused path vs the portable gather lowering (same decisions)."""
    models = build_models(VIT_B, ["ToMe fused", "ToMe gather"], torch.float32, device)
    x = torch.randn(4, 3, 224, 224, device=device, generator=torch.Generator(device).manual_seed(2))
    with torch.no_grad():
        fused, gather = models["ToMe fused"](x), models["ToMe gather"](x)
    return {"max_abs_logit_diff_fp32": float((fused - gather).abs().max()),
            "logit_scale": float(gather.abs().max())}


def plan(smoke: bool, dry: bool = False) -> List[Dict[str, Any]]:
    """The sections in priority order: (what, subject, dtype, mode, batches, variants).

    ``dry``: the GPU plan with tiny models and batches, to run every code path on the CPU.
    """
    four = list(VARIANTS)
    if dry:
        full = plan(False)
        for section in full:
            section["subject"] = DRY_L if section["subject"] is VIT_L else SMOKE
            section["dtype"] = torch.float32
            section["batches"], section["batch"] = [1, 2], 2
        return full
    if smoke:
        return [dict(kind="inference", subject=SMOKE, dtype=torch.float32, mode="eager", batches=[1, 2],
                     variants=four),
                dict(kind="finetune", subject=SMOKE, batch=2)]
    attn = four[:2] + list(ATTENTION_FORCED)
    cg = "CUDA graph"
    return [
        dict(kind="inference", subject=VIT_B, dtype=torch.float16, mode=cg, batches=[1, 8, 64, 256], variants=four),
        dict(kind="inference", subject=VIT_L, dtype=torch.float16, mode=cg, batches=[8, 64], variants=four[:3]),
        dict(kind="finetune", subject=VIT_B, batch=64),
        dict(kind="finetune", subject=VIT_B, batch=64, graph=True),
        dict(kind="inference", subject=VIT_B, dtype=torch.float16, mode=cg, batches=[1, 8, 64, 256], variants=attn,
             label="attention lowering"),
        dict(kind="inference", subject=VIT_B, dtype=torch.bfloat16, mode=cg, batches=[1, 8, 64, 256],
             variants=four[:3]),
        dict(kind="inference", subject=VIT_B, dtype=torch.float16, mode="eager", batches=[1, 8, 64, 256],
             variants=four),
        dict(kind="profile", subject=VIT_B, dtype=torch.float16, batches=[256, 1], variants=four[:3]),
        dict(kind="inference", subject=VIT_B, dtype=torch.float16, mode="torch.compile + CUDA graph",
             batches=[256, 64], variants=four[:2]),
        dict(kind="inference", subject=VIT_B, dtype=torch.bfloat16, mode="eager", batches=[1, 8, 64, 256],
             variants=four[:3]),
        dict(kind="inference", subject=VIT_L, dtype=torch.bfloat16, mode=cg, batches=[8, 64], variants=four[:2]),
    ]


def run_section(section: Dict[str, Any], device: torch.device, opts: argparse.Namespace,
                results: Dict[str, Any]) -> None:
    subject = section["subject"]
    if section["kind"] == "finetune":
        results["finetune"] += finetune_rows(subject, section["batch"], device, opts, section.get("graph", False))
        return
    models = build_models(subject, section["variants"], section["dtype"], device)
    if section["kind"] == "profile":
        for batch in section["batches"]:
            results["profile"].append({"batch": batch, "dtype": str(section["dtype"]).replace("torch.", ""),
                                       "ms_per_forward": kernel_profile(models, batch, subject.img_size,
                                                                        section["dtype"], device)})
            print(json.dumps(results["profile"][-1], indent=1), flush=True)
        return
    results["inference"] += inference_rows(subject, models, section["dtype"], section["mode"], section["batches"],
                                           device, opts, section.get("label", ""))


def section_name(section: Dict[str, Any]) -> str:
    parts = [section["kind"], section["subject"].label]
    if "dtype" in section:
        parts.append(str(section["dtype"]).replace("torch.", ""))
    parts += [section.get("mode", ""), "CUDA graph" if section.get("graph") else "", section.get("label", "")]
    return ", ".join(p for p in parts if p)


def run(opts: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not (opts.smoke or opts.dry) else "cpu")
    clock = opts.clock = Clock(opts.budget_s)
    results: Dict[str, Any] = {"benchmark": "gpu_speedup", "environment": environment(device),
                               "smoke": opts.smoke, "note": opts.note, "inference": [], "finetune": [], "profile": [],
                               "skipped": opts.skipped,
                               "method": {"rounds": opts.rounds, "round_ms": opts.round_ms, "timer": "CUDA events"
                                          if device.type == "cuda" else "perf_counter", "statistic": "median"}}
    results["flops"] = {s.label: flops_of(s) for s in ((SMOKE,) if opts.smoke or opts.dry else (VIT_B, VIT_L))}
    if device.type == "cuda" or opts.dry:
        results["checks"] = {}
        for name, check in (("kernels", lambda: kernel_checks(device)), ("model", lambda: model_check(device)),
                            ("fused_block_us", lambda: kernel_timings(device, opts))):
            try:
                results["checks"][name] = check()
            except Exception as exc:
                results["checks"][name] = f"failed: {type(exc).__name__}: {str(exc)[:500]}"
        print(json.dumps(results["checks"], indent=1), flush=True)
    for section in plan(opts.smoke, opts.dry):
        name = section_name(section)
        if clock.left() < opts.reserve_s:
            results["skipped"].append(f"{name}: time budget ({opts.budget_s:.0f} s) spent")
            continue
        print(f"== {name} ({clock.left():.0f} s left)", flush=True)
        try:
            run_section(section, device, opts, results)
        except Exception as exc:  # one failed section must not lose the others' measurements
            results["skipped"].append(f"{name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            print(f"   FAILED: {results['skipped'][-1]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["wall_s"] = round(time.perf_counter() - clock.start, 1)
        save(results, opts)  # after every section: a run cut short keeps what it measured
    save(results, opts)
    return results


def save(results: Dict[str, Any], opts: argparse.Namespace) -> None:
    results["targets"] = [] if opts.smoke or opts.dry else target_verdicts(results)
    results["tome_slower_than_no_tome"] = losses(results)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    opts.out.with_suffix(".md").write_text(markdown(results))


def flops_of(subject: Subject) -> Dict[str, Any]:
    model, _ = create_model(subject.name, weights="random", **subject.kwargs)
    info = model_info(model)
    sched = resolve_schedule(subject.r, info.num_blocks, info.num_tokens, info.num_protected)
    return {**flops_summary(info, sched.r), "tokens_per_block": list(sched.tokens)}


def target_verdicts(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The issue's targets against the measured fused (default) ToMe, fp16, CUDA graph."""
    def speedup(model: str, batch: int, mode: str = "CUDA graph", table: str = "inference") -> Optional[float]:
        return next((row["speedup"] for row in results[table] if row["model"] == model and row["batch"] == batch
                     and row["mode"] == mode and row["variant"] == "ToMe fused" and not row["section"]
                     and row["dtype"] in ("float16", "bf16-autocast")), None)

    checks = [(f"{VIT_B.label}, fp16 CUDA graph, batch {b}", speedup(VIT_B.label, b), need)
              for b, need in sorted(TARGETS_VIT_B.items(), reverse=True)]
    checks.append((f"{VIT_L.label}, fp16 CUDA graph, batch 64", speedup(VIT_L.label, 64), TARGET_VIT_L_64))
    for mode in ("eager", "CUDA-graph"):
        checks.append((f"{VIT_B.label}, {mode} fine-tuning step, batch 64",
                       speedup(VIT_B.label, 64, f"{mode} training step (bf16 autocast, AdamW)", "finetune"),
                       TARGET_FINETUNE))
    return [{"what": what, "measured": got, "target": need, "met": None if got is None else got >= need}
            for what, got, need in checks]


def losses(results: Dict[str, Any]) -> List[str]:
    """Where the default ToMe (fused) is slower than no ToMe, in words."""
    out = []
    for row in results["inference"] + results["finetune"]:
        if row["variant"] == "ToMe fused" and not row["section"] and row["speedup"] is not None \
                and row["speedup"] < 1.0:
            out.append(f"{row['model']}, {row['mode']}, {row['dtype']}, batch {row['batch']}: "
                       f"{row['speedup']:.2f}x ({row['ms']:.3f} ms with ToMe)")
    return out


def markdown(results: Dict[str, Any]) -> str:
    env = results["environment"]
    lines = ["# ToMe speed-up on a GPU (PyTorch)", "",
             f"Device: {env.get('gpu') or 'CPU (smoke or dry run: no GPU figures)'}; driver {env.get('driver')}; "
             f"CUDA {env.get('cuda')}; torch {env['torch']}; triton {env.get('triton')}; timm {env.get('timm')}; "
             f"{env['time']}; wall {results['wall_s']} s.", "",
             "Random weights (seeded, the same in every variant of a row); medians of "
             f"{results['method']['rounds']} interleaved rounds timed with {results['method']['timer']}. "
             "Speed-up = no ToMe ms / ToMe ms, measured side by side. `ToMe fused` is the default on CUDA "
             "(Triton kernels per block: best-B matching, a per-image merge plan, a memory-bound merge); "
             "`gather` / `onehot` are the portable lowerings that exports use.", ""]
    if results.get("note"):
        lines += [f"**Note.** {results['note']}", ""]
    for label, facts in results["flops"].items():
        lines.append(f"- {label}: {facts['gmacs_r0']} → {facts['gmacs']} GMACs ({facts['ratio']}x fewer), "
                     f"tokens per block {facts['tokens_per_block']}")
    lines += ["", "## Targets", "", "| what | measured | target | met |", "|---|---|---|---|"]
    for t in target_verdicts(results):
        got = "not measured" if t["measured"] is None else f"{t['measured']:.2f}x"
        lines.append(f"| {t['what']} | {got} | ≥ {t['target']}x | {t['met']} |")
    lost = losses(results)
    lines += ["", "## Where ToMe loses on this device", ""]
    lines += [f"- {w}" for w in lost] or ["- nowhere in the measured cells"]
    lines += table_sections(results)
    for profile in results["profile"]:
        lines += profile_section(profile)
    if results.get("checks"):
        lines += ["", "## Checks", "", "```json", json.dumps(results["checks"], indent=1), "```"]
    missing = unmeasured(results)
    if results["skipped"] or missing:
        lines += ["", "## Not measured", ""] + [f"- {s}" for s in results["skipped"] + missing]
    return "\n".join(lines) + "\n"


def unmeasured(results: Dict[str, Any]) -> List[str]:
    """Sections of the plan with no rows in the results (a run cut short by its time budget or device time)."""
    if results.get("smoke"):
        return []
    done = {(r["model"], r["mode"], r["dtype"], r["section"]) for r in results["inference"]}
    done |= {(r["model"], r["mode"]) for r in results["finetune"]}
    out = []
    for section in plan(False):
        subject = section["subject"].label
        if section["kind"] == "finetune":
            mode = ("CUDA-graph" if section.get("graph") else "eager") + " training step (bf16 autocast, AdamW)"
            measured = (subject, mode) in done
        elif section["kind"] == "profile":
            measured = bool(results.get("profile"))
        else:
            key = (subject, section["mode"], str(section["dtype"]).replace("torch.", ""), section.get("label", ""))
            measured = key in done
        if not measured:
            out.append(f"{section_name(section)}: not run")
    return out


def table_sections(results: Dict[str, Any]) -> List[str]:
    """One table per (model, mode, dtype): batches down, variants across, ms and speed-up in each cell."""
    lines: List[str] = []
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for row in results["inference"] + results["finetune"]:
        groups.setdefault((row["model"], row["mode"], row["dtype"], row["section"]), []).append(row)
    for (model, mode, dtype, section), rows in groups.items():
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        title = ", ".join(p for p in (model, mode, dtype, section) if p)
        lines += ["", f"## {title}", "", "| batch | " + " | ".join(variants) + " |",
                  "|---|" + "---|" * len(variants)]
        for batch in dict.fromkeys(r["batch"] for r in rows):
            cells = []
            for v in variants:
                row = next((r for r in rows if r["batch"] == batch and r["variant"] == v), None)
                cells.append("" if row is None else f"{row['ms']:.3f} ms" +
                             ("" if row["speedup"] is None or v == "no ToMe" else f" ({row['speedup']:.2f}x)"))
            lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return lines


def profile_section(profile: Dict[str, Any]) -> List[str]:
    per = profile["ms_per_forward"]
    kinds = list(dict.fromkeys(k for v in per.values() for k in v if k != "total")) + ["total"]
    lines = ["", f"## Kernel time per forward, batch {profile['batch']}, {profile['dtype']} (eager, profiler)", "",
             "| kind | " + " | ".join(per) + " |", "|---|" + "---|" * len(per)]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(f"{per[v].get(kind, 0.0):.3f} ms" for v in per) + " |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke path: tiny model, eager, one round")
    p.add_argument("--dry", action="store_true",
                   help="every section of the GPU plan with tiny models on the CPU (the fused path forced onto its "
                        "CPU implementation), to check the script before a GPU run")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_speedup",
                   help="results path without suffix (.json and .md are written)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining sections after this long")
    p.add_argument("--reserve-s", type=float, default=30.0, help="do not start a section with less time left")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--round-ms", type=float, default=40.0, help="target length of one timed round")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only write the .md report of an existing results JSON (no measuring)")
    p.add_argument("--note", default="", help="a sentence for the report: what code or run this is")
    opts = p.parse_args(argv)
    if opts.render:
        results = json.loads(opts.render.read_text())
        results["note"] = opts.note or results.get("note", "")
        opts.render.with_suffix(".md").write_text(markdown(results))
        print(f"wrote {opts.render.with_suffix('.md')}")
        return 0
    if opts.smoke or opts.dry:
        opts.rounds, opts.round_ms = min(opts.rounds, 2), min(opts.round_ms, 5.0)
    if opts.dry:
        from tome_export.kernels import fused_merge

        fused_merge.available = lambda x: not torch.compiler.is_exporting()
    opts.skipped = []
    run(opts)
    print(f"wrote {opts.out.with_suffix('.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
