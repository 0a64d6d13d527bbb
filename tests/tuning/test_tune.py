"""``tome-export tune`` on the small digits ViT: the shipped artifact keeps the accuracy budget when measured again
through ``runtime.load``, no candidate within the budget was faster in the same measurement, a zero budget ships
fp32 r=0 or a build that loses no image, and the search tries the same candidates for the same seed. Timings here
are contended and meaningless; the tests check how the winner follows from what was measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tome_export.bench.digits import load_digits_split
from tome_export.cli import main
from tome_export.manifest import load_manifest
from tome_export.models import create_model
from tome_export.runtime import load
from tome_export.tuning import TimingSettings, tune

from tome_testing.digits import SMALL_DIGITS, SMALL_TRAINING

QUICK_TIMING = TimingSettings(warmup=1, rounds=2, per_round=3, pause_s=0.0)


@pytest.fixture(scope="module")
def digits_env(small_digits, tmp_path_factory):
    """Where the small digits model is cached, and one candidate cache shared by every run of this module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(small_digits.xdg))
    yield small_digits, tmp_path_factory.mktemp("tune-cache")
    mp.undo()


def _tune(env, out, budget: float, **extra):
    small, cache = env
    fields = dict(model="digits_vit", target="openvino", max_accuracy_drop=budget, data="digits", output=out,
                  model_kwargs=SMALL_DIGITS, train=SMALL_TRAINING, precisions=("fp32", "int8"), cache=cache,
                  tie_tolerance=0.0, timing=QUICK_TIMING, time_budget_min=10.0, threads=1)
    return tune(**{**fields, **extra})


@pytest.fixture(scope="module")
def one_point(digits_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "out"
    return out, _tune(digits_env, out, 1.0)


def _reference_and_shipped(small, out):
    """fp32 r=0 eager logits and the shipped artifact's logits on the held-out split, measured here again."""
    split = load_digits_split(SMALL_TRAINING["seed"])
    model, _ = create_model("digits_vit", checkpoint=small.path, **SMALL_DIGITS)
    with torch.inference_mode():
        reference = model(torch.from_numpy(split.test_x)).numpy()
    runner = load(out, threads=1)
    try:
        batch = runner.batch_size or len(split.test_x)
        chunks = []
        for i in range(0, len(split.test_x), batch):
            x = split.test_x[i:i + batch]
            padded = np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)]) if len(x) < batch else x
            chunks.append(np.asarray(runner(np.ascontiguousarray(padded)))[:len(x)])
    finally:
        runner.close()
    return reference, np.concatenate(chunks), split.test_y


def _lost_points(reference, logits, labels) -> float:
    ref_ok, ok = reference.argmax(1) == labels, logits.argmax(1) == labels
    return 100.0 * float((ref_ok & ~ok).sum()) / len(labels)


def test_one_point_budget_ships_the_fastest_candidate_within_it(digits_env, one_point):
    small, _ = digits_env
    out, result = one_point
    section = result.section
    assert result.met_budget and section["met_budget"]
    manifest = load_manifest(out)  # verifies every checksum, tune.md and the plot included
    assert manifest.section("tune") == json.loads(json.dumps(section))
    assert (out / "tune.md").is_file() and (out / "tune-pareto.png").stat().st_size > 0
    winner = section["winner"]
    assert [manifest.precision, list(manifest.r_schedule)] == [winner["precision"], winner["r_schedule"]]

    reference, shipped, labels = _reference_and_shipped(small, out)
    lost = _lost_points(reference, shipped, labels)
    assert lost <= 1.0
    drop = 100.0 * float((reference.argmax(1) == labels).mean() - (shipped.argmax(1) == labels).mean())
    assert drop <= 1.0
    assert abs(lost - winner["quality"]["lost_pts"]) < 1e-9  # the report's figure is what the artifact does

    timed = [c for c in section["candidates"] if "throughput_ips" in c["timing"]]
    within = [c for c in timed if c["within_budget"]]
    assert winner["candidate"] in [c["candidate"] for c in within]
    best = max(c["timing"]["throughput_ips"] for c in within)
    assert winner["timing"]["throughput_ips"] == best  # tie tolerance 0: the fastest within the budget wins
    for c in section["candidates"]:
        if c["status"] == "evaluated":
            assert c["within_budget"] == (c["quality"]["lost_pts"] <= 1.0)
    assert any(c["candidate"] == "fp32/r0" for c in timed)  # ToMe is always compared with not merging


def test_search_is_deterministic_for_a_seed_and_reuses_builds(digits_env, one_point, tmp_path):
    _, first = one_point
    again = _tune(digits_env, tmp_path / "again", 1.0)
    tried = lambda s: [(c["probe"], c["candidate"], c["quality"].get("lost_images")) for c in s["candidates"]]
    screened = lambda s: [(x["probe"], x["r_schedule"], x["quality"]["lost_images"]) for x in s["search"]["screen"]]
    assert tried(again.section) == tried(first.section)
    assert screened(again.section) == screened(first.section)
    assert all(c["cached"] for c in again.section["candidates"] if c["status"] == "evaluated")


def test_zero_budget_ships_r0_fp32_or_a_build_that_loses_no_image(digits_env, tmp_path):
    small, _ = digits_env
    out = tmp_path / "zero"
    result = _tune(digits_env, out, 0.0, precisions=("fp32",))
    winner = result.section["winner"]
    assert result.met_budget  # fp32 r=0 itself always keeps a zero budget
    reference, shipped, labels = _reference_and_shipped(small, out)
    if winner["candidate"] != "fp32/r0":
        assert _lost_points(reference, shipped, labels) == 0.0
    else:
        assert np.abs(reference - shipped).max() < 1e-3  # the unmodified model, as built and validated


BAD = [
    (["--target", "openvino", "--output", "o"], "give exactly one budget"),
    (["--target", "openvino", "--min-agreement", "0.9", "--max-accuracy-drop", "1", "--data", "digits",
      "--output", "o"], "give exactly one budget"),
    (["--target", "openvino", "--max-accuracy-drop", "1", "--output", "o"], "--data"),
    (["--target", "openvino", "--max-accuracy-drop", "-1", "--data", "digits", "--output", "o"], "out of range"),
    (["--target", "openvino", "--min-agreement", "1.5", "--output", "o"], "out of range"),
    (["--target", "openvino", "--min-agreement", "0.9", "--time-budget", "0", "--output", "o"], "--time-budget"),
    (["--target", "openvino", "--min-agreement", "0.9", "--precisions", "fp64", "--output", "o"], "fp64"),
    (["--target", "nosuch", "--min-agreement", "0.9", "--output", "o"], "nosuch"),
    (["--target", "openvino", "--min-agreement", "0.9", "--batch", "0", "--output", "o"], "--batch"),
]


@pytest.mark.parametrize("args,needle", BAD)
def test_bad_budgets_and_targets_are_one_line_exit_2(args, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--model", "digits_vit", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,needle", [
    (["--model", "vit_t16", "--max-accuracy-drop", "1", "--data", "digits"], "--data digits"),
    (["--model", "vit_t16", "--weights", "random", "--max-accuracy-drop", "1", "--data", "."], "random weights"),
    (["--model", "vit_t16", "--max-accuracy-drop", "1", "--data", "no/such/dir"], "not a directory"),
    (["--model", "vit_t16", "--min-agreement", "0.9", "--data", "digits"], "--data measures accuracy"),
])
def test_accuracy_budgets_need_labelled_images_and_real_weights(args, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--target", "openvino", *args, "--output", "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_a_gpu_target_without_a_gpu_is_refused(tmp_path, monkeypatch, capsys):
    from tome_export.devices import gpu_available

    if gpu_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--model", "vit_t16", "--weights", "random", "--target", "tensorrt", "--min-agreement",
                 "0.9", "--output", "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("GPU" in err or "not installed" in err), err
