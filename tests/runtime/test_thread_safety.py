"""Runners shared between threads: every call returns the logits of its own input (a 4-thread soak per CPU runner).

The long soak (thousands of calls) is ``benchmarks/thread_soak.py``; this one keeps to a few seconds.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tome_export.runtime import load

THREADS, CALLS, INPUTS = 4, 96, 8


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_four_threads_on_one_runner_each_get_their_own_logits(cpu_build, target):
    directory, _ = cpu_build(target, "fp32")
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(INPUTS)]  # digits_vit
    with load(directory, threads=1) as runner:
        expected = [runner(x) for x in inputs]
        assert all(not np.allclose(expected[0], e, atol=1e-3) for e in expected[1:])  # a swap would show
        with ThreadPoolExecutor(THREADS) as pool:
            got = list(pool.map(lambda i: (i % INPUTS, runner(inputs[i % INPUTS])), range(CALLS)))
    wrong = [i for i, logits in got if not np.array_equal(logits, expected[i])]
    assert len(got) == CALLS and wrong == []
