"""ToMe speed-up on a CUDA GPU in PyTorch: no ToMe vs ToMe in every fused-path design, side by side.

One prepared command for a lent H100/H200 (torch, Triton and timm; fp16, CUDA graphs, random weights):

    PYTHONPATH=. python benchmarks/gpu_speedup.py     # benchmarks/results/gpu_speedup.{json,md} and this GPU's
                                                      # entries in tome_export/kernels/gpu_designs.json
    python benchmarks/gpu_speedup.py --smoke          # CPU, tiny model, eager, seconds (results to a temp folder)
    python benchmarks/gpu_speedup.py --dry            # CPU, every section of the GPU plan with tiny models

Sections, in priority order (a time budget drops the tail and says so in the results):

1. designs: ViT-B/16 224 px r=16, fp16, CUDA graph, batch 1/8/64/256: no ToMe and ToMe with each design forced
   (attention: mask, padded heads, cuDNN, FlexAttention; merge: three kernels or one per block). The fastest
   design per batch is written to the design table, which the model reads from then on;
2. the headline: no ToMe vs ToMe as the table now chooses, measured again;
3. attention alone: ViT-B r=16's attention calls, each formulation with the size bias vs plain SDPA without it;
4. one merging block's kernels (three vs one) in microseconds;
5. a fine-tuning step (ViT-B/16, batch 64, bf16 autocast, AdamW, ``trainable=True``): eager and CUDA graph;
6. ViT-L/16 384 px r=23, fp16, CUDA graph, batch 8 and 64; 7. ViT-B/16 bf16, CUDA graph;
8. the fine-tuning step compiled (``torch.compile``, fused backward) in a CUDA graph;
9. the kernel profile of the final design at batch 256 and 1; 10. torch.compile + CUDA graph inference;
11. the portable lowerings (gather, onehot) in a CUDA graph; 12. eager fp16.

Every variant of a row runs in the same process on the same weights (random, seeded), in interleaved rounds
(the order rotates each round), timed with CUDA events; the median of the rounds is reported. The "no ToMe"
baseline is the unpatched timm model (timm's own fused attention). Correctness of the kernels and of every
formulation is tested on the CPU (tests/kernels); this script only times.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import gpu_report  # noqa: E402

from tome_export import create_model, model_info, patch, resolve_schedule  # noqa: E402
from tome_export.bench.timing import cuda_graph  # noqa: E402
from tome_export.flops import flops_summary  # noqa: E402
from tome_export.kernels import attention as gpu_attention  # noqa: E402
from tome_export.kernels import designs  # noqa: E402
from tome_export.kernels.designs import Design  # noqa: E402
from tome_export.kernels.plan import split_log_size  # noqa: E402


@dataclass(frozen=True)
class Subject:
    """One model of the benchmark: what to build and how ToMe is set."""

    label: str
    name: str
    r: int
    img_size: int
    kwargs: Dict[str, Any] = field(default_factory=dict)


VIT_B = Subject(gpu_report.VIT_B, "vit_b16", 16, 224)
VIT_L = Subject(gpu_report.VIT_L, "vit_large_patch16_384", 23, 384)
SMOKE = Subject("ViT-Ti/16 64 r=4 (smoke)", "vit_t16", 4, 64, {"img_size": 64, "depth": 4})
DRY_L = Subject("ViT-Ti/16 96 r=6 (dry)", "vit_t16", 6, 96, {"img_size": 96, "depth": 3})

FUSED = {"merge_impl": "gather", "fused": True}
DESIGNS = {f"ToMe {a}/{m}": Design((a,), m) for m in designs.MERGE for a in designs.ATTENTION}
# variant -> (how the model is patched, None: not patched; the design forced while it runs, None: the table's)
VARIANTS: Dict[str, Tuple[Optional[Dict[str, Any]], Optional[Design]]] = {
    "no ToMe": (None, None),
    "ToMe": (FUSED, None),
    **{name: (FUSED, d) for name, d in DESIGNS.items()},
    "ToMe gather": ({"merge_impl": "gather", "fused": False}, Design(("mask",), "three")),
    "ToMe onehot": ({"merge_impl": "onehot", "fused": False}, Design(("mask",), "three")),
}


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


# --- running and timing ----------------------------------------------------------------------------------------


def build_models(subject: Subject, variants: Sequence[str], dtype: torch.dtype, device: torch.device,
                 train: bool = False) -> Dict[str, torch.nn.Module]:
    """The subject once with seeded random weights, then one copy per variant (patched as the variant says)."""
    base, _ = create_model(subject.name, weights="random", seed=0, **subject.kwargs)
    models = {}
    for name in variants:
        model = copy.deepcopy(base)
        spec = VARIANTS[name][0]
        if spec is not None:
            patch(model, subject.r, trainable=train, **spec)
        models[name] = model.to(device=device, dtype=dtype).train(train)
    return models


def in_design(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with the design its variant forces (the table's otherwise); a CUDA graph captures it."""
    chosen = VARIANTS.get(name, (None, None))[1]
    if chosen is None:
        return fn

    def call() -> Any:
        with designs.forced(chosen):
            return fn()
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


def prepared(calls: Dict[str, Callable[[], Any]], graph: bool, what: str,
             opts: argparse.Namespace) -> Dict[str, Callable[[], Any]]:
    """Each call captured as a CUDA graph (or run once), dropping the variants that fail, with the reason."""
    ready = {}
    for name, fn in calls.items():
        try:
            ready[name] = cuda_graph(fn) if graph else fn
            ready[name]()
        except Exception as exc:  # a variant that fails must not lose the others' measurements
            opts.skipped.append(f"{what}, {name}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            print(f"   FAILED: {opts.skipped[-1]}", flush=True)
    return ready


def _forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return model(x)
    return call


def row(subject: Subject, mode: str, dtype: Any, section: str, batch: int, name: str, t: Dict[str, Any],
        base: Optional[float]) -> Dict[str, Any]:
    return {"model": subject.label, "mode": mode, "dtype": str(dtype).replace("torch.", ""), "section": section,
            "batch": batch, "variant": name, "ms": round(t["ms"], 4), "images_per_s": round(batch / t["ms"] * 1e3, 1),
            "speedup": None if base is None else round(base / t["ms"], 3), "rounds_ms": t["rounds_ms"],
            "iters_per_round": t["iters_per_round"]}


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
        compiled = mode.startswith("torch.compile")
        calls = {name: in_design(name, _forward(torch.compile(m) if compiled else m, x)) for name, m in models.items()}
        calls = prepared(calls, "CUDA graph" in mode, f"{subject.label}, {mode}, batch {batch}", opts)
        timed = side_by_side(calls, device, opts.rounds, opts.round_ms)
        base = timed.get("no ToMe", {}).get("ms")
        rows += [row(subject, mode, dtype, section, batch, name, t, base) for name, t in timed.items()]
        print_rows(rows[-len(timed):])
        del calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_rows(rows: Sequence[Dict[str, Any]]) -> None:
    for r in rows:
        speed = "" if r["speedup"] is None else f"  {r['speedup']:.2f}x"
        print(f"  {r['model']:<26} {r['mode']:<28} {r['dtype']:<9} bs{r['batch']:<4} {r['variant']:<22} "
              f"{r['ms']:9.3f} ms{speed}", flush=True)


# --- the design table ------------------------------------------------------------------------------------------


def chosen_designs(rows: Sequence[Dict[str, Any]]) -> List[Tuple[int, Design]]:
    """Per measured batch: formulations ordered by their best time (over both merges), and the fastest merge."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        timed = {r["variant"]: r["ms"] for r in rows if r["batch"] == batch and r["variant"] in DESIGNS}
        if not timed:
            continue
        best = {a: min(ms for name, ms in timed.items() if DESIGNS[name].attention[0] == a)
                for a in designs.ATTENTION if any(DESIGNS[n].attention[0] == a for n in timed)}
        winner = DESIGNS[min(timed, key=timed.get)]
        out.append((batch, Design(tuple(sorted(best, key=best.get)), winner.merge)))
    return out


def record_designs(results: Dict[str, Any], opts: argparse.Namespace) -> None:
    """Write this GPU's fastest designs into the table the model reads (a CUDA run only) and reload it."""
    rows = [r for r in results["inference"] if r["section"] == "designs"]
    chosen = chosen_designs(rows)
    results["designs"] = [{"min_batch": b, "attention": list(d.attention), "merge": d.merge} for b, d in chosen]
    gpu = results["environment"].get("gpu")
    if not chosen or gpu is None or opts.no_write_designs:
        return
    env = results["environment"]
    measured = {"results": str(opts.out.with_suffix(".json").relative_to(ROOT)) if opts.out.is_relative_to(ROOT)
                else str(opts.out.with_suffix(".json")), "time": env["time"], "torch": env["torch"],
                "triton": env["triton"], "how": f"{VIT_B.label}, fp16, CUDA graph, fastest model forward"}
    designs.write_measured(gpu, chosen, measured)
    designs.reload()
    print(f"   design table for {gpu}: {results['designs']}", flush=True)


# --- attention alone, one merging block's kernels ---------------------------------------------------------------


def _attention_inputs(batch: int, tokens: int, heads: int, d: int, dtype: torch.dtype,
                      device: torch.device) -> Dict[str, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(tokens)
    q, k, v = (torch.randn(batch, heads, tokens, d, device=device, dtype=dtype, generator=gen) for _ in range(3))
    log = torch.randint(1, 9, (batch, 1, 1, tokens), device=device, generator=gen).float().log().to(dtype)
    pad = gpu_attention.PAD
    qp, kp, vp = (torch.nn.functional.pad(t, (0, pad)) for t in (q, k, v))
    qp[..., d:d + 2] = 1.0
    channels = split_log_size(log[:, 0, 0].float(), d, dtype)
    return dict(q=q, k=k, v=v, log=log, qp=qp, kp=kp, vp=vp, channels=channels)


def _attention_calls(shapes: List[Dict[str, torch.Tensor]], d: int) -> Dict[str, Callable[[], Any]]:
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def each(fn: Callable[[Dict[str, torch.Tensor]], Any]) -> Callable[[], Any]:
        return lambda: [fn(s) for s in shapes]

    def padded(s: Dict[str, torch.Tensor]) -> Any:
        s["kp"][..., d:d + 2] = s["channels"][:, None]
        return sdpa(s["qp"], s["kp"], s["vp"], scale=d ** -0.5)

    calls = {"no bias (SDPA)": each(lambda s: sdpa(s["q"], s["k"], s["v"])), "padded": each(padded)}
    for name, fn in gpu_attention.FORMULATIONS.items():
        calls[name] = each(lambda s, fn=fn: fn(s["q"], s["k"], s["v"], s["log"]))
    return calls


def attention_rows(subject: Subject, batches: Sequence[int], dtype: torch.dtype, device: torch.device,
                   opts: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every attention call of the model that carries a bias (one CUDA graph per formulation), against the
    same calls without the bias. Padded heads: the write of the bias channels included, the wider qkv and
    output projections not (those are in the model rows)."""
    model, _ = create_model(subject.name, weights="random", **subject.kwargs)
    info = model_info(model)
    d = info.attn_dim // info.num_heads
    tokens = resolve_schedule(subject.r, info.num_blocks, info.num_tokens, info.num_protected).tokens[:-1]
    rows = []
    for batch in batches:
        shapes = [_attention_inputs(batch, t, info.num_heads, d, dtype, device) for t in tokens]
        calls = prepared(_attention_calls(shapes, d), device.type == "cuda", f"attention, batch {batch}", opts)
        timed = side_by_side(calls, device, opts.rounds, opts.round_ms)
        base = timed.get("no bias (SDPA)", {}).get("ms")
        for name, t in timed.items():
            r = row(subject, "attention calls, CUDA graph", dtype, "attention", batch, name, t, None)
            r["over_no_bias"] = None if base is None else round(t["ms"] / base, 3)
            r["kernels"] = attention_kernels(calls[name], device) if batch == max(batches) else None
            rows.append(r)
        print("  attention bs%d: %s" % (batch, {r["variant"]: r["over_no_bias"] for r in rows[-len(timed):]}),
              flush=True)
    return rows


def attention_kernels(fn: Callable[[], Any], device: torch.device) -> Optional[List[str]]:
    """Names of the GPU kernels a call runs (which SDPA backend really ran)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key[:120] for e in prof.key_averages() if e.device_time_total > 0
                   and not e.key.startswith(("aten::", "cudaGraph"))})


# one merging block: label -> (batch, heads, tokens, head dim, r)
BLOCK_SHAPES = {**{f"ViT-B/16 224, batch {b}": (b, 12, 197, 64, 16) for b in (1, 8, 64, 256)},
                "ViT-L/16 384, batch 64": (64, 16, 577, 64, 23)}
DRY_BLOCK_SHAPES = {"ViT-Ti/16 64, batch 2": (2, 3, 17, 64, 4)}


def fused_block_us(shapes: Dict[str, Tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                   opts: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """CUDA-graph time of one block's matching and plan alone, then with the merge in three kernels or one."""
    from tome_export.kernels.fused_merge import merge_plan, merge_weighted

    out = {}
    for label, (batch, heads, tokens, dim, r) in shapes.items():
        qkv = torch.randn(batch, tokens, 3, heads, dim, device=device, dtype=dtype)
        keys = qkv.permute(2, 0, 3, 1, 4)[1]  # strided, as a block hands them over
        x = torch.randn(batch, tokens, heads * dim, device=device, dtype=dtype)
        size = torch.randint(1, 4, (batch, tokens, 1), device=device).float()
        calls = {"match + plan": lambda: merge_plan(keys, size[..., 0], r, 1, dtype),
                 "three kernels": lambda: merge_weighted(x, keys, size, r, 1, one_kernel=False),
                 "one kernel": lambda: merge_weighted(x, keys, size, r, 1, one_kernel=True)}
        calls = prepared(calls, device.type == "cuda", f"fused block, {label}", opts)
        timed = side_by_side(calls, device, opts.rounds, opts.round_ms)
        out[label] = {name: round(t["ms"] * 1e3, 2) for name, t in timed.items()}  # microseconds
        print(f"  {label}: {out[label]} us", flush=True)
    return out


# --- fine-tuning -----------------------------------------------------------------------------------------------


def training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, graph: bool) -> Callable[[], None]:
    """One AdamW step with bf16 autocast; ``graph``: written to be captured whole as one CUDA graph."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, capturable=graph and x.is_cuda)

    def step() -> None:
        opt.zero_grad(set_to_none=True)  # inside a graph: backward then writes the grads it allocated at capture
        with torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=not graph):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def finetune_rows(subject: Subject, batch: int, mode: str, device: torch.device,
                  opts: argparse.Namespace) -> List[Dict[str, Any]]:
    """The training step, no ToMe vs ToMe (``trainable=True``: no proportional attention, the fused backward)."""
    models = build_models(subject, ("no ToMe", "ToMe"), torch.float32, device, train=True)
    x = torch.randn(batch, 3, subject.img_size, subject.img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    graph = mode != "eager"
    compiled = mode.startswith("torch.compile")
    calls = {name: training_step(torch.compile(m, backend=opts.compile_backend) if compiled else m, x, y, graph)
             for name, m in models.items()}
    calls = prepared(calls, graph and device.type == "cuda", f"{subject.label}, training step, {mode}", opts)
    timed = side_by_side(calls, device, opts.rounds, opts.round_ms * 4)
    base = timed.get("no ToMe", {}).get("ms")
    rows = [row(subject, gpu_report.TRAIN + mode, "bf16-autocast", "", batch, name, t, base)
            for name, t in timed.items()]
    print_rows(rows)
    return rows


# --- kernel profile ----------------------------------------------------------------------------------------------

_KERNEL_KINDS = (("attention", ("fmha", "flash", "attention", "cudnn", "sdpa", "triton_tem")),
                 ("ToMe fused kernels", ("_best_b_kernel", "_plan_kernel", "_merge_kernel", "_merge_backward",
                                         "_block_kernel")),
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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, model in models.items():
        fwd = in_design(name, _forward(model, x))
        fwd()
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


# --- the plan ----------------------------------------------------------------------------------------------------


def plan(smoke: bool, dry: bool = False) -> List[Dict[str, Any]]:
    """The sections in priority order. ``dry``: the GPU plan with tiny models and batches, on the CPU."""
    if dry:
        full = plan(False)
        for section in full:
            section["subject"] = DRY_L if section["subject"] is VIT_L else SMOKE
            section["dtype"] = torch.float32
            section["batches"], section["batch"] = [1, 2], 2
            if section["kind"] == "fused_block":
                section["shapes"] = DRY_BLOCK_SHAPES
        return full
    if smoke:
        return [dict(kind="inference", subject=SMOKE, dtype=torch.float32, mode="eager", batches=[1, 2],
                     variants=["no ToMe", "ToMe", "ToMe gather", "ToMe onehot"]),
                dict(kind="finetune", subject=SMOKE, batch=2, mode="eager")]
    cg, fp16, bs = "CUDA graph", torch.float16, [1, 8, 64, 256]
    return [
        dict(kind="inference", subject=VIT_B, dtype=fp16, mode=cg, batches=bs, variants=["no ToMe", *DESIGNS],
             label="designs"),
        dict(kind="inference", subject=VIT_B, dtype=fp16, mode=cg, batches=bs, variants=["no ToMe", "ToMe"]),
        dict(kind="attention", subject=VIT_B, dtype=fp16, batches=bs),
        dict(kind="fused_block", subject=VIT_B, dtype=fp16, shapes=BLOCK_SHAPES),
        dict(kind="finetune", subject=VIT_B, batch=64, mode="eager"),
        dict(kind="finetune", subject=VIT_B, batch=64, mode="CUDA graph"),
        dict(kind="inference", subject=VIT_L, dtype=fp16, mode=cg, batches=[8, 64], variants=["no ToMe", "ToMe"]),
        dict(kind="inference", subject=VIT_B, dtype=torch.bfloat16, mode=cg, batches=bs, variants=["no ToMe", "ToMe"]),
        dict(kind="finetune", subject=VIT_B, batch=64, mode="torch.compile + CUDA graph", need_s=150),
        dict(kind="profile", subject=VIT_B, dtype=fp16, batches=[256, 1], variants=["no ToMe", "ToMe", "ToMe mask/three"]),
        dict(kind="inference", subject=VIT_B, dtype=fp16, mode="torch.compile + CUDA graph", batches=[256, 64],
             variants=["no ToMe", "ToMe"], need_s=120),
        dict(kind="inference", subject=VIT_B, dtype=fp16, mode=cg, batches=bs,
             variants=["no ToMe", "ToMe", "ToMe gather", "ToMe onehot"], label="portable lowerings"),
        dict(kind="inference", subject=VIT_B, dtype=fp16, mode="eager", batches=bs, variants=["no ToMe", "ToMe"]),
    ]


def run_section(section: Dict[str, Any], device: torch.device, opts: argparse.Namespace,
                results: Dict[str, Any]) -> None:
    subject, kind = section["subject"], section["kind"]
    if kind == "finetune":
        results["finetune"] += finetune_rows(subject, section["batch"], section["mode"], device, opts)
    elif kind == "attention":
        results["attention"] += attention_rows(subject, section["batches"], section["dtype"], device, opts)
    elif kind == "fused_block":
        results["fused_block_us"] = fused_block_us(section["shapes"], section["dtype"], device, opts)
    elif kind == "profile":
        models = build_models(subject, section["variants"], section["dtype"], device)
        for batch in section["batches"]:
            results["profile"].append({"batch": batch, "dtype": str(section["dtype"]).replace("torch.", ""),
                                       "ms_per_forward": kernel_profile(models, batch, subject.img_size,
                                                                        section["dtype"], device)})
            print(json.dumps(results["profile"][-1], indent=1), flush=True)
    else:
        models = build_models(subject, section["variants"], section["dtype"], device)
        results["inference"] += inference_rows(subject, models, section["dtype"], section["mode"],
                                               section["batches"], device, opts, section.get("label", ""))
        if section.get("label") == "designs":
            record_designs(results, opts)


def section_name(section: Dict[str, Any]) -> str:
    parts = [section["kind"], section["subject"].label]
    if "dtype" in section:
        parts.append(str(section["dtype"]).replace("torch.", ""))
    parts += [section.get("mode", ""), section.get("label", "")]
    return ", ".join(p for p in parts if p)


def run(opts: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not (opts.smoke or opts.dry) else "cpu")
    clock = opts.clock = Clock(opts.budget_s)
    results: Dict[str, Any] = {"benchmark": "gpu_speedup", "environment": environment(device), "smoke": opts.smoke,
                               "dry": opts.dry, "note": opts.note, "inference": [], "attention": [], "finetune": [],
                               "profile": [], "designs": [], "skipped": opts.skipped,
                               "method": {"rounds": opts.rounds, "round_ms": opts.round_ms, "timer": "CUDA events"
                                          if device.type == "cuda" else "perf_counter", "statistic": "median"}}
    results["flops"] = {s.label: flops_of(s) for s in ((SMOKE,) if opts.smoke or opts.dry else (VIT_B, VIT_L))}
    for section in plan(opts.smoke, opts.dry):
        name = section_name(section)
        if clock.left() < max(opts.reserve_s, section.get("need_s", 0)):  # need_s: compilations take minutes
            results["skipped"].append(f"{name}: time budget ({opts.budget_s} s) spent")
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
    results["targets"] = [] if opts.smoke or opts.dry else gpu_report.target_verdicts(results)
    results["tome_slower_than_no_tome"] = gpu_report.losses(results)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    opts.out.with_suffix(".md").write_text(gpu_report.markdown(results, plan(False)))


def flops_of(subject: Subject) -> Dict[str, Any]:
    model, _ = create_model(subject.name, weights="random", **subject.kwargs)
    info = model_info(model)
    sched = resolve_schedule(subject.r, info.num_blocks, info.num_tokens, info.num_protected)
    return {**flops_summary(info, sched.r), "tokens_per_block": list(sched.tokens)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU smoke path: tiny model, eager, two rounds")
    p.add_argument("--dry", action="store_true",
                   help="every section of the GPU plan with tiny models on the CPU (the fused operators run their "
                        "CPU implementation), to check the script before a GPU run")
    p.add_argument("--out", type=Path, default=None,
                   help="results path without suffix (.json and .md are written); default "
                        "benchmarks/results/gpu_speedup on a GPU, a temporary folder for --smoke/--dry")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the remaining sections after this long (default 480 s on a GPU, none on the CPU)")
    p.add_argument("--reserve-s", type=float, default=30.0, help="do not start a section with less time left")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--round-ms", type=float, default=40.0, help="target length of one timed round")
    p.add_argument("--no-write-designs", action="store_true",
                   help="do not write this GPU's measured designs into tome_export/kernels/gpu_designs.json")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only write the .md report of an existing results JSON (no measuring)")
    p.add_argument("--note", default="", help="a sentence for the report: what code or run this is")
    opts = p.parse_args(argv)
    if opts.render:
        results = json.loads(opts.render.read_text())
        results["note"] = opts.note or results.get("note", "")
        opts.render.with_suffix(".md").write_text(gpu_report.markdown(results, plan(False)))
        print(f"wrote {opts.render.with_suffix('.md')}")
        return 0
    cpu_run = opts.smoke or opts.dry or not torch.cuda.is_available()
    if opts.out is None:
        opts.out = (Path(tempfile.gettempdir()) / "gpu_speedup_cpu" if cpu_run
                    else ROOT / "benchmarks" / "results" / "gpu_speedup")
    opts.compile_backend = "aot_eager" if opts.dry else "inductor"  # the CPU check needs no C++ build
    if opts.budget_s is None:
        opts.budget_s = float("inf") if cpu_run else 480.0
    if opts.smoke or opts.dry:
        opts.rounds, opts.round_ms = min(opts.rounds, 2), min(opts.round_ms, 5.0)
    with forced_cpu_kernels(opts.dry):
        opts.skipped = []
        run(opts)
    print(f"wrote {opts.out.with_suffix('.json')} and .md")
    return 0


@contextlib.contextmanager
def forced_cpu_kernels(on: bool):
    """``--dry``: the fused operators run (their CPU implementation) on CPU tensors."""
    from tome_export.kernels import fused_merge

    saved = fused_merge.available
    if on:
        fused_merge.available = lambda x: not torch.compiler.is_exporting()
    try:
        yield
    finally:
        fused_merge.available = saved


if __name__ == "__main__":
    sys.exit(main())
