"""The GPU benchmark on the CPU: its smoke path runs end to end, and the design it would record is the fastest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tome_export.kernels.designs import TABLE, Design

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_speedup  # noqa: E402


def _row(batch, variant, ms, section="designs"):
    return {"batch": batch, "variant": variant, "ms": ms, "section": section}


def test_the_recorded_design_is_the_fastest_measured_per_batch():
    rows = [_row(1, "no ToMe", 1.0), _row(1, "ToMe mask/three", 1.2), _row(1, "ToMe padded/three", 1.3),
            _row(1, "ToMe mask/one", 0.9), _row(1, "ToMe padded/one", 1.1), _row(1, "ToMe flex/one", 2.0),
            _row(256, "ToMe mask/three", 20.0), _row(256, "ToMe padded/three", 16.0), _row(256, "ToMe cudnn/one", 18.0),
            _row(256, "ToMe padded/one", 17.0)]
    assert gpu_speedup.chosen_designs(rows) == [(1, Design(("mask", "padded", "flex"), "one")),
                                                (256, Design(("padded", "cudnn", "mask"), "three"))]


def test_every_design_is_measured_in_the_gpu_plan():
    sections = gpu_speedup.plan(False)
    first = sections[0]
    assert first["label"] == "designs" and first["batches"] == [1, 8, 64, 256]
    assert set(first["variants"]) == {"no ToMe"} | {f"ToMe {a}/{m}" for a in ("mask", "padded", "cudnn", "flex")
                                                    for m in ("three", "one")}
    kinds = {s["kind"] for s in sections}
    assert kinds == {"inference", "attention", "fused_block", "finetune", "profile"}
    assert {s["mode"] for s in sections if s["kind"] == "finetune"} == {"eager", "CUDA graph",
                                                                        "torch.compile + CUDA graph"}


@pytest.mark.slow  # runs the benchmark script end to end
def test_gpu_benchmark_smoke_path_writes_results(tmp_path):
    table = TABLE.read_text()
    out = tmp_path / "gpu_smoke"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speedup.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["smoke"] is True and results["environment"]["gpu"] is None
    variants = {(row["batch"], row["variant"]) for row in results["inference"]}
    assert variants == {(b, v) for b in (1, 2) for v in ("no ToMe", "ToMe", "ToMe gather", "ToMe onehot")}
    assert all(row["ms"] > 0 and row["speedup"] > 0 for row in results["inference"] + results["finetune"])
    assert {row["variant"] for row in results["finetune"]} == {"no ToMe", "ToMe"}
    report = out.with_suffix(".md").read_text()
    assert "Where ToMe loses on this device" in report and "| batch | no ToMe | ToMe |" in report
    assert TABLE.read_text() == table  # a CPU run never records designs
