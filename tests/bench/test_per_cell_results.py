"""Each static batch has its own artifact, so each cell carries its own result: a variant whose batch-1 artifact
cannot be loaded still measures its batch-2 cell, and the report says which batch failed and why."""

import json

import pytest
import yaml

from tome_export.bench.harness import run_bench

pytestmark = pytest.mark.slow

CONFIG = {
    "name": "per-cell",
    "models": [{"model": "vit_t16", "weights": "random", "seed": 0, "kwargs": {"depth": 2, "img_size": 64}}],
    "r": [4],
    "precisions": ["fp32"],
    "backends": ["onnxruntime"],
    "batches": [1, 2],
    "threads": [1],
    "timing": {"warmup": 1, "rounds": 2, "per_round": 2, "pause_s": 0.0},
    "quality": {"images": 2, "decision_images": 2},
    "memory": False,
    "build": {"dynamic_batch": False},  # one artifact per batch size
}


def test_a_broken_batch_1_artifact_fails_only_its_own_cell(tmp_path):
    from tome_export.bench.config import parse_config

    config = parse_config(yaml.safe_load(yaml.safe_dump(CONFIG)), tmp_path / "c.yaml")
    cache = tmp_path / "artifacts"
    first = run_bench(config, tmp_path / "first", cache=cache)
    assert first.measured == 4 and first.failed == 0  # r=4 and the r=0 baseline, at batch 1 and 2
    batch1 = next(p for p in cache.iterdir() if p.name.endswith("-b1")
                  and any(json.loads((p / "manifest.json").read_text())["r_schedule"]))
    with open(batch1 / "model.onnx", "ab") as f:  # the cached batch-1 artifact no longer matches its checksum
        f.write(b"\0")
    second = run_bench(config, tmp_path / "second", cache=cache, force=True)
    cells = {c["batch"]: c for c in json.loads((tmp_path / "second" / "results.json").read_text())["cells"].values()
             if c["r"] != "r0"}
    assert cells[1]["status"] == "skipped" and "does not match its sha256" in cells[1]["reason"]
    assert cells[2]["status"] == "measured"  # it used to inherit batch 1's reason
    variant = next(v for k, v in second.results["variants"].items() if not k.endswith("/r0"))
    assert variant["static_batch"] == 2 and variant["fidelity"]["top1_agreement"] == 1.0
    report = (tmp_path / "second" / "report.md").read_text()
    assert "onnxruntime fp32 r4 batch 1" in report and "| batch 2 |" in report
