"""The executor choice without a cluster: jobs in this process run in order and only when needed, a bench sweep is
planned into one job per timing group with work left, ratios are never taken across nodes, the report splits
per kind of node, and ``--cluster`` is checked before any work (one line, exit 2). The real cluster is tested in
test_bench_cluster.py."""

from __future__ import annotations

import sys

import pytest
import yaml

from tome_export.bench.config import cells, parse_config
from tome_export.bench.executors import Executor, Job, check_cluster
from tome_export.bench.jobs import node_key, plan_pair
from tome_export.bench.report import by_node_kind, derive, report
from tome_export.errors import UserError

CONFIG = {"name": "plan", "models": [{"model": "vit_t16"}], "r": [0, 8], "precisions": ["fp32"],
          "backends": ["onnxruntime"], "batches": [1, 8], "threads": [1, 2], "memory": False}


def _record(log, key):
    log.append(key)
    return key.upper()


def test_in_process_jobs_run_in_order_and_only_when_asked_for():
    log = []
    executor = Executor()
    jobs = [Job(k, _record, (log, k)) for k in ("a", "b", "c")]
    for job in jobs:
        executor.submit(job)
    assert log == [] and executor.pending() == 3 and executor.submitted("b") and executor.spare() == 0
    assert executor.result(jobs[1]).value == "B" and log == ["b"]  # run on demand, out of turn
    assert [(j.key, o.value) for j, o in executor.completed()] == [("a", "A"), ("c", "C")]
    assert log == ["b", "a", "c"] and executor.pending() == 0
    executor.submit(Job("d", _record, (log, "d")))  # a look-ahead never asked for costs nothing
    executor.close()
    assert log == ["b", "a", "c"]


def test_a_job_that_raises_in_process_raises_here():
    executor = Executor()
    with pytest.raises(ZeroDivisionError):
        executor.result(Job("x", divmod, (1, 0)))


def test_a_sweep_is_one_job_per_timing_group_with_work_left():
    config = parse_config(CONFIG)
    pair = cells(config)
    model = config.models[0]
    plan = plan_pair(config, model, "onnxruntime", pair, {}, {}, cache="/c", data=None, run_id="r", verbose=False)
    assert [(w.threads, w.batch) for w in plan.works] == [(1, 1), (1, 8), (2, 1), (2, 8)]
    assert all(len(w.cells) == 2 for w in plan.works) and plan.settled == []
    assert plan.works[0].quality_for == {v.id for v in {c.variant for c in pair}}  # the first job measures quality
    assert all(not w.quality_for for w in plan.works[1:])
    assert plan.follows == {w.key: plan.works[0].key for w in plan.works[1:]}  # one artifact serves every batch

    measured = {c.id: {"status": "measured"} for c in pair if c.batch == 1}
    variants = {v.id: {} for v in {c.variant for c in pair}}
    again = plan_pair(config, model, "onnxruntime", pair, measured, variants, cache="/c", data=None, run_id="r",
                      verbose=False)
    assert [(w.threads, w.batch) for w in again.works] == [(1, 8), (2, 8)]  # only the groups with cells missing
    assert sorted(c.id for c in again.settled) == sorted(measured)
    assert all(not w.quality_for and not w.previous for w in again.works)

    static = parse_config({**CONFIG, "build": {"dynamic_batch": False}})
    assert plan_pair(static, static.models[0], "onnxruntime", cells(static), {}, {}, cache="/c", data=None,
                     run_id="r", verbose=False).follows == {}  # nothing to share: groups go anywhere


def test_a_group_measured_before_but_missing_memory_gets_a_job_keeping_its_records():
    config = parse_config({**CONFIG, "memory": True, "threads": [1]})
    pair = cells(config)
    before = {c.id: {"status": "measured"} for c in pair}
    plan = plan_pair(config, config.models[0], "onnxruntime", pair, before, {v.id: {} for v in {c.variant for c in pair}},
                     cache="/c", data=None, run_id="r", verbose=False)
    assert len(plan.works) == 2 and all(w.previous == {c.id: before[c.id] for c in w.cells} for w in plan.works)


def _cell(cid, group, node, r, ips, batch=1):
    return {"id": cid, "variant": cid, "status": "measured", "model": "m", "model_name": "m", "backend": "onnxruntime",
            "target": "onnxruntime", "device": "cpu", "precision": "fp32", "r": r, "batch": batch, "threads": 1,
            "group": group, "node": node, "throughput_ips": ips, "median_ms": 1000 / ips, "p90_ms": 1.0,
            "p99_ms": 1.0, "runs": 4}


def test_ratios_are_never_taken_across_nodes():
    cells_ = {"a": _cell("a", "g", "n1", "r0", 10.0), "b": _cell("b", "g", "n2", "r8", 20.0)}
    derive(cells_)
    assert cells_["a"]["derived"]["speedup"] == 1.0
    assert cells_["b"]["derived"]["speedup"] is None  # same group name, other node: not a ratio anyone measured


def _results(nodes, cells_):
    return {"config": {"name": "x", "budget": {"top1_agreement": 0.99, "accuracy_drop": 0.01}, "threads": [1],
                       "batches": [1, 8], "precisions": ["fp32"], "r": ["r0", "r8"], "backends": ["onnxruntime"],
                       "build": {"dynamic_batch": True, "merge_impl": "auto"},
                       "timing": {"rounds": 2, "per_round": 2}},
            "environment": {"machine": {"cpu_model": "driver"}, "gpu": None, "versions": {}},
            "runs": [{"run_id": "r", "started_at": "t", "executor": {"kind": "ray", "cluster": "ray://h:1",
                                                                      "ray_version": "2", "nodes": [{}, {}]}}],
            "models": {}, "variants": {}, "nodes": nodes, "cells": cells_}


def test_the_report_keeps_each_kind_of_node_apart():
    epyc = {"host": "a", "cpu_model": "EPYC", "cpus": 2, "cpu_flags": ["avx2"], "versions": {"onnxruntime": "1"}}
    xeon = {"host": "b", "cpu_model": "Xeon", "cpus": 16, "cpu_flags": ["avx512f"], "versions": {"onnxruntime": "1"}}
    cells_ = {"a0": _cell("a0", "ga", "a", "r0", 10.0), "a8": _cell("a8", "ga", "a", "r8", 15.0),
              "b0": _cell("b0", "gb", "b", "r0", 100.0, 8), "b8": _cell("b8", "gb", "b", "r8", 120.0, 8)}
    derive(cells_)
    results = _results({"a": epyc, "b": xeon}, cells_)
    parts = by_node_kind(results, list(cells_.values()))
    assert [sorted(c["id"] for c in members) for _, members in parts] == [["a0", "a8"], ["b0", "b8"]]
    text = report(results)
    assert "## Timed on EPYC, 2 logical CPUs" in text and "## Timed on Xeon, 16 logical CPUs" in text
    assert "- Node `a` (1 timing group(s))" in text and "- Executor: Ray 2 at `ray://h:1`" in text
    epyc_part = text.split("## Timed on EPYC")[1].split("## Timed on Xeon")[0]
    assert "1.50x" in epyc_part and "1.20x" not in epyc_part  # each section holds its own node's numbers

    alike = _results({"a": epyc, "c": {**epyc, "host": "c"}}, {k: {**v, "node": "c" if k.startswith("b") else "a"}
                                                               for k, v in cells_.items()})
    assert len(by_node_kind(alike, list(alike["cells"].values()))) == 1  # two nodes of one kind: one report
    assert "Timed on" not in report(alike) and "| node |" in report(alike)


def test_node_keys_name_the_ray_node():
    assert node_key({"host": "h", "ray_node_id": "0123456789abcdef"}) == "h:01234567"
    assert node_key({"host": "h"}) == "h"


def test_cluster_values_are_checked_before_any_work():
    check_cluster(None)
    for good in ("ray", "auto", "ray://head:10001", "10.0.0.1:6379"):
        check_cluster(good)
    with pytest.raises(UserError, match="--cluster 'laptop'"):
        check_cluster("laptop")


def test_without_ray_the_flag_says_what_to_install(tmp_path, monkeypatch, capsys):
    from tome_export.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: `import ray` fails
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "out"), "--cluster", "ray"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tome-export[cluster]'" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written
