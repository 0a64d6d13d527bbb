"""Triton Python-backend model that serves a tome-export artifact through ``tome_export.runtime``.

tome-export copies this file to ``<model>/1/model.py`` beside ``<model>/1/artifact/`` (the build directory,
checksums verified when it loads). The server's Python needs tome-export and the artifact's backend (numpy,
pillow, onnxruntime or openvino; no torch). Requests that Triton's dynamic batcher groups are run as one batch;
a request with a wrong shape or dtype gets its own error and does not fail the others.

Tensors cross the backend boundary through DLPack (pointer, shape, dtype), not through
``pb_utils.Tensor(name, ndarray)`` / ``as_numpy()``: Python-backend stubs compiled against NumPy 1 read NumPy 2
arrays wrongly (measured with tritonserver 2.51: inputs arrive with wrong strides, outputs arrive empty).
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tome_export import UserError, runtime

ARTIFACT = Path(__file__).resolve().parent / "artifact"
CAPSULE_NOISE = "PyCapsule_GetPointer called with incorrect name"


def _quiet_consumed_capsules(previous):
    """The backend marks consumed DLPack capsules "used_dlpack" (the standard says "used_dltensor"), so NumPy's
    capsule destructor reports a harmless error for every output tensor; drop exactly that report."""

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, ValueError) and str(unraisable.exc_value) == CAPSULE_NOISE):
            previous(unraisable)

    return hook


class TritonPythonModel:
    def initialize(self, args):
        sys.unraisablehook = _quiet_consumed_capsules(sys.unraisablehook)
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        threads = int(parameters["threads"]) if parameters.get("threads") else None
        self.runner = runtime.load(ARTIFACT, threads=threads)
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests):
        responses = [None] * len(requests)
        checked = []
        for i, request in enumerate(requests):
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
                checked.append((i, self.runner.check(np.from_dlpack(tensor))))
            except UserError as exc:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        if self.batched and len(checked) > 1:
            outputs = self.runner.infer(np.concatenate([batch for _, batch in checked]), self.output_names)
            ends = np.cumsum([len(batch) for _, batch in checked])[:-1]
            split = {name: np.split(value, ends) for name, value in outputs.items()}
            parts = [{name: split[name][j] for name in self.output_names} for j in range(len(checked))]
        else:
            parts = [self.runner.infer(batch, self.output_names) for _, batch in checked]
        for (i, _), part in zip(checked, parts):
            tensors = [pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(part[name])) for name in self.output_names]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
