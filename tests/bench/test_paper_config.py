"""benchmarks/paper_imagenet.yaml: it parses, it asks for the paper's checkpoints at the paper's r, its published
numbers are those of tome_export.models.paper, and per-model r / prop_attn reach the harness."""

import json
from pathlib import Path

import pytest
import yaml

from tome_export.bench.config import load_config, parse_config
from tome_export.bench.harness import run_bench
from tome_export.bench.config import variants
from tome_export.models import resolve
from tome_export.models.paper import PAPER_CHECKPOINTS

CONFIG = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_imagenet.yaml"


@pytest.fixture
def paper_config(tmp_path, monkeypatch):
    """The config as a user runs it: from a directory holding the downloaded checkpoints (empty stand-ins here)."""
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(CONFIG.read_text())
    for entry in data["models"]:
        if "checkpoint" in entry:
            Path(entry["checkpoint"]).parent.mkdir(exist_ok=True)
            Path(entry["checkpoint"]).write_bytes(b"")
    return load_config(CONFIG)


def test_paper_config_runs_each_checkpoint_at_the_papers_r(paper_config):
    cfg = paper_config
    assert cfg.max_images == 0 and cfg.precisions == ("fp32",)
    by_entry = {}
    for m in cfg.models:
        by_entry.setdefault((m.model, m.checkpoint is not None), m)
    for paper in PAPER_CHECKPOINTS:
        m = by_entry[(paper.model, paper.checkpoint_url is not None)]
        published = dict(m.published)
        assert m.prop_attn == paper.prop_attn and m.r == (0, paper.r), paper.label
        assert published["top1"] == paper.tome_top1 and published["r"] == paper.r, paper.label
        if paper.checkpoint_url:
            assert Path(m.checkpoint).name == paper.checkpoint_url.rsplit("/", 1)[1]
            if paper.model.startswith("deit"):  # the baseline is the published DeiT, a separate entry at r=0
                baseline = by_entry[(paper.model, False)]
                assert baseline.r == (0,) and dict(baseline.published)["baseline_top1"] == paper.baseline_top1
                continue
        assert published["baseline_top1"] == paper.baseline_top1, paper.label
        assert resolve(m.model).name in paper.weights or paper.weights.startswith("facebookresearch/mae")
    assert {v.r_label for v in variants(cfg) if v.model.model == "vit_b16"} == {"r0", "r13"}


def test_per_model_r_and_prop_attn_reach_the_patched_model(tmp_path, monkeypatch):
    from tome_export.bench import subjects

    seen = []
    real_patch = subjects.patch
    monkeypatch.setattr(subjects, "patch", lambda model, r, **kw: seen.append((r, kw)) or real_patch(model, r, **kw))
    config = parse_config({
        "name": "per_model",
        "models": [{"model": "vit_t16", "weights": "random", "kwargs": {"depth": 2}, "r": [4], "prop_attn": False,
                    "published": {"top1": 1.0}}],
        "r": [8], "backends": ["torch"], "batches": [1], "threads": [1], "memory": False,
        "timing": {"warmup": 0, "rounds": 1, "per_round": 1, "pause_s": 0.0},
        "quality": {"images": 2, "decision_images": 2},
    })
    (model,) = config.models
    assert [v.r_label for v in variants(config)] == ["r0", "r4"]
    assert model.key != parse_config({"models": [{"model": "vit_t16", "kwargs": {"depth": 2}}]}).models[0].key
    result = run_bench(config, tmp_path / "out", progress=False)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    info = results["models"][model.key]
    assert "no proportional attention" in info["description"] and info["published"] == {"top1": 1.0}
    assert result.measured == 2 and "published: top1 1.0" in (tmp_path / "out" / "report.md").read_text()
    assert {r for r, _ in seen} == {0, 4} and all(kw == {"prop_attn": False} for r, kw in seen if r == 4)
