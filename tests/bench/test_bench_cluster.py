"""``tome-export bench --cluster`` on a real two-node Ray cluster on this machine (``ray_cluster``): the same cells,
fidelity and accuracy as in this process (timings aside), every timing group on one node that records itself, a
worker killed in the middle of a group survived by Ray's retry, and an interrupted run (SIGINT) that leaves a
consistent results file and resumes with only the missing cells. Timings here are contended and meaningless."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tome_export.cli import main

from tome_testing.digits import SMALL_DIGITS, SMALL_TRAINING

pytestmark = pytest.mark.slow

# Two backends (both run by ONNX Runtime: the cheapest builds), so that the first groups of each run side by side on
# the two nodes; one artifact per variant serves both batch sizes, so each backend's second group follows its first
# onto its node.
CONFIG = {
    "name": "cluster",
    "models": [{"model": "digits_vit", "kwargs": SMALL_DIGITS, "train": SMALL_TRAINING}],
    "r": [0, 8],
    "precisions": ["fp32"],
    "backends": ["onnx", "onnxruntime"],
    "batches": [1, 2],
    "threads": [1],
    "timing": {"warmup": 1, "rounds": 2, "per_round": 2, "pause_s": 0.0},
    "memory": False,
    "quality": {"images": 2, "decision_images": 4},
}
CELLS = 2 * 2 * 2  # r x backends x batches
RUN_TIMEOUT_S = 1800
EXE = Path(sys.executable).parent / "tome-export"


def _bench(cluster, *args) -> subprocess.Popen:
    return subprocess.Popen([str(EXE), "bench", *map(str, args)], env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster-config") / "cluster.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def in_process(config_file, small_digits, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(small_digits.xdg))
    out = tmp_path_factory.mktemp("in-process") / "out"
    try:
        assert main(["bench", "--config", str(config_file), "--out", str(out), "--quiet"]) == 0
    finally:
        mp.undo()
    return _results(out)


@pytest.fixture(scope="module")
def on_cluster(ray_cluster, config_file, tmp_path_factory):
    """The config on the cluster through Ray Client; once a group's job is running, its worker is killed."""
    out = tmp_path_factory.mktemp("on-cluster") / "out"
    run = _bench(ray_cluster, "--config", config_file, "--out", out, "--cluster", ray_cluster.client)
    killed = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        running = ray_cluster.workers_running("group ")
        if running:
            killed = running[0]
            subprocess.run(["kill", "-9", str(killed)], check=True)
        time.sleep(0.2)
    output, _ = run.communicate(timeout=RUN_TIMEOUT_S)
    assert run.returncode == 0, output[-3000:]
    return _results(out), killed, output, out


def test_cluster_gives_the_same_cells_fidelity_and_accuracy(in_process, on_cluster):
    ray_results = on_cluster[0]
    assert list(ray_results["cells"]) == list(in_process["cells"])
    assert [c["status"] for c in ray_results["cells"].values()] == ["measured"] * CELLS
    assert [c["status"] for c in in_process["cells"].values()] == ["measured"] * CELLS
    assert set(ray_results["variants"]) == set(in_process["variants"]) and len(in_process["variants"]) == 4
    for vid, mine in in_process["variants"].items():
        theirs = ray_results["variants"][vid]
        assert theirs["accuracy"] == mine["accuracy"] and theirs["accuracy_drop"] == mine["accuracy_drop"]
        assert theirs["fidelity"]["top1_agreement"] == mine["fidelity"]["top1_agreement"]
        assert theirs["fidelity"]["mean_cosine"] == pytest.approx(mine["fidelity"]["mean_cosine"], abs=1e-6)
        assert theirs["merge_decisions"].get("agreement") == mine["merge_decisions"].get("agreement")
    assert ray_results["models"].keys() == in_process["models"].keys()
    for key, model in in_process["models"].items():
        assert ray_results["models"][key]["reference_accuracy"] == model["reference_accuracy"]
    for key in ("tokens_per_block", "flops", "r_schedule"):
        assert [c[key] for c in ray_results["cells"].values()] == [c[key] for c in in_process["cells"].values()]


def test_every_timing_group_ran_on_one_node_that_records_itself(on_cluster):
    results, _, _, out = on_cluster
    run = results["runs"][-1]
    assert run["executor"]["kind"] == "ray" and len(run["executor"]["nodes"]) == 2
    groups = {}
    for c in results["cells"].values():
        groups.setdefault(c["group"], set()).add(c["node"])
        node = results["nodes"][c["node"]]
        assert node["cpus"] > 0 and node["cpu_model"] and node["versions"]["onnxruntime"] and node["host"]
        assert node["ray_node_id"].startswith(c["node"].split(":")[1])
    assert len(groups) == 4 and all(len(nodes) == 1 for nodes in groups.values())
    for backend in ("onnx", "onnxruntime"):  # the second group followed the first onto its node
        assert len({c["node"] for c in results["cells"].values() if c["backend"] == backend}) == 1
    report = (out / "report.md").read_text()
    assert "- Executor: Ray" in report and report.count("- Node `") == len(results["nodes"])
    for c in results["cells"].values():  # ratios only within a group, which never spans nodes
        base = next(b for b in results["cells"].values() if b["group"] == c["group"] and b["r"] == "r0")
        assert c["derived"]["speedup"] == c["throughput_ips"] / base["throughput_ips"]


def test_a_worker_killed_in_the_middle_of_a_group_is_survived(on_cluster):
    results, killed, output, _ = on_cluster
    assert killed is not None, "no group job was seen running"
    assert all(c["status"] == "measured" for c in results["cells"].values())
    assert results["runs"][-1]["counts"] == {"measured": CELLS, "resumed": 0, "skipped": 0, "failed": 0}
    assert f"cells: {CELLS} measured, 0 resumed, 0 skipped, 0 failed" in output


def test_an_interrupted_run_is_consistent_and_resumes_with_the_missing_cells(ray_cluster, config_file, on_cluster,
                                                                           tmp_path):
    _, _, _, cached = on_cluster
    slow = {**CONFIG, "timing": {**CONFIG["timing"], "pause_s": 1.0}}  # groups long enough to interrupt
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(slow))
    out = tmp_path / "out"
    args = ("--config", config, "--out", out, "--cache", cached / "artifacts", "--cluster", ray_cluster.address)
    run = _bench(ray_cluster, *args)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and run.poll() is None:
        if (out / "results.json").is_file() and _results(out)["cells"]:
            break
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 130, output[-3000:]
    assert "interrupted; finished groups are saved" in output
    saved = _results(out)  # valid JSON, and only whole groups
    done = saved["cells"]
    assert 0 < len(done) < CELLS
    assert all(c["status"] == "measured" and c["throughput_ips"] > 0 for c in done.values())
    for group in {c["group"] for c in done.values()}:
        assert sum(c["group"] == group for c in done.values()) == 2  # r0 and r8

    again = _bench(ray_cluster, *args)
    output, _ = again.communicate(timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, output[-3000:]
    assert f"cells: {CELLS - len(done)} measured, {len(done)} resumed, 0 skipped, 0 failed" in output
    final = _results(out)
    for cid, record in done.items():  # kept as they were (the ratios are derived again for the report)
        assert {k: v for k, v in final["cells"][cid].items() if k != "derived"} == record
