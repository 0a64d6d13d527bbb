"""The self-check's pieces without a build: which rows it runs, how it measures them, what keys its cache."""

import numpy as np
import pytest

from tome_export.manifest import InputSpec, Manifest
from tome_export.runtime import machine, selfcheck


def test_run_plan_follows_the_artifacts_batch():
    assert selfcheck.run_plan(4, 1) == [[0], [1], [2], [3]]
    assert selfcheck.run_plan(4, 8) == [[0, 1, 2, 3, 0, 1, 2, 3]]  # a static batch filled from the views in turn
    assert selfcheck.run_plan(4, 3) == [[0, 1, 2], [3, 0, 1]]
    assert selfcheck.run_plan(4, None) == [[0], [1], [2], [3], [0, 1, 2, 3]]  # dynamic: alone, then together


def test_row_metrics_count_a_view_as_agreeing_only_if_every_row_does():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(4, 10))
    ids = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    candidate = reference[ids] + 1e-3
    flipped = candidate.copy()
    flipped[5] = -reference[1]  # view 1 computes something else in its second row only
    clean = selfcheck.row_metrics(reference, candidate, ids)
    assert clean["top1_agreement"] == 1.0 and clean["max_abs_diff"] == pytest.approx(1e-3)
    assert clean["min_cosine"] > 0.9999 and clean["views"] == 4 and clean["runs"] == 8
    broken = selfcheck.row_metrics(reference, flipped, ids)
    assert broken["top1_agreement"] == 0.75 and broken["min_cosine"] == pytest.approx(-1.0)
    assert broken["row_agrees"] == [True] * 5 + [False] + [True] * 2
    missed = selfcheck.misses(broken, {"min_cosine": 0.99, "min_top1_agreement": 0.75, "max_abs_diff": 100.0})
    assert missed == ["min_cosine -1 (must be at least 0.99)"]
    assert selfcheck.misses(clean, {"min_cosine": 0.99, "max_abs_diff": 1e-4}) == [
        "max_abs_diff 0.001 (must be at most 0.0001)"]


def test_isa_limits_are_part_of_the_cpu_description(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = machine.cpu_description()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    limited = machine.cpu_description()
    assert plain["isa_limits"] == {} and limited["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "SSE41"}
    assert limited["flags"] == plain["flags"]
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith(("flags", "Features"))).split(":", 1)[1].split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert plain["flags"] == sorted(set(flags))
    assert "ONEDNN_MAX_CPU_ISA=SSE41" in machine.describe_cpu(limited)


def _manifest(digest: str) -> Manifest:
    return Manifest(target="onnxruntime", precision="fp32", input=InputSpec("images", (1, 3, 32, 32)),
                    preprocessing={}, digest=digest)


def test_cache_key_changes_with_the_isa_the_versions_and_the_artifact(monkeypatch):
    env = {"runner": "r", "versions": {"openvino": "2026.4.1"}, "cpu": machine.cpu_description(), "device": None}
    key = selfcheck.environment_key(_manifest("a"), env)
    assert key == selfcheck.environment_key(_manifest("a"), dict(env))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX")
    limited = {**env, "cpu": machine.cpu_description()}
    assert selfcheck.environment_key(_manifest("a"), limited) != key
    assert selfcheck.environment_key(_manifest("a"), {**env, "versions": {"openvino": "2026.5.0"}}) != key
    assert selfcheck.environment_key(_manifest("b"), env) != key


def test_cache_folder_follows_the_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("TOME_EXPORT_CACHE", str(tmp_path / "c"))
    assert selfcheck.cache_folder() == tmp_path / "c" / "self-check"
    monkeypatch.delenv("TOME_EXPORT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert selfcheck.cache_folder() == tmp_path / "x" / "tome-export" / "self-check"


@pytest.mark.parametrize("value,skipped", [("0", True), ("off", True), ("1", False), ("", False)])
def test_the_skip_variable(monkeypatch, value, skipped):
    monkeypatch.setenv(selfcheck.SKIP_VARIABLE, value)
    assert selfcheck.skipped_by_environment() is skipped
