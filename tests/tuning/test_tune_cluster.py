"""``tome-export tune`` with ``--cluster`` on a real two-node Ray cluster on this machine (``ray_cluster``): the same
probes, quality figures and winner as in this process on the small digits model; the candidates timed together on
one node; the winner written here from a build made again on this machine, whose files have the sha256 of the build
that was measured. Timings here are contended and meaningless: a tie tolerance of 50% makes the winner the best
quality among candidates of similar speed, so it follows from the (deterministic) quality figures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tome_export.manifest import load_manifest
from tome_export.runtime import load
from tome_export.tuning import TimingSettings, tune

from tome_testing.digits import SMALL_DIGITS

pytestmark = pytest.mark.slow

QUICK_TIMING = {"warmup": 1, "rounds": 2, "per_round": 3, "pause_s": 0.0}
DRIVER = """
import json, sys
from tome_export.tuning import TimingSettings, tune
args = json.loads(sys.argv[1])
tune(**args["fields"], timing=TimingSettings(**args["timing"]), cluster=args["cluster"],
     log=lambda msg: print(msg, file=sys.stderr, flush=True))
"""


def _fields(small, out):
    return {"model": "digits_vit", "target": "onnxruntime", "max_accuracy_drop": 1.0, "data": "digits",
            "checkpoint": str(small.path), "model_kwargs": SMALL_DIGITS, "precisions": ["fp32"],
            "tie_tolerance": 0.5, "time_budget_min": 60.0, "threads": 1, "output": str(out)}


@pytest.fixture(scope="module")
def in_process(small_digits, tmp_path_factory):
    """The workers' default cache is where the in-process run builds: the cluster finds the candidates built."""
    out = tmp_path_factory.mktemp("tune-here") / "out"
    cache = small_digits.xdg / "tome-export" / "tune"
    tune(**_fields(small_digits, out), cache=cache, timing=TimingSettings(**QUICK_TIMING))
    return load_manifest(out).section("tune"), out


@pytest.fixture(scope="module")
def on_cluster(ray_cluster, small_digits, in_process, tmp_path_factory):
    """The driver's own cache is empty (another XDG_CACHE_HOME), but both nodes run on this machine: the winner's
    measured files are found where the worker built them and shipped as they are."""
    root = tmp_path_factory.mktemp("tune-cluster")
    out = root / "out"
    args = {"fields": _fields(small_digits, out), "timing": QUICK_TIMING, "cluster": ray_cluster.client}
    env = {**ray_cluster.env, "XDG_CACHE_HOME": str(root / "driver-cache")}
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_manifest(out).section("tune"), out, done.stderr


def _probes(section):
    return [(c["probe"], c["candidate"], c["status"], c["quality"]) for c in section["candidates"]]


def test_cluster_tune_finds_the_same_winner(in_process, on_cluster):
    here, cluster = in_process[0], on_cluster[0]
    assert _probes(cluster) == _probes(here)  # the same search, the same figures
    assert [s["r_schedule"] for s in cluster["search"]["screen"]] == [s["r_schedule"] for s in here["search"]["screen"]]
    timed = [c for c in cluster["candidates"] if "throughput_ips" in c["timing"]]
    assert len(timed) == len([c for c in cluster["candidates"] if c["status"] == "evaluated"]) > 1
    assert cluster["winner"]["candidate"] == here["winner"]["candidate"]
    assert cluster["met_budget"] and here["met_budget"]


def test_candidates_are_timed_together_on_one_node_and_the_winner_is_written_here(in_process, on_cluster):
    cluster, out, log = on_cluster
    assert cluster["environment"]["cluster"]["kind"] == "ray" and len(cluster["environment"]["cluster"]["nodes"]) == 2
    node = cluster["timing"]["node"]
    assert node["cpu_model"] and node["cpus"] > 0 and node["versions"]["onnxruntime"]
    assert cluster["timing"]["interleaved"] == len([c for c in cluster["candidates"] if c["status"] == "evaluated"])
    assert all(c["cached"] for c in cluster["candidates"] if c["status"] == "evaluated")  # built by the first run
    assert cluster["winner"]["files"] == "the build that was measured"  # same machine: no rebuild needed
    assert "built again here" not in log
    shipped = load_manifest(out)  # verifies every checksum
    original = load_manifest(in_process[1])
    assert {k: v["sha256"] for k, v in shipped.artifacts.items() if k.endswith(".onnx")} == \
           {k: v["sha256"] for k, v in original.artifacts.items() if k.endswith(".onnx")}
    runner = load(out, threads=1)
    try:
        assert runner(np.zeros((1, 3, 32, 32), "float32")).shape == (1, 10)
    finally:
        runner.close()
    assert "- Cluster: Ray at" in (out / "tune.md").read_text()
