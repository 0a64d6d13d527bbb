"""Triton Python-backend model that serves a tome-export artifact through ``tome_export.runtime``.

tome-export copies this file to ``<model>/1/model.py`` beside ``<model>/1/artifact/`` (the build directory,
checksums verified when it loads). The server's Python needs tome-export and the artifact's backend (numpy,
pillow, onnxruntime or openvino; no torch). Requests that Triton's dynamic batcher groups are run as one batch;
a request with a wrong shape or dtype gets its own error and does not fail the others.

Client mistakes are answered as client errors (``TritonError.INVALID_ARG``: HTTP 400, gRPC INVALID_ARGUMENT), and
a request's claimed shape is checked against the artifact's before its data is touched, so a config edited to
accept any shape still never makes this model allocate what a request claims. Failures of the model itself are
``INTERNAL`` errors of the requests they concern; the model instance keeps serving.

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
        self.largest_batch = int(config["max_batch_size"]) if self.batched else (self.runner.batch_size or 1)

    def _input(self, request):
        """The request's images as the runner takes them; the claimed shape is checked before the data is read."""
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise UserError(f"the request has no input {self.input_name!r}")
        shape = tuple(int(d) for d in tensor.shape())
        want = tuple(self.runner.image_shape)
        if len(shape) != 1 + len(want) or shape[1:] != want or not 1 <= shape[0] <= self.largest_batch:
            raise UserError(f"input {self.input_name!r} has shape {list(shape)}; this model takes [N, "
                            f"{', '.join(map(str, want))}] with N from 1 to {self.largest_batch}")
        return self.runner.check(np.from_dlpack(tensor))

    def execute(self, requests):
        responses = [None] * len(requests)
        checked = []
        for i, request in enumerate(requests):
            try:
                checked.append((i, self._input(request)))
            except UserError as exc:
                responses[i] = _error(str(exc), "INVALID_ARG")
            except Exception as exc:  # noqa: BLE001 - the request fails alone; the instance keeps serving
                responses[i] = _error(f"cannot read the request ({type(exc).__name__}: {exc})", "INVALID_ARG")
        try:
            parts = self._run([batch for _, batch in checked])
        except Exception as exc:  # noqa: BLE001 - a failure of the model: each request concerned hears it
            for i, _ in checked:
                responses[i] = _error(f"the model failed ({type(exc).__name__}: {exc})", "INTERNAL")
            return responses
        for (i, _), part in zip(checked, parts):
            tensors = [pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(part[name])) for name in self.output_names]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def _run(self, batches):
        """Each request's outputs by name; one batch for all of them where the model batches requests."""
        if self.batched and len(batches) > 1:
            outputs = self.runner.infer(np.concatenate(batches), self.output_names)
            ends = np.cumsum([len(batch) for batch in batches])[:-1]
            split = {name: np.split(value, ends) for name, value in outputs.items()}
            return [{name: split[name][j] for name in self.output_names} for j in range(len(batches))]
        return [self.runner.infer(batch, self.output_names) for batch in batches]


def _error(message, code):
    """A response carrying a TritonError with ``code`` (the stubs of older Python backends take no code)."""
    value = getattr(pb_utils.TritonError, code, None)
    error = pb_utils.TritonError(message, value) if value is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)
