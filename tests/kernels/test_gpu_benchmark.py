"""The GPU benchmark's CPU smoke path: the prepared command runs end to end and writes both results files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # runs the benchmark script end to end
def test_gpu_benchmark_smoke_path_writes_results(tmp_path):
    out = tmp_path / "gpu_smoke"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speedup.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["smoke"] is True and results["environment"]["gpu"] is None
    variants = {(row["batch"], row["variant"]) for row in results["inference"]}
    assert variants == {(b, v) for b in (1, 2) for v in ("no ToMe", "ToMe fused", "ToMe gather", "ToMe onehot")}
    assert all(row["ms"] > 0 and row["speedup"] > 0 for row in results["inference"] + results["finetune"])
    assert len(results["finetune"]) == 3
    report = out.with_suffix(".md").read_text()
    assert "Where ToMe loses on this device" in report and "| batch | no ToMe | ToMe fused |" in report
