"""Latency measurement that survives a noisy shared machine.

Configurations are measured in interleaved rounds (A B C, B C A, ...), so slow phases of the machine hit
every configuration alike; a pause before each block lets the previous runtime's worker threads stop
spinning. Ratios are taken between medians measured in the same run.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np


@dataclass
class Timing:
    samples_ms: List[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    def summary(self, batch: int) -> Dict[str, float]:
        med = self.median_ms
        return {"median_ms": round(med, 3), "p90_ms": round(self.percentile_ms(90), 3),
                "p99_ms": round(self.percentile_ms(99), 3), "min_ms": round(min(self.samples_ms), 3),
                "throughput_ips": float(f"{1000.0 * batch / med:.5g}"), "runs": len(self.samples_ms)}  # 5 digits at any speed


Clock = Callable[[Callable[[], object]], float]  # runs the callable once, returns milliseconds


def wall_clock_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def cuda_clock_ms(fn: Callable[[], object]) -> float:
    """GPU time of ``fn``'s kernels between two CUDA events (no host-side launch jitter in the number)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture ``fn`` as a CUDA graph (after warm-up calls on a side stream, which also compile Triton kernels and
    settle the caching allocator) and return its replay; without CUDA, ``fn`` itself after one call."""
    import torch

    if not torch.cuda.is_available():
        fn()
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure_interleaved(
    runs: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    per_round: int = 5,
    warmup: int = 2,
    pause_s: float = 0.2,
    clocks: Optional[Mapping[str, Clock]] = None,
) -> Dict[str, Timing]:
    """Time each callable ``rounds x per_round`` times, rotating the order every round.

    ``clocks`` picks how a configuration is timed (default :func:`wall_clock_ms`; :func:`cuda_clock_ms` for GPU
    work launched asynchronously).
    """
    clocks = clocks or {}
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    timings = {name: Timing() for name in names}
    for k in range(rounds):
        order = names[k % len(names):] + names[: k % len(names)]
        for name in order:
            time.sleep(pause_s)
            runs[name]()  # the first call after a pause wakes threads and caches up; not timed
            clock = clocks.get(name, wall_clock_ms)
            for _ in range(per_round):
                timings[name].samples_ms.append(clock(runs[name]))
    return timings


def machine() -> Dict[str, object]:
    """CPU model and the flags that matter for inference, core count, OS, Python."""
    info: Dict[str, object] = {"platform": platform.platform(), "python": platform.python_version(),
                               "cpus": os.cpu_count()}
    try:
        text = open("/proc/cpuinfo").read()
        model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "")
        flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "avx_vnni")
        info.update(cpu_model=model, cpu_flags=[f for f in wanted if f in flags])
    except OSError:
        info["cpu_model"] = platform.processor()
    return info


def versions(modules: Sequence[str]) -> Dict[str, str]:
    """Installed versions of the distributions that provide ``modules`` (read from metadata, nothing imported)."""
    from importlib import metadata

    providers = metadata.packages_distributions()
    out = {}
    for name in modules:
        for dist in providers.get(name, []):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out
