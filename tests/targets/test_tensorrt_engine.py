"""``tome-export engine DIR``: the engine of a TensorRT build, built on the machine that runs it with the settings the
build recorded, validated against the ONNX where a CUDA GPU is, and recorded in the manifest.

TensorRT-RTX builds engines on the CPU, so the step runs here on a ``--no-engine`` build; the engine can only be
validated (run) on a GPU, and that test skips without one.
"""

import shutil
import warnings

import pytest
import torch

from tome_export.cli import main
from tome_export.errors import UnvalidatedEngineWarning, UserError
from tome_export.files import sha256_file
from tome_export.manifest import read_manifest
from tome_export.runtime import load
from tome_export.targets.tensorrt.engine import TENSORRT, engine_unavailable_reason


def _gpu_reason():
    """Why the engine cannot be run here (None where it can)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU here: TensorRT-RTX engines are built on the CPU but run only on a GPU"
    if torch.cuda.get_device_capability(0)[0] == 9:
        return "TensorRT-RTX engines do not run on Hopper GPUs (NVIDIA lists RTX GPUs only)"
    return None


@pytest.fixture(scope="module")
def rtx_no_engine(tmp_path_factory):
    """A TensorRT-RTX fp16 build (digits_vit, r=8, static batch 2) written without its engine."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12/-cu13 is not installed")
    out = tmp_path_factory.mktemp("engine") / "rtx"
    code = main(["--model", "digits_vit", "--r", "8", "--target", "tensorrt-rtx", "--precision", "fp16", "--batch", "2",
                 "--no-engine", "--weights", "random", "--output", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.fixture
def copy(rtx_no_engine, tmp_path):
    target = tmp_path / "rtx"
    shutil.copytree(rtx_no_engine, target)
    return target


def _engine(args, capsys):
    code = main(["engine", *map(str, args), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_no_engine_build_leaves_the_engine_to_the_gpu_machine(rtx_no_engine):
    m = read_manifest(rtx_no_engine)
    assert sorted(p.name for p in rtx_no_engine.iterdir()) == ["build_engine.sh", "manifest.json", "model.onnx",
                                                                "selfcheck.npz"]
    trt = m["tensorrt"]
    assert not trt["engine_built"] and "(--no-engine)" in trt["engine_note"] and "tome-export engine" in trt["engine_note"]
    assert trt["profile"] == {"input": "images", "min": 2, "opt": 2, "max": 2} and trt["timing_cache"] is None
    with pytest.raises(UserError, match="holds no model.engine.*tome-export engine"):
        load(rtx_no_engine)


def test_engine_step_builds_records_and_says_what_is_not_validated(copy, capsys):
    before = read_manifest(copy)
    code, out, err = _engine([copy], capsys)
    assert code == 0, err
    m = read_manifest(copy)  # every checksum verified, the engine's included
    engine = m["tensorrt"]["engine"]
    assert m["artifacts"]["model.engine"]["sha256"] == engine["sha256"] == sha256_file(copy / "model.engine")
    assert engine["library"] == "tensorrt_rtx" and engine["bytes"] > 1_000_000 and engine["build_seconds"] > 0
    # built with the settings the build recorded; what the build validated is kept as it was
    assert engine["compute_capabilities"] == before["tensorrt"]["compute_capabilities"]
    assert m["tensorrt"]["build_command"] == before["tensorrt"]["build_command"]
    assert m["validation"] == before["validation"] and m["tensorrt"]["engine_built"]
    for name in ("model.onnx", "build_engine.sh"):
        assert m["artifacts"][name] == before["artifacts"][name]
    assert sorted(p.name for p in copy.iterdir()) == ["build_engine.sh", "manifest.json", "model.engine", "model.onnx",
                                                       "selfcheck.npz"]
    assert "wrote" in out and "model.engine" in out
    validation = m["tensorrt"]["engine_validation"]
    if _gpu_reason() is None:
        assert validation["run"] and validation["passed"] and engine["device"]["name"]
        return
    if not torch.cuda.is_available():
        assert validation == {"run": False, "reason": "no CUDA GPU here",
                              "how": f"run `tome-export engine {copy} --validate-only` on the GPU machine"}
        assert err.count("\n") == 1 and "built and checksummed but NOT validated" in err and "--validate-only" in err
        assert "NOT validated (no CUDA GPU here)" in m["runtime"]["engine_note"]
        assert m["runtime"]["engine_validated"] is False
        # covered now: refused only for the GPU, after a warning that the engine was never validated
        with pytest.warns(UnvalidatedEngineWarning, match="never validated.*--validate-only"), \
                pytest.raises(UserError, match="no CUDA GPU is available"):
            load(copy)
        code, _, err = _engine([copy, "--validate-only"], capsys)
        assert code == 2 and "no CUDA GPU here" in err and err.count("\n") == 1
    main(["inspect", str(copy)])
    shown = capsys.readouterr().out
    assert "engine     model.engine" in shown and "tensorrt_rtx" in shown


def test_existing_engine_needs_force(copy, capsys):
    assert _engine([copy], capsys)[0] == 0
    built = _snapshot(copy)
    code, _, err = _engine([copy], capsys)
    assert code == 2 and err.count("\n") == 1 and "already holds model.engine (recorded in its manifest)" in err
    assert "--force" in err and _snapshot(copy) == built
    code, _, err = _engine([copy, "--force"], capsys)
    assert code == 0, err
    m = read_manifest(copy)
    assert m["artifacts"]["model.engine"]["sha256"] == sha256_file(copy / "model.engine")
    assert not [p.name for p in copy.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_engine_not_covered_or_tampered(copy, capsys):
    # an engine built outside the step (./build_engine.sh) is never validated nor checksummed
    (copy / "model.engine").write_bytes(b"an engine from elsewhere")
    code, _, err = _engine([copy], capsys)
    assert code == 2 and "not covered by its manifest" in err and err.count("\n") == 1
    with pytest.raises(UserError, match="not covered by its manifest.*tome-export engine"):
        load(copy)
    assert _engine([copy, "--force"], capsys)[0] == 0
    # a recorded engine changed afterwards: refused, even with --force, and by the runtime
    (copy / "model.engine").write_bytes(b"tampered")
    before = _snapshot(copy)
    for args in ([copy], [copy, "--force"], [copy, "--validate-only"]):
        code, _, err = _engine(args, capsys)
        assert code == 2 and "'model.engine' does not match its sha256" in err and err.count("\n") == 1
    assert _snapshot(copy) == before
    with pytest.raises(UserError, match="does not match its sha256"):
        load(copy)


def test_engine_refuses_what_it_cannot_finish(tmp_path, tiny_build, capsys):
    onnx_build = tiny_build("onnx")
    trt_build = tiny_build("tensorrt", dynamic_batch=True, target_options={"dynamic_batch": "1:2:4"})  # as tests/serve
    cases = [(tmp_path / "missing", "is not a directory"), (tmp_path, "holds no manifest.json"),
             (onnx_build, "is a --target onnx build, which has nothing to finish on the target machine")]
    reason = engine_unavailable_reason(TENSORRT)
    if reason is not None:  # TensorRT itself (not TensorRT-RTX) needs its package and a GPU
        cases.append((trt_build, f"no TensorRT engine can be built here: {reason}"))
    for directory, message in cases:
        before = _snapshot(directory) if directory.is_dir() else None
        code, out, err = _engine([directory], capsys)
        assert code == 2 and message in err and err.count("\n") == 1 and not out, (directory, err)
        assert (_snapshot(directory) if directory.is_dir() else None) == before


def test_engine_validated_on_the_gpu(copy, capsys):
    reason = _gpu_reason()
    if reason is not None:
        pytest.skip(reason)
    code, out, err = _engine([copy], capsys)
    assert code == 0, err
    m = read_manifest(copy)
    validation, engine = m["tensorrt"]["engine_validation"], m["tensorrt"]["engine"]
    assert validation["passed"] and validation["images"] == 32 and validation["min_cosine"] >= 0.999
    assert engine["device"]["compute_capability"] and "validation on" in out
    assert m["runtime"]["engine_validated"] is True
    from tome_export.images import sample_photos

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnvalidatedEngineWarning)  # a validated engine loads without the warning
        runner = load(copy)
    with runner:
        assert runner(runner.preprocess_batch(sample_photos(2))).shape == (2, 10)  # digits_vit's 10 classes
    code, out, err = _engine([copy, "--validate-only"], capsys)
    assert code == 0 and read_manifest(copy)["tensorrt"]["engine"]["sha256"] == engine["sha256"]
