"""Runner for the ``openvino`` target: ``model.xml`` + ``model.bin`` on OpenVINO's CPU plugin.

The manifest's ``runtime.config`` holds the compile properties the build validated with, above all
``INFERENCE_PRECISION_HINT``: without it OpenVINO silently runs bf16 on CPUs that support it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .base import Runner


def compile_config(config: Mapping[str, Any], threads: Optional[int] = None, throughput: bool = False) -> Dict[str, Any]:
    """The artifact's properties plus the deployment's: thread count and latency or throughput hint."""
    merged = dict(config)
    merged["PERFORMANCE_HINT"] = "THROUGHPUT" if throughput else "LATENCY"
    if threads:
        merged["INFERENCE_NUM_THREADS"] = int(threads)
    return merged


class OpenVINORunner(Runner):
    """Latency mode: one infer request. Throughput mode: OpenVINO's THROUGHPUT hint (several CPU streams) and an
    ``AsyncInferQueue`` with the plugin's optimal number of requests in :meth:`run_many`."""

    backend = "openvino"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import openvino as ov

        runtime = self.manifest.get("runtime", {})
        config = compile_config(runtime.get("config", {}), self.threads, self.throughput)
        self.compiled = ov.Core().compile_model(str(self.directory / runtime.get("file", "model.xml")), "CPU", config)
        self.output = self.compiled.output(0)
        self.request = self.compiled.create_infer_request()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.request.infer({0: batch})[self.output]

    def _infer_many(self, batches: Sequence[np.ndarray]) -> List[np.ndarray]:
        if not self.throughput:
            return [self._infer(b) for b in batches]
        import openvino as ov

        results: List[Optional[np.ndarray]] = [None] * len(batches)

        def done(request: Any, index: int) -> None:
            results[index] = request.get_output_tensor(0).data.copy()  # the request's buffer is reused

        queue = ov.AsyncInferQueue(self.compiled, self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue.set_callback(done)
        for i, batch in enumerate(batches):
            queue.start_async({0: batch}, userdata=i)
        queue.wait_all()
        return results  # type: ignore[return-value]
