"""ToMe speed-up on a GPU: ViT-B/16 r=16 vs r=0 in TensorRT fp16, at batch 1 and 64.

Targets (issue 4): >= 1.0x at batch 1 and >= 1.9x at batch 64, engine time only (inputs already on the GPU).

What runs depends on the machine, and the results file says which:

1. TensorRT (``import tensorrt``) and a GPU: ``--target tensorrt`` engines, one static engine per batch size;
2. else TensorRT-RTX (``import tensorrt_rtx``) and a GPU: ``--target tensorrt-rtx`` engines;
3. else torch with CUDA: a PROXY, not TensorRT: the same ToMe models in fp16 through torch.compile with CUDA
   graphs (mode "reduce-overhead"), labelled as such;
4. else nothing is measured: the script says why and writes a results file saying so.

Both variants of a batch size are measured side by side in one process, alternating, and compared as ratios.

    python benchmarks/tensorrt_speedup.py                       # ViT-B/16, r=16, batches 1 and 64
    python benchmarks/tensorrt_speedup.py --model vit_t16 --batches 1 4 --iters 20   # a quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_RATIO = {1: 1.0, 64: 1.9}  # batch -> required speed-up (issue 4)


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except (ImportError, OSError):
        return False


def _gpu() -> Tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    try:
        if torch.cuda.is_available():
            return True, torch.cuda.get_device_name(0)
        return False, "no CUDA GPU is visible to torch"
    except Exception as exc:  # driver problems
        return False, f"CUDA is unusable: {exc}"


def choose_path() -> Tuple[Optional[str], str]:
    """('tensorrt' | 'tensorrt-rtx' | 'torch-compile-proxy' | None, the device or the reason)."""
    has_gpu, device = _gpu()
    if not has_gpu:
        return None, device
    if _importable("tensorrt"):
        return "tensorrt", device
    if _importable("tensorrt_rtx"):
        return "tensorrt-rtx", device
    return "torch-compile-proxy", device


def _time(fn: Callable[[], None], sync: Callable[[], None], warmup: int, iters: int) -> List[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _side_by_side(runs: Dict[str, Tuple[Callable, Callable]], warmup: int, iters: int, rounds: int = 5) -> Dict[str, float]:
    """Median ms per call of each variant, measured in alternating rounds so drift hits both alike."""
    samples: Dict[str, List[float]] = {k: [] for k in runs}
    for k, (fn, sync) in runs.items():
        _time(fn, sync, warmup, 1)
    for _ in range(rounds):
        for k, (fn, sync) in runs.items():
            samples[k] += _time(fn, sync, 2, max(1, iters // rounds))
    return {k: statistics.median(v) for k, v in samples.items()}


def engine_runs(target: str, model: str, r: int, batch: int, precision: str, weights: str, workdir: Path) -> Dict[str, Any]:
    """Build static-batch engines for r=0 and r, return {label: (enqueue, sync)} timing the engine only."""
    import numpy as np

    from tome_export import BuildRequest, build
    from tome_export.runtime import load

    runs, facts = {}, {}
    for label, rr in (("r0", 0), (f"r{r}", r)):
        out = workdir / f"{model}-{label}-b{batch}-{target}-{precision}"
        result = build(BuildRequest(model=model, r=rr, target=target, precision=precision, batch=batch,
                                    weights=weights, output=out, force=True, target_options={"require_engine": True}))
        runner = load(out)
        x = runner.preprocess_batch([str(p) for p in _photos(batch)])
        runner(x.astype(np.float32))  # shapes, buffers and addresses are set; inputs are on the GPU
        runs[label] = (lambda rn=runner: rn.context.execute_async_v3(rn.device.handle), runner.device.synchronize)
        facts[label] = {"engine_bytes": result.manifest["tensorrt"]["engine"]["bytes"],
                        "validation": {k: result.manifest["validation"].get(k) for k in ("min_cosine", "top1_agreement",
                                                                                          "token_group_agreement")}}
    return {"runs": runs, "facts": facts}


def proxy_runs(model_name: str, r: int, batch: int, weights: str) -> Dict[str, Any]:
    """torch.compile (CUDA graphs) fp16 ToMe models: a stand-in where TensorRT is missing, NOT TensorRT."""
    import torch

    from tome_export import create_model, patch

    runs = {}
    for label, rr in (("r0", 0), (f"r{r}", r)):
        model, _ = create_model(model_name, weights=weights)
        patch(model, rr, merge_impl="onehot")
        model = model.half().cuda().eval()
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.half)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        with torch.no_grad():
            for _ in range(3):
                compiled(x)

        def call(c=compiled, inp=x) -> None:
            with torch.no_grad():
                c(inp)
        runs[label] = (call, torch.cuda.synchronize)
    return {"runs": runs, "facts": {}}


def _photos(n: int):
    from tome_export.images import sample_photo_paths

    paths = sample_photo_paths()
    return [paths[i % len(paths)] for i in range(n)]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--precision", default="fp16")
    p.add_argument("--weights", default="random", choices=["random", "pretrained"])
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "tensorrt_speedup.json")
    args = p.parse_args(argv)

    path, device = choose_path()
    result: Dict[str, Any] = {
        "benchmark": "tensorrt_speedup", "model": args.model, "r": args.r, "precision": args.precision,
        "weights": args.weights, "batches": args.batches, "targets": {str(b): TARGET_RATIO.get(b) for b in args.batches},
        "host": platform.node(), "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if path is None:
        reason = (f"nothing measured: this benchmark needs an NVIDIA GPU ({device}); with TensorRT or TensorRT-RTX "
                  f"it times engines, with only torch+CUDA a torch.compile proxy")
        print(f"tensorrt_speedup: {reason}", file=sys.stderr)
        result.update(measured=False, reason=reason)
    else:
        result.update(measured=True, path=path, device=device,
                      label="TensorRT engines" if path != "torch-compile-proxy" else
                      "PROXY: torch.compile(mode='reduce-overhead') fp16 on the GPU, not TensorRT")
        rows = []
        with tempfile.TemporaryDirectory(prefix="tome-trt-bench-") as tmp:
            for batch in args.batches:
                if path == "torch-compile-proxy":
                    setup = proxy_runs(args.model, args.r, batch, args.weights)
                else:
                    setup = engine_runs(path, args.model, args.r, batch, args.precision, args.weights, Path(tmp))
                ms = _side_by_side(setup["runs"], args.warmup, args.iters)
                r0, rr = ms["r0"], ms[f"r{args.r}"]
                need = TARGET_RATIO.get(batch)
                row = {"batch": batch, "ms_r0": round(r0, 3), f"ms_r{args.r}": round(rr, 3),
                       "speedup": round(r0 / rr, 3), "images_per_s_r0": round(batch / r0 * 1e3, 1),
                       f"images_per_s_r{args.r}": round(batch / rr * 1e3, 1), "target": need,
                       "target_met": None if need is None else r0 / rr >= need, **setup["facts"]}
                rows.append(row)
                print(f"batch {batch:4d}: r=0 {r0:8.3f} ms  r={args.r} {rr:8.3f} ms  speed-up {r0 / rr:.2f}x"
                      + (f" (target {need}x: {'met' if r0 / rr >= need else 'MISSED'})" if need else ""))
        result["rows"] = rows
        try:
            import tensorrt  # noqa: F401

            result["tensorrt_version"] = tensorrt.__version__
        except (ImportError, OSError):
            pass
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
