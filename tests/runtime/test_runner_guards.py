"""Runner arguments at their extremes: a thread count a backend cannot take is one UserError at load (ONNX Runtime
raised a TypeError for 2**70 and OpenVINO or ONNX Runtime took 0, -1 or 1.5 without a word), and one output name
passed as a string is that output, not its letters."""

from pathlib import Path

import numpy as np
import pytest

from tome_export.errors import UserError
from tome_export.runtime import load

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "manifests-0.1.0"
BUILDS = {"onnxruntime": FIXTURES / "vit_t16-tiny-onnxruntime-fp32", "openvino": FIXTURES / "vit_t16-tiny-openvino-fp32"}


@pytest.mark.parametrize("backend", list(BUILDS))
@pytest.mark.parametrize("threads", [0, -1, 1025, 2**70, 1.5, "4", True])
def test_a_thread_count_no_backend_takes_is_refused_at_load(backend, threads):
    with pytest.raises(UserError, match="threads must be an integer from 1 to 1024") as err:
        load(BUILDS[backend], threads=threads)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("backend", list(BUILDS))
def test_a_valid_thread_count_still_runs(backend):
    with load(BUILDS[backend], threads=2) as runner:
        logits = runner(np.zeros((1, *runner.image_shape), runner.dtype))
    assert runner.threads == 2 and logits.shape[0] == 1 and np.isfinite(logits).all()


def test_one_output_name_as_a_string_is_that_output():
    with load(BUILDS["onnxruntime"]) as runner:
        batch = np.zeros((1, *runner.image_shape), runner.dtype)
        named = runner.infer(batch, "logits")
        assert list(named) == ["logits"]
        np.testing.assert_array_equal(named["logits"], runner(batch))
