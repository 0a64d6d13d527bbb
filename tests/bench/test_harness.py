"""The benchmark harness end to end on tiny matrices: outputs, ratios recomputed from raw records, skip reasons,
resume, the embedded accuracy case and ImageFolder accuracy. Timings here are contended and meaningless; the
tests check that every number is computed from what was measured."""

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from tome_export.bench import quality
from tome_export.bench.config import load_config, parse_config
from tome_export.bench.harness import run_bench
from tome_export.bench.matrix import backends, skip_reason
from tome_export.bench.report import _losses, derive
from tome_export.cli import main
from tome_export.devices import gpu_available
from tome_export.errors import UserError
from tome_export.quality.decisions import merge_decision_agreement

TINY = {
    "name": "tiny",
    "models": [{"model": "digits_vit", "weights": "random", "seed": 0}],  # 4 blocks at 32 px: 65 tokens
    "r": [0, 8],
    # int8: eager PyTorch's dynamic quantization, the cheapest second precision on any CPU (bf16 is emulated on
    # CPUs without bf16 instructions); the onnx target has no int8: those cells are skipped with a reason
    "precisions": ["fp32", "int8"],
    "backends": ["torch", "onnx", "tensorrt"],  # no GPU here: tensorrt is skipped with a reason
    "batches": [1, 2],
    "threads": [1],
    "timing": {"warmup": 1, "rounds": 2, "per_round": 2, "pause_s": 0.0},
    "memory": False,  # measured by MEMORY below: each variant and batch size costs a fresh interpreter
    "quality": {"images": 2, "decision_images": 2},
}
# Peak memory of one eager and one built variant (each in its own subprocess), on tiny_run's cached artifact.
MEMORY = {**TINY, "name": "memory", "r": [0], "precisions": ["fp32"], "backends": ["torch", "onnx"], "batches": [2],
          "memory": True}


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny digits_vit matrix, run once through the CLI."""
    root = tmp_path_factory.mktemp("bench")
    config = _write(root / "tiny.yaml", TINY)
    out = root / "out"
    assert main(["bench", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    return config, out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def memory_run(tiny_run, tmp_path_factory):
    """MEMORY, building nothing: its artifact is tiny_run's onnx r=0 build (one artifact serves every batch)."""
    _, tiny_out, _ = tiny_run
    out = tmp_path_factory.mktemp("memory") / "out"
    result = run_bench(parse_config(MEMORY), out, cache=tiny_out / "artifacts")
    return result, json.loads((out / "results.json").read_text())


def _measured(results):
    return [c for c in results["cells"].values() if c["status"] == "measured"]


def test_outputs_exist(tiny_run):
    _, out, results = tiny_run
    assert len(results["cells"]) == 2 * 3 * 2 * 2  # r x backends x precisions x batches
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["id"] for r in rows] == list(results["cells"])
    text = (out / "report.md").read_text()
    for section in ("Stacked speedup", "Throughput by batch size", "Fidelity and accuracy", "Best stack",
                    "Skipped and failed cells", "All measured cells"):
        assert section in text
    pngs = sorted((out / "plots").glob("*.png"))
    assert [p.name.split("-", 2)[-1] for p in pngs] == ["pareto.png", "speedup-bars.png", "throughput-vs-batch.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    env = results["environment"]
    assert env["machine"]["cpus"] and "torch" in env["versions"] and "onnxruntime" in env["versions"]
    assert not list(out.glob(".*.tmp")) and not list((out / "plots").glob(".*.tmp"))  # atomic writes left nothing


def test_speedups_are_ratios_of_the_measured_throughputs(tiny_run):
    _, _, results = tiny_run
    cells = _measured(results)
    assert len(cells) == 12  # torch fp32/int8 and onnx fp32, r 0/8, batch 1/2
    by_key = {(c["backend"], c["batch"], c["threads"], c["precision"], c["r"]): c for c in cells}
    stacked = 0
    for c in cells:
        group = (c["backend"], c["batch"], c["threads"])
        base, tome, prec = by_key[(*group, "fp32", "r0")], by_key[(*group, "fp32", c["r"])], by_key[(*group, c["precision"], "r0")]
        assert c["group"] == base["group"] == tome["group"] == prec["group"]  # timed side by side
        assert c["throughput_ips"] == pytest.approx(1000.0 * c["batch"] / c["median_ms"], rel=1e-3)
        d = c["derived"]
        assert d["speedup"] == c["throughput_ips"] / base["throughput_ips"]
        assert d["speedup_tome"] == tome["throughput_ips"] / base["throughput_ips"]
        assert d["speedup_precision"] == prec["throughput_ips"] / base["throughput_ips"]
        if c["r"] != "r0" and c["precision"] != "fp32":
            stacked += 1
            assert d["stacking_efficiency"] == pytest.approx(
                c["throughput_ips"] * base["throughput_ips"] / (tome["throughput_ips"] * prec["throughput_ips"]), rel=1e-12)
        else:
            assert d["stacking_efficiency"] is None
    assert stacked == 2  # torch int8 r8 at batch 1 and 2


def test_cells_hold_real_measurements(tiny_run):
    _, _, results = tiny_run
    for c in _measured(results):
        assert 0 < c["min_ms"] <= c["median_ms"] <= c["p90_ms"] <= c["p99_ms"]
        assert c["runs"] == 2 * 2 and c["timing"]["rounds"] == 2 and c["threads_ran"] == 1
        assert c["artifact"]["artifact_bytes"] > 1e6
        # tome_export.flops on 4 blocks of width 192 at 65 tokens: 122.1 MMAC at r=0, 89.6 at r=8 (57, 49, 41, 33)
        assert c["flops"]["ratio"] == (1.0 if c["r"] == "r0" else pytest.approx(1.363, abs=0.001))
        assert c["tokens_per_block"][-1] == (65 if c["r"] == "r0" else 65 - 4 * 8)
    onnx = [c for c in _measured(results) if c["backend"] == "onnx"]
    assert {c["artifact"]["artifact_dir"] for c in onnx if c["r"] == "r8"} == {onnx[-1]["artifact"]["artifact_dir"]}
    assert all(c["artifact"]["dynamic_batch"] for c in onnx)  # one artifact serves batch 1 and 2


def test_memory_is_measured_per_cell_in_a_fresh_process(tiny_run, memory_run):
    _, tiny_out, tiny = tiny_run
    result, results = memory_run
    assert all("memory" not in c for c in _measured(tiny))  # memory: false measures none
    assert (result.measured, result.failed) == (2, 0)
    for c in results["cells"].values():  # eager PyTorch and the onnx artifact at batch 2, each its own process
        assert c["memory"]["peak_rss_mb"] >= c["memory"]["loaded_rss_mb"] > c["memory"]["baseline_rss_mb"] > 0
        assert c["memory"]["method"].startswith("peak resident set size")
    onnx = next(c for c in results["cells"].values() if c["backend"] == "onnx")
    assert onnx["artifact"]["artifact_dir"].startswith(str(tiny_out / "artifacts"))  # the cached build, reused


def test_quality_against_fp32_pytorch(tiny_run):
    _, _, results = tiny_run
    variants = {k.split("/", 1)[1]: v for k, v in results["variants"].items()}
    assert variants["torch/fp32/r0"]["fidelity"]["top1_agreement"] == 1.0
    assert variants["torch/fp32/r0"]["fidelity"]["max_abs_diff"] == 0.0
    assert variants["onnx/fp32/r0"]["fidelity"]["min_cosine"] > 0.9999
    assert variants["torch/fp32/r8"]["merge_decisions"]["agreement"] == 1.0  # its own decisions
    assert variants["torch/int8/r8"]["merge_decisions"]["decisions"] == 4 * 2  # blocks x images
    assert variants["torch/fp32/r0"]["merge_decisions"]["agreement"] is None
    onnx_r8 = variants["onnx/fp32/r8"]["merge_decisions"]  # read from the graph's decision tensors
    assert onnx_r8["agreement"] == 1.0 and onnx_r8["pair_agreement"] == onnx_r8["group_agreement"] == 1.0


def test_skipped_cells_carry_reasons(tiny_run):
    _, _, results = tiny_run
    skipped = [c for c in results["cells"].values() if c["status"] != "measured"]
    assert len(skipped) == 12 and all(c["status"] == "skipped" and c["reason"] for c in skipped)
    onnx_int8 = {c["reason"] for c in skipped if c["backend"] == "onnx"}
    assert onnx_int8 == {"target onnx offers fp32, not int8"}
    tensorrt = {c["reason"] for c in skipped if c["backend"] == "tensorrt"}
    if not gpu_available():
        assert len(tensorrt) == 1 and "needs an NVIDIA GPU" in tensorrt.pop()


def test_resume_measures_nothing_new(tiny_run):
    config, out, first = tiny_run
    artifacts = sorted((out / "artifacts").glob("*/manifest.json"))
    stamps = [p.stat().st_mtime_ns for p in artifacts]
    result = run_bench(load_config(config), out)
    assert (result.measured, result.resumed, result.skipped, result.failed) == (0, 12, 12, 0)
    again = json.loads((out / "results.json").read_text())
    assert [r["run_id"] for r in again["runs"]][:-1] == [r["run_id"] for r in first["runs"]]
    for cid, cell in again["cells"].items():
        old = first["cells"][cid]
        for key in ("status", "run_id", "measured_at", "median_ms", "throughput_ips", "memory"):
            assert cell.get(key) == old.get(key)
    assert [p.stat().st_mtime_ns for p in artifacts] == stamps  # nothing rebuilt
    assert again["variants"] == first["variants"]


def test_bad_configs_are_one_line_errors(tmp_path, capsys):
    cases = {
        "unknown key": ({**TINY, "batch_sizes": [1]}, "unknown key 'batch_sizes'"),
        "unknown model key": ({**TINY, "models": [{"model": "vit_t16", "wieghts": "random"}]}, "unknown key 'wieghts'"),
        "unknown backend": ({**TINY, "backends": ["tensorflow"]}, "unknown 'tensorflow'"),
        "bad r": ({**TINY, "r": [0, "16:x"]}, "cannot read --r '16:x'"),
        "bad batch": ({**TINY, "batches": [0]}, "expected a list of ints >= 1"),
        "train on a timm model": ({**TINY, "models": [{"model": "vit_t16", "train": {"epochs": 1}}]}, "only the embedded"),
    }
    for name, (data, message) in cases.items():
        path = _write(tmp_path / f"{name.replace(' ', '_')}.yaml", data)
        assert main(["bench", "--config", str(path), "--out", str(tmp_path / "never")]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (name, err)
    good = _write(tmp_path / "good.yaml", TINY)
    assert main(["bench", "--config", str(good), "--out", str(tmp_path / "never"), "--data", str(tmp_path)]) == 2
    assert "random weights" in capsys.readouterr().err
    assert main(["bench", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_config_adds_the_baselines_and_reads_schedules():
    cfg = parse_config({"models": ["vit_t16"], "r": [8, "16:-1", [1] * 12], "precisions": ["int8"]})
    assert cfg.r == (0, 8, (16, -1.0), [1] * 12) and cfg.precisions == ("fp32", "int8")
    assert cfg.models[0].key == parse_config({"models": [{"model": "vit_t16"}]}).models[0].key
    assert cfg.models[0].key != parse_config({"models": [{"model": "vit_t16", "seed": 1}]}).models[0].key


def test_derive_stacking_efficiency_from_records():
    def cell(p, r, ips):
        return {"id": f"{p}{r}", "model": "m", "backend": "b", "batch": 1, "threads": 1, "precision": p, "r": r,
                "status": "measured", "throughput_ips": ips, "group": "g"}

    cells = {c["id"]: c for c in (cell("fp32", "r0", 10.0), cell("fp32", "r8", 15.0), cell("int8", "r0", 20.0),
                                  cell("int8", "r8", 24.0))}
    derive(cells)
    d = cells["int8r8"]["derived"]
    assert (d["speedup"], d["speedup_tome"], d["speedup_precision"]) == (2.4, 1.5, 2.0)
    assert d["stacking_efficiency"] == pytest.approx(0.8)
    cells["int8r0"]["group"] = "another run"  # never a ratio of numbers not timed side by side
    derive(cells)
    assert cells["int8r8"]["derived"]["speedup_precision"] is None and cells["int8r8"]["derived"]["stacking_efficiency"] is None


def test_report_states_where_tome_is_slower():
    def cell(backend, batch, p, r, ips):
        return {"id": f"{backend}{batch}{p}{r}", "model": "m", "model_name": "vit", "backend": backend, "device": "cuda",
                "batch": batch, "threads": 1, "precision": p, "r": r, "status": "measured", "throughput_ips": ips,
                "group": f"{backend}{batch}"}

    cells = [cell("torch-cuda-graph", 1, "fp32", "r0", 10.0), cell("torch-cuda-graph", 1, "fp32", "r16", 7.0),
             cell("torch-cuda-graph", 1, "fp16", "r0", 20.0), cell("torch-cuda-graph", 1, "fp16", "r16", 19.0),
             cell("torch-cuda-graph", 64, "fp32", "r0", 10.0), cell("torch-cuda-graph", 64, "fp32", "r16", 14.0),
             cell("torch-cuda-graph", 64, "fp16", "r0", 20.0), cell("torch-cuda-graph", 64, "fp16", "r16", 30.0)]
    derive({c["id"]: c for c in cells})
    text = "\n".join(_losses(cells))
    assert "fp32, r16, batch 1, 1 thread(s): 0.70x" in text and "fp16, r16, batch 1, 1 thread(s): 0.95x" in text
    assert "batch 64" not in text.split("in these cells:")[1].split("On **")[0]
    assert "On **torch-cuda-graph**, ToMe loses at batch size(s) 1." in text
    faster = [c for c in cells if c["batch"] == 64]
    assert "Nowhere" in "\n".join(_losses(faster))


def test_cuda_graph_backend_is_a_gpu_backend():
    spec = backends()["torch-cuda-graph"]
    assert spec.device == "cuda" and spec.cuda_graph and spec.target is None
    assert "needs an NVIDIA GPU" in skip_reason("torch-cuda-graph", "fp16", gpu=False)
    assert skip_reason("torch-cuda-graph", "fp16", gpu=True) is None
    assert "CPU only" in skip_reason("torch-cuda-graph", "int8", gpu=True)


def test_decision_agreement_counts_identical_decisions_and_groups():
    # (A index, B index) pairs per block and image: one merge each, so every pair is one merged group
    ref = {"blocks.0": np.array([[[0, 0]], [[1, 1]]]), "blocks.1": np.array([[[0, 0]], [[1, 0]]])}
    same = merge_decision_agreement(ref, ref)
    assert (same["agreement"], same["first_block"], same["group_agreement"]) == (1.0, 1.0, 1.0)
    other = {"blocks.0": np.array([[[0, 0]], [[0, 0]]]), "blocks.1": ref["blocks.1"]}
    result = merge_decision_agreement(ref, other)
    assert result["agreement"] == 0.75 and result["first_block"] == 0.5 and result["group_agreement"] == 0.75


def test_imagefolder_class_order(tmp_path):
    for name in ("b", "a", "c"):
        (tmp_path / name).mkdir()
    assert [(d.name, i) for d, i in quality.imagefolder_classes(tmp_path, 3)] == [("a", 0), ("b", 1), ("c", 2)]
    with pytest.raises(UserError, match="3 class folders but the model has 1000"):
        quality.imagefolder_classes(tmp_path, 1000)
    numbered = tmp_path / "numbered"
    for name in ("7", "3"):
        (numbered / name).mkdir(parents=True)
    assert [(d.name, i) for d, i in quality.imagefolder_classes(numbered, 10)] == [("3", 3), ("7", 7)]


DIGITS = {
    "name": "digits",
    "r": [0, 8],
    "precisions": ["fp32"],
    "backends": ["torch", "onnx"],
    "batches": [16],
    "threads": [1],
    "timing": {"warmup": 1, "rounds": 1, "per_round": 2, "pause_s": 0.0},
    "memory": False,
}


def _digits_config(small_digits, **overrides):
    model = {"model": "digits_vit", "train": small_digits.training, "kwargs": small_digits.model_kwargs}
    return parse_config({**DIGITS, "models": [model], **overrides})


def test_embedded_accuracy_case_reports_accuracy_above_chance(small_digits, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(small_digits.xdg))  # the session's trained checkpoint, not a new one
    result = run_bench(_digits_config(small_digits), tmp_path / "out")
    assert result.measured == 4
    res = result.results
    model = next(iter(res["models"].values()))
    assert model["training"]["checkpoint"] == str(small_digits.path)
    reference = model["reference_accuracy"]["top1"]
    assert abs(reference - small_digits.metrics["test_accuracy"]) <= 1 / 449 + 1e-9  # same model, same split
    assert reference > 0.5  # chance is 0.1
    for vid, q in res["variants"].items():
        assert q["accuracy"]["images"] == 449 and q["accuracy"]["top5"] >= q["accuracy"]["top1"] > 0.4, vid
        assert q["accuracy_drop"] == reference - q["accuracy"]["top1"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "accuracy drop" in text and "held-out test split" in text


def test_data_imagefolder_gives_top1_and_top5(small_digits, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(small_digits.xdg))
    split = quality.digits_set(0)
    folder = tmp_path / "digits-folder"
    for i, (image, label) in enumerate(zip(split.images[:120], split.labels[:120])):
        pixels = np.clip((image.transpose(1, 2, 0) * 0.5 + 0.5) * 255 + 0.5, 0, 255).astype(np.uint8)
        (folder / f"digit-{label}").mkdir(parents=True, exist_ok=True)  # sorted names = class order
        Image.fromarray(pixels).save(folder / f"digit-{label}" / f"{i:04d}.png")
    config = _digits_config(small_digits, backends=["torch"], r=[0])
    result = run_bench(config, tmp_path / "out", data=folder)
    model = next(iter(result.results["models"].values()))
    assert model["eval_set"].startswith(f"ImageFolder {folder} (120 of 120")
    acc = model["reference_accuracy"]
    assert acc["images"] == 120 and acc["top5"] >= acc["top1"]
    import torch

    from tome_export.models import create_model

    direct, _ = create_model("digits_vit", checkpoint=small_digits.path, **small_digits.model_kwargs)
    with torch.no_grad():
        expected = quality.accuracy(direct(torch.from_numpy(split.images[:120])).numpy(), split.labels[:120])
    assert abs(acc["top1"] - expected["top1"]) <= 2 / 120  # the same images, through PNG files and the folder order
