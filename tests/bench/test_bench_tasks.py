"""The benchmark's figures for the encoder tasks: feature cosines against fp32 r=0, nearest-neighbour agreement,
tokens kept, and on the digits case a real task figure (k-NN of embed, a linear probe on dense)."""

from __future__ import annotations

import numpy as np
import pytest

from tome_export.bench.config import parse_config
from tome_export.bench.tasks import TaskProbe, nearest_neighbours, task_fidelity
from tome_export.errors import UserError
from tome_export.tasks import Task


def test_embed_figures_count_images_that_keep_their_nearest_neighbour():
    reference = np.array([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    assert nearest_neighbours(reference).tolist() == [1, 0, 3, 2]
    candidate = reference.copy()
    candidate[1] = [0.2, 0.8]  # image 1 now sits with images 2 and 3
    figures = task_fidelity("embed", {"embeddings": reference}, {"embeddings": candidate})
    assert figures["nn_agreement"] == pytest.approx(3 / 4)  # image 1 now finds image 3, the others keep theirs
    assert figures["cosine"] == pytest.approx((3 + (0.18 + 0.08) / np.hypot(0.9, 0.1) / np.hypot(0.2, 0.8)) / 4)


def test_dense_and_tokens_figures():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((3, 16, 8))
    dense = task_fidelity("dense", {"features": features}, {"features": features * 2})
    assert dense["cosine"] == pytest.approx(1.0) and dense["images"] == 3
    tokens = {"tokens": rng.standard_normal((2, 4, 8)), "token_sizes": np.array([[1, 5, 5, 5], [4, 4, 4, 4]]),
              "token_owners": np.zeros((2, 16), np.int64)}
    full = {"tokens": rng.standard_normal((2, 16, 8)), "token_sizes": np.ones((2, 16), np.int64),
            "token_owners": np.tile(np.arange(16), (2, 1))}
    figures = task_fidelity("tokens", full, tokens)
    assert (figures["kept"], figures["tokens_kept"], figures["patches"]) == ("16 -> 4", 4, 16)
    assert task_fidelity("tokens", tokens, tokens)["cosine"] == pytest.approx(1.0)


@pytest.mark.parametrize("task", ["embed", "dense"])
def test_probes_fitted_on_the_reference_classify_what_it_separates(task):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    centres = rng.standard_normal((3, 4, 6)) * 3
    x = centres[labels] + 0.3 * rng.standard_normal((60, 4, 6))
    name = "embeddings" if task == "embed" else "features"
    outputs = {name: x if task == "dense" else x.reshape(60, -1)}
    probe = TaskProbe(task, {k: v[::2] for k, v in outputs.items()}, labels[::2])
    assert probe.accuracy({k: v[1::2] for k, v in outputs.items()}, labels[1::2])["top1"] == 1.0
    noise = {k: rng.standard_normal(v[1::2].shape) for k, v in outputs.items()}
    assert probe.accuracy(noise, labels[1::2])["top1"] < 0.7


def test_a_config_names_a_model_task_and_its_options():
    config = parse_config({"models": [{"model": "vit_t16", "task": {"name": "tokens", "layer": -2}},
                                      {"model": "vit_t16", "task": "embed"}, "vit_t16"]})
    tasks = [m.task for m in config.models]
    assert tasks == [Task("tokens", layer=-2), Task("embed"), Task()]
    keys = [m.key for m in config.models]
    assert keys[0].startswith("vit_t16-tokens-") and keys[1].startswith("vit_t16-embed-") and len(set(keys)) == 3
    assert config.to_dict()["models"][0]["task"]["layer"] == -2 and "task" not in config.to_dict()["models"][2]
    with pytest.raises(UserError, match=r"models\[0\].task: --normalize applies to --task embed"):
        parse_config({"models": [{"model": "vit_t16", "task": {"name": "dense", "normalize": True}}]})
    with pytest.raises(UserError, match="unknown key 'grid'"):
        parse_config({"models": [{"model": "vit_t16", "task": {"name": "dense", "grid": True}}]})


@pytest.mark.slow
def test_digits_case_reports_task_figures_for_embed_and_dense(small_digits, tmp_path, monkeypatch):
    from tome_export.bench.harness import run_bench

    monkeypatch.setenv("XDG_CACHE_HOME", str(small_digits.xdg))  # the session's trained checkpoint
    model = {"model": "digits_vit", "train": small_digits.training, "kwargs": small_digits.model_kwargs}
    config = parse_config({"name": "digits-tasks", "models": [{**model, "task": "embed"}, {**model, "task": "dense"}],
                           "r": [0, 8], "backends": ["torch", "onnx"], "batches": [16], "threads": [1],
                           "timing": {"warmup": 1, "rounds": 1, "per_round": 1, "pause_s": 0.0}, "memory": False})
    result = run_bench(config, tmp_path / "out")
    assert result.measured == 8 and result.failed == 0
    res = result.results
    for key, model_record in res["models"].items():
        task = model_record["task"]["name"]
        reference = model_record["reference_accuracy"]
        assert reference["images"] == 449 and reference["top1"] > 0.5, key  # k-NN / probe on fp32 r=0 outputs
        assert ("NN" in reference["method"]) == (task == "embed")
    for vid, q in res["variants"].items():
        fid = q["fidelity"]
        assert fid["task"] in ("embed", "dense") and q["accuracy"]["images"] == 449
        assert q["accuracy_drop"] == pytest.approx(
            res["models"][vid.split("/")[0]]["reference_accuracy"]["top1"] - q["accuracy"]["top1"])
        if vid.endswith("/r0"):
            assert fid["cosine"] > 0.9999, vid  # r=0: the model without ToMe, in PyTorch or ONNX Runtime
        else:
            assert 0.5 < fid["cosine"] < 1.0, vid
        if fid["task"] == "embed":
            assert 0 <= fid["nn_agreement"] <= 1
    text = (tmp_path / "out" / "report.md").read_text()
    assert "task figure" in text and "nearest neighbour" in text and "worst patch" in text
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert rows[0].endswith("task,task_cosine,task_figure") and ",dense," in "\n".join(rows)
