"""Peak memory of one variant at each batch size, measured in a fresh subprocess.

A fresh interpreter per (variant, threads) so other variants' memory never counts. On Linux the peak resident set
size (VmHWM) is reset through ``/proc/self/clear_refs`` before each batch size, so one process measures them all:
the number is the whole process at its peak while running that batch (interpreter, libraries, the loaded model,
the runtime's buffers). ``baseline_rss_mb`` is the process before the model is loaded. On a GPU, eager PyTorch
reports ``torch.cuda.max_memory_allocated`` as well.

Run as ``python -m tome_export.bench.memory SPEC.json`` (the harness does this); prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

METHOD = ("peak resident set size (VmHWM, reset per batch size through /proc/self/clear_refs) of a fresh subprocess "
          "that loads only this variant and runs each batch size 3 times")


def _status_mb() -> Tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kib = line.split(":")
                values[key] = int(kib.split()[0]) / 1024.0
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Peak memory of the variant in ``spec`` at each of ``spec['batches']`` (ascending)."""
    if spec["kind"] == "torch":
        import torch

        torch.set_num_threads(spec["threads"])
        baseline, _ = _status_mb()
        from ..schedule import parse_r_text
        from .subjects import TorchSubject, create_from

        subject = TorchSubject(create_from(spec["create_args"]), parse_r_text(spec["r"]), spec["precision"],
                               spec["device"], prop_attn=spec.get("prop_attn", True))
        timed = subject.timed
    else:  # only the deployment runtime is imported: no torch in the number
        baseline, _ = _status_mb()
        from ..runtime import load

        runner = load(Path(spec["directory"]), threads=spec["threads"], verify=False)
        timed = lambda x: (lambda: runner(x))  # noqa: E731
    loaded, _ = _status_mb()
    cuda = spec.get("device") == "cuda" and spec["kind"] == "torch"
    out: Dict[str, Any] = {}
    for batch in sorted(spec["batches"]):
        x = np.random.default_rng(0).standard_normal((batch, *spec["input_shape"])).astype(np.float32)
        run = timed(x)
        _reset_peak()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            run()
        if cuda:
            torch.cuda.synchronize()
        entry = {"peak_rss_mb": round(_status_mb()[1], 1), "baseline_rss_mb": round(baseline, 1),
                 "loaded_rss_mb": round(loaded, 1)}
        if cuda:
            entry["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out[str(batch)] = entry
    return out


def supported() -> bool:
    try:
        _status_mb()
        _reset_peak()
        return True
    except OSError:
        return False


def measure_in_subprocess(spec: Dict[str, Any], timeout_s: float = 1800) -> Dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter; ``{"error": ...}`` when it fails."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the package's root, also when run from a source tree
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "tome_export.bench.memory", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the memory subprocess ran longer than {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the memory subprocess failed: {tail}"}
    return json.loads(lines[-1])


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
