"""The AOTInductor runner on a real package: it runs with torch alone (the build stack blocked from importing), keeps
the runner contract (named outputs, threads, close, shared by threads) and refuses what it cannot run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch

from tome_export.errors import UserError
from tome_export.images import sample_photos
from tome_export.manifest import load_manifest
from tome_export.models import create_model, patch
from tome_export.runtime import ArtifactIO, load, runtime_settings
from tome_export.runtime.aoti import CPU_ISAS, AOTIRunner
from tome_testing.aoti_builds import R, TINY
from tome_testing.blocked_imports import BLOCK_MODULES

pytestmark = pytest.mark.slow

# What a machine that only runs the package does not have: the model libraries, ONNX and its runtimes, PyYAML.
BUILD_STACK = ("timm", "torchvision", "transformers", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "yaml",
               "tensorrt", "tensorrt_rtx")
RUN_WITHOUT_BUILD_STACK = BLOCK_MODULES + """
import json
import numpy as np
from tome_export import runtime

with runtime.load(sys.argv[1]) as runner:
    np.save(sys.argv[4], runner(np.load(sys.argv[3])))
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)))
"""


def reference_model() -> torch.nn.Module:
    """The tiny model the session's build made, rebuilt from its recipe: seeded random weights, patched."""
    model, _ = create_model("vit_t16", weights="random", seed=0, **TINY)
    return patch(model, R).eval()


@pytest.fixture(scope="module")
def photos(aoti_cpu_build):
    with load(aoti_cpu_build) as runner:
        return runner.preprocess_batch(sample_photos(5))


def test_runtime_load_runs_the_package_without_the_build_stack(aoti_cpu_build, photos, tmp_path):
    np.save(tmp_path / "in.npy", photos)
    done = subprocess.run([sys.executable, "-c", RUN_WITHOUT_BUILD_STACK, str(aoti_cpu_build), ",".join(BUILD_STACK),
                           str(tmp_path / "in.npy"), str(tmp_path / "out.npy")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []  # none of them was even imported
    with torch.no_grad():
        want = reference_model()(torch.from_numpy(photos)).numpy()
    got = np.load(tmp_path / "out.npy")
    assert got.shape == (5, 1000) and np.abs(want).max() > 0.1 and np.abs(got - want).max() <= 1e-4


def test_named_outputs_any_batch_and_threads(aoti_cpu_build, photos):
    with torch.no_grad():
        want_logits, want_source = reference_model().forward_with_source(torch.from_numpy(photos))
    before = torch.get_num_threads()
    with load(aoti_cpu_build, threads=1, extra_outputs=["blocks.0.no_such_tensor"]) as runner:
        assert runner.output_names == ["logits", "source"]  # a package exposes no intermediate tensors
        outputs = runner.infer(photos)
        assert torch.get_num_threads() == before  # set for the call, restored after it
        for size in (1, 3):
            assert np.abs(runner(photos[:size]) - outputs["logits"][:size]).max() <= 1e-5
    assert np.abs(outputs["logits"] - want_logits.numpy()).max() <= 1e-4
    assert outputs["source"].shape == (5, 9, 17) and np.array_equal(outputs["source"], want_source.numpy())


def test_one_runner_shared_by_threads(aoti_cpu_build, photos):
    with load(aoti_cpu_build) as runner:
        alone = [runner(photos[i:i + 1]) for i in range(len(photos))]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda i: runner(photos[i:i + 1]), list(range(5)) * 3))
    for i, logits in enumerate(together):
        assert np.abs(logits - alone[i % 5]).max() <= 1e-5


def test_closed_runner_and_inputs_are_refused(aoti_cpu_build, photos):
    runner = load(aoti_cpu_build)
    with pytest.raises(UserError, match="expected input shape"):
        runner(np.zeros((1, 3, 32, 32), np.float32))
    runner.close()
    with pytest.raises(UserError, match="was closed"):
        runner(photos)


def test_refused_before_torch_loads_what_cannot_run(aoti_cpu_build, tmp_path):
    manifest = load_manifest(aoti_cpu_build)
    io = ArtifactIO.from_manifest(aoti_cpu_build, manifest, runtime_settings(manifest))
    lacking = next((isa for isa, check in CPU_ISAS.items() if not getattr(torch.cpu, check)()), None)
    if lacking is not None:  # a package compiled for wider vector instructions would stop this CPU
        with pytest.raises(UserError, match=f"compiled for CPUs with {lacking} and this CPU lacks it"):
            AOTIRunner(replace(io, runtime={**io.runtime, "cpu_isa": lacking}))
    copy = tmp_path / "copy"
    shutil.copytree(aoti_cpu_build, copy)
    (copy / "model.pt2").write_bytes(b"not a package")
    with pytest.raises(UserError, match="does not match its sha256"):
        load(copy)
    with pytest.raises(UserError, match=r"could not load model.pt2 \(compiled with torch .*\): .*rebuild"):
        AOTIRunner(replace(io, directory=copy))
