"""Artifacts that check themselves where they run: what a build stores, the check at load and its cache keyed by
the CPU's ISA (switched with ONEDNN_MAX_CPU_ISA, which OpenVINO's CPU plugin honours), the refusal when the stored
outputs are not what the machine computes, and `tome-export verify`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from tome_export.cli import main
from tome_export.images import sample_photo_paths
from tome_export.manifest import load_manifest, read_manifest, write_manifest
from tome_export.runtime import SelfCheckError, load, machine, open_artifact, selfcheck

pytestmark = pytest.mark.slow

CLASSES = 10  # digits_vit


@pytest.fixture(scope="module")
def small(tiny_build):
    """``small(target)``: the suite's tiny build for ``target`` (digits_vit, random weights, r=8, 32 px, 4 blocks)."""
    return lambda target: tiny_build(target)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TOME_EXPORT_CACHE", str(folder))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    return folder / "self-check"


def test_build_stores_a_checksummed_self_check_and_where_it_validated(small):
    directory = small("onnxruntime")
    m = read_manifest(directory)  # every sha256, selfcheck.npz included
    assert "selfcheck.npz" in m["artifacts"]
    check = m["self_check"]
    assert check["views"] == 4 and check["thresholds"] == {"max_abs_diff": 1e-4}
    data = selfcheck.SelfCheckData.read(directory / check["file"])
    assert data.inputs.shape == (4, 3, 32, 32) and data.reference.shape == (4, CLASSES)
    assert data.built.shape == (4, CLASSES)  # static batch 1: one row per view
    assert np.abs(data.built - data.reference).max() == pytest.approx(check["on_build_machine"]["max_abs_diff"])
    on = m["validated_on"]
    assert on["versions"] == {"onnxruntime": onnxruntime.__version__}
    assert on["cpu"]["flags"] == machine.cpu_description()["flags"] and on["device"] is None
    assert on["runner"] == "tome_export.runtime.onnxruntime:OnnxRuntimeRunner"


def test_load_checks_once_per_machine_then_uses_the_cache(small, cache):
    directory = small("onnxruntime")
    with load(directory) as runner:
        assert runner(runner.preprocess_batch(sample_photo_paths()[:1])).shape == (1, CLASSES)
    entries = list(cache.glob("*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["passed"] is True
    artifact = open_artifact(directory)
    with artifact.load(self_check=False) as runner:
        again = selfcheck.ensure(directory, artifact.manifest, runner)
    assert again.cached and again.passed and len(list(cache.glob("*.json"))) == 1


def _with_reference(source: Path, target: Path, change) -> Path:
    """A copy of ``source`` whose stored PyTorch outputs are ``change(reference)``, checksums brought up to date
    (as a machine that computes something else would look to the check)."""
    shutil.copytree(source, target)
    manifest = load_manifest(target)
    path = target / manifest.self_check["file"]
    data = selfcheck.SelfCheckData.read(path)
    path.write_bytes(selfcheck.SelfCheckData(data.inputs, change(data.reference), data.built).to_bytes())
    write_manifest(target, manifest)
    return target


def test_outputs_other_than_validated_are_refused_in_one_line(small, cache, tmp_path, capsys):
    edited = _with_reference(small("onnxruntime"), tmp_path / "edited", lambda ref: np.roll(ref, 7, axis=1))
    with pytest.raises(SelfCheckError) as err:
        load(edited)
    message = str(err.value)
    assert "\n" not in message and "computes something else on this machine" in message
    assert "max_abs_diff" in message and "self_check=False" in message and "TOME_EXPORT_SELF_CHECK=0" in message
    assert "validated on" in message and "running on" in message
    assert not cache.exists() or not list(cache.glob("*.json"))  # a refusal is never cached
    with load(edited, self_check=False) as runner:  # the option runs it anyway
        assert runner.batch_size == 1
    os.environ[selfcheck.SKIP_VARIABLE] = "0"
    try:
        load(edited).close()
    finally:
        del os.environ[selfcheck.SKIP_VARIABLE]
    assert main(["verify", str(edited)]) == 1
    out, err_text = capsys.readouterr()
    assert out.startswith(f"FAILED {edited}") and "validation failed:" in err_text and err_text.count("\n") == 1


def test_a_small_shift_within_the_thresholds_passes(small, cache, tmp_path):
    shifted = _with_reference(small("onnxruntime"), tmp_path / "shifted", lambda ref: ref + 5e-5)
    outcome = open_artifact(shifted).verify()
    assert outcome.passed and outcome.metrics["max_abs_diff"] == pytest.approx(5e-5, abs=2e-6)


def test_verify_command_and_its_json(small, cache, capsys):
    directory = small("onnxruntime")
    assert main(["verify", str(directory)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"verified {directory}") and "this machine" in text and "validated on" in text
    assert main(["verify", str(directory), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["metrics"]["views"] == 4 and report["cached"] is False
    assert report["environment"]["versions"] == {"onnxruntime": onnxruntime.__version__}


def test_inspect_shows_where_it_validated_and_its_self_check(small, capsys):
    assert main(["inspect", str(small("onnxruntime"))]) == 0
    lines = capsys.readouterr().out.splitlines()
    validated = next(l for l in lines if l.startswith("validated on"))
    assert f"onnxruntime {onnxruntime.__version__}" in validated
    assert machine.describe_cpu(machine.cpu_description()).split(" (")[0] in validated
    assert any(l.startswith("self-check 4 stored views (selfcheck.npz)") for l in lines)


CHECK_ONCE = """
import json, sys
from tome_export.runtime import open_artifact, selfcheck
artifact = open_artifact(sys.argv[1])
with artifact.load(self_check=False) as runner:
    outcome = selfcheck.ensure(artifact.directory, artifact.manifest, runner)
    rows, _ = selfcheck.run_views(runner, selfcheck.SelfCheckData.read(artifact.directory / "selfcheck.npz").inputs,
                                  "logits")
print(json.dumps({"cached": outcome.cached, "passed": outcome.passed, "isa": outcome.environment["cpu"]["isa_limits"],
                  "rows": rows.tolist()}))
"""


def _check_in_process(directory: Path, isa: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", CHECK_ONCE, str(directory)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_switching_the_isa_checks_again_and_caches_apart(small, cache):
    """OpenVINO's oneDNN kernels follow ONEDNN_MAX_CPU_ISA: each limit is its own machine for the cache."""
    directory = small("openvino")
    first, limited = _check_in_process(directory), _check_in_process(directory, "AVX")
    again = _check_in_process(directory, "AVX")
    assert (first["cached"], limited["cached"], again["cached"]) == (False, False, True)
    assert first["passed"] and limited["passed"] and limited["isa"] == {"ONEDNN_MAX_CPU_ISA": "AVX"}
    assert len(list(cache.glob("*.json"))) == 2
    # the kernels changed, the results stay within the build's fp32 threshold (1e-4) of each other
    assert np.abs(np.array(first["rows"]) - np.array(limited["rows"])).max() < 1e-4


def test_an_artifact_without_a_self_check_loads_and_verify_says_why_not(tmp_path, capsys):
    legacy = Path(__file__).resolve().parents[1] / "fixtures" / "manifests-0.1.0" / "vit_t16-tiny-onnxruntime-fp32"
    copy = shutil.copytree(legacy, tmp_path / "legacy")
    with load(copy) as runner:
        assert runner.batch_size is not None or runner.dynamic_batch
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "holds no self-check" in err and err.count("\n") == 1


def test_a_cpu_openvino_cannot_compile_for_is_one_line(small):
    """OpenVINO 2026.4's CPU plugin refuses to compile under ONEDNN_MAX_CPU_ISA=SSE41 ("bad combination")."""
    code = "import sys; from tome_export.cli import main; sys.exit(main(['verify', sys.argv[1]]))"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "SSE41"}
    done = subprocess.run([sys.executable, "-c", code, str(small("openvino"))], env=env, capture_output=True, text=True)
    if done.returncode == 0:
        pytest.skip("this OpenVINO compiles under SSE41 here")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot compile" in done.stderr and "ONEDNN_MAX_CPU_ISA=SSE41" in done.stderr


def test_isa_compare_shows_the_kernels_that_change_and_where_outputs_part(small, tmp_path):
    """benchmarks/isa_compare.py, what someone on an AMX machine runs: here AVX2 (this CPU's default) against AVX."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "isa_compare.py"
    out = tmp_path / "isa"
    done = subprocess.run([sys.executable, str(script), str(small("openvino")), "--isa", "default", "--isa", "AVX",
                           "--tensors", "tome", "--threads", "1", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(Path(f"{out}.json").read_text())
    default, limited = report["settings"]
    assert default["error"] is None and limited["environment"]["cpu"]["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX"}
    assert default["against_reference"]["views"] == 4 and default["against_reference"]["max_abs_diff"] < 1e-4
    assert default["exposing_tensors_changes_logits"]["max_abs_diff"] < 1e-5
    (pair,) = report["pairs"]
    if "avx2" in machine.cpu_description()["flags"]:  # AVX is then a real step down: some kernels change
        assert pair["kernel_changes"] and all(c["default"] != c["AVX"] for c in pair["kernel_changes"])
    assert pair["tensors"] and all(t["tensor"] for t in pair["tensors"]) and pair["logits"]["max_abs_diff"] < 1e-4
    assert Path(f"{out}.md").read_text().startswith("# ISA comparison of")
