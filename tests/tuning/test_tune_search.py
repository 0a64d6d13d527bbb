"""The tuning search as logic: schedule families are ordered (none merges less than the one before),
bisection finds the same boundary as trying every schedule, the search probes far fewer schedules than there
are and in the same order every time, and the winner follows the documented rules."""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tome_export.tuning.measure import Evaluation
from tome_export.tuning.request import Budget
from tome_export.tuning.search import (Candidate, Shape, constant_family, decreasing_family, last_within,
                                       per_block_family, run_search)
from tome_export.tuning.select import choose

VIT_B = Shape(blocks=12, tokens=197, protected=1)
DIGITS = Shape(blocks=4, tokens=65, protected=1)


@pytest.mark.parametrize("shape", [VIT_B, DIGITS])
def test_families_never_merge_less_along_the_family(shape):
    """Distinct schedules, none merging fewer tokens in total than the one before (where the caps bind, a
    larger r can move merges between blocks at the same total: on the 4-block digits model r=17 merges
    17, 17, 15, 7 and r=16 merges 16, 16, 16, 8)."""
    families = [constant_family(shape), decreasing_family(shape), per_block_family(shape, 5)]
    for family in families:
        assert family[0].blocks == tuple([5] * shape.blocks) or not family[0].merges
        for before, after in zip(family, family[1:]):
            assert before.blocks != after.blocks
            assert after.merges >= before.merges


@given(count=st.integers(1, 40), boundary=st.integers(0, 39), high_first=st.booleans())
def test_bisection_finds_the_last_schedule_within(count, boundary, high_first):
    boundary = min(boundary, count - 1)
    probed: List[int] = []

    def within(i: int) -> bool:
        probed.append(i)
        return i <= boundary

    assert last_within(count, within, 0, count - 1, high_first=high_first) == boundary
    assert len(probed) <= count.bit_length() + 1


def _quality_by_merges(limit: int, int8_cost: int):
    """A deterministic stand-in for a measured budget check: within while a schedule merges at most ``limit``
    tokens in total (int8 spends ``int8_cost`` of them)."""
    probes: List[str] = []

    def probe(candidate: Candidate) -> bool:
        probes.append(candidate.key)
        cost = int8_cost if candidate.precision == "int8" else 0
        return candidate.schedule.merges + cost <= limit

    def screen(schedule) -> bool:
        probes.append(f"screen/{schedule.label}")
        return schedule.merges <= limit

    return probe, screen, probes


def test_search_is_bounded_and_repeatable():
    runs = []
    for _ in range(2):
        probe, screen, probes = _quality_by_merges(100, 10)
        result = run_search(VIT_B, ("fp32", "int8"), screen, probe)
        runs.append((probes, result.bounds))
    assert runs[0] == runs[1]
    probes, bounds = runs[0]
    every = len(constant_family(VIT_B)) + len(decreasing_family(VIT_B))
    assert len(probes) < every  # bisection, not every schedule of every family
    fp32 = bounds[("fp32", "constant")]
    assert fp32.merges <= 100 and constant_family(VIT_B)[constant_family(VIT_B).index(fp32) + 1].merges > 100
    assert bounds[("int8", "constant")].merges <= 90
    assert bounds[("fp32", "per-block")].merges >= fp32.merges


def _evaluation(key: str, merges: int, ips: float, within: bool, lost: int = 0) -> Evaluation:
    precision, r = key.split("/")
    family = constant_family(DIGITS)
    schedule = family[int(r[1:])] if merges else family[0]
    return Evaluation(Candidate(precision, schedule), {"lost_images": lost, "accuracy_drop_pts": lost / 4.49},
                      within, 1, 0.0, timing={"throughput_ips": ips, "median_ms": 1000.0 / ips})


def test_fastest_within_the_budget_wins_and_ties_go_to_quality():
    base = _evaluation("fp32/r0", 0, 100.0, True)
    fast_out = _evaluation("fp32/r9", 1, 300.0, False, lost=9)
    fast = _evaluation("fp32/r6", 1, 200.0, True, lost=3)
    close = _evaluation("fp32/r5", 1, 196.0, True, lost=1)
    budget = Budget(max_accuracy_drop=1.0)
    strict = choose([base, fast_out, fast, close], budget, ("fp32",), base, tie_tolerance=0.0)
    assert strict.winner is fast and strict.met_budget and strict.tome_paid
    tied = choose([base, fast_out, fast, close], budget, ("fp32",), base, tie_tolerance=0.03)
    assert tied.winner is close and set(tied.ties) == {"fp32/r6", "fp32/r5"}


def test_when_tome_loses_or_nothing_keeps_the_budget_it_says_so():
    base = _evaluation("fp32/r0", 0, 100.0, True)
    slower = _evaluation("fp32/r3", 1, 80.0, True)
    lost = choose([base, slower], Budget(max_accuracy_drop=1.0), ("fp32",), base, 0.0)
    assert lost.winner is base and not lost.tome_paid and "did not pay" in lost.tome_verdict
    outside = _evaluation("fp32/r3", 1, 80.0, False)
    base_out = _evaluation("fp32/r0", 0, 100.0, False)
    none = choose([base_out, outside], Budget(max_accuracy_drop=1.0), ("fp32",), base_out, 0.0)
    assert none.winner is base_out and not none.met_budget and "fp32 r=0" in none.reason
    latency = choose([base, slower], Budget(max_accuracy_drop=1.0, max_latency_ms=1.0), ("fp32",), base, 0.0)
    assert not latency.met_budget and latency.winner is base and "latency" in latency.reason


def test_tune_output_refuses_what_tome_export_did_not_write(tmp_path):
    from tome_export.errors import UserError
    from tome_export.tuning.request import check_output

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        check_output(foreign, force=True)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", force=False)
    check_output(tmp_path / "new", force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        check_output(tmp_path / "file", force=True)
