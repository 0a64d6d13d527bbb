"""Runners of the CPU targets: torch-free, input checks, latency and throughput modes agree."""

import subprocess
import sys

import numpy as np
import pytest

from tome_export.errors import UserError
from tome_export.runtime import RUNNERS, load


def test_cpu_runners_are_registered_and_import_without_torch():
    assert RUNNERS["onnxruntime"].endswith(":OnnxRuntimeRunner") and RUNNERS["openvino"].endswith(":OpenVINORunner")
    code = ("import sys, tome_export.runtime.onnxruntime, tome_export.runtime.openvino; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_runner_checks_inputs_and_serves_batches(cpu_build, target):
    directory, _ = cpu_build(target, "fp32")
    runner = load(directory, threads=1)
    with pytest.raises(UserError, match="static batch"):
        runner(np.zeros((2, 3, 224, 224), np.float32))
    with pytest.raises(UserError, match="expected dtype float32"):
        runner(np.zeros((1, 3, 224, 224), np.float16))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(3)]
    latency = [runner(b) for b in batches]
    served = load(directory, threads=2, throughput=True).run_many(batches)
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(latency, served))
    with pytest.raises(UserError, match="expected input shape"):
        runner.run_many([batches[0], np.zeros((1, 3, 64, 64), np.float32)])
