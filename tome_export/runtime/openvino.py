"""Runner for the ``openvino`` target: ``model.xml`` + ``model.bin`` on OpenVINO's CPU plugin.

The runtime settings' ``config`` holds the compile properties the build validated with, above all
``INFERENCE_PRECISION_HINT``: without it OpenVINO silently runs bf16 on CPUs that support it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import UserError
from .base import ArtifactIO, Runner
from .machine import cpu_description, describe_cpu


def compile_config(config: Mapping[str, Any], threads: Optional[int] = None, throughput: bool = False) -> Dict[str, Any]:
    """The artifact's properties plus the deployment's: thread count and latency or throughput hint."""
    merged = dict(config)
    merged["PERFORMANCE_HINT"] = "THROUGHPUT" if throughput else "LATENCY"
    if threads:
        merged["INFERENCE_NUM_THREADS"] = int(threads)
    return merged


def _last_line(exc: BaseException) -> str:
    """OpenVINO's exceptions stack the places they passed through; the last line says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def _store_output(request: Any, userdata: Any) -> None:
    results, index, output = userdata
    results[index] = request.get_output_tensor(output).data.copy()  # the request's buffer is reused


class OpenVINORunner(Runner):
    """Latency mode: one infer request at a time. Throughput mode: OpenVINO's THROUGHPUT hint (several CPU
    streams) and an ``AsyncInferQueue`` with the plugin's optimal number of requests in :meth:`run_many`.

    Thread-safe, one call at a time: with OpenVINO 2026.4 several Python threads calling ``infer`` on separate
    requests of one compiled model deadlock now and then (measured here: 4 threads, a 2-block ViT, 5 of 10 runs
    hung, the threads waiting in the Python data dispatch's ``get_input_tensor``; 0 of 30 once calls took turns).
    In latency mode each inference uses every CPU stream anyway; throughput mode overlaps requests inside
    OpenVINO (:meth:`run_many`). Results are copied out of the request's buffers before the request is reused.
    """

    backend = "openvino"
    concurrent = False
    libraries = ("openvino",)

    def __init__(self, io: ArtifactIO, threads: Optional[int] = None, throughput: bool = False,
                 extra_outputs: Sequence[str] = ()) -> None:
        super().__init__(io, threads, throughput, extra_outputs)
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.directory / io.runtime.get("file", "model.xml")))
        if extra_outputs:
            model.add_outputs(list(extra_outputs))
        config = compile_config(io.runtime.get("config", {}), self.threads, self.throughput)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:  # e.g. an int8 IR under ONEDNN_MAX_CPU_ISA=SSE41: "bad combination"
            raise UserError(f"OpenVINO {ov.__version__.split('-')[0]} cannot compile {str(self.directory)!r} for this "
                            f"CPU ({describe_cpu(cpu_description())}): {_last_line(exc)}; run it on a CPU like the "
                            f"one it was validated on (tome-export inspect shows it)") from None
        self.output_index = {name: i for i, port in enumerate(self.compiled.outputs) for name in port.get_names()}
        self.output_index.setdefault(self.primary, 0)
        self.ports = {name: self.compiled.output(i) for name, i in self.output_index.items()}
        self.output_names = [n for n in self.output_names if n in self.ports]
        self.request = self.compiled.create_infer_request()

    def _infer(self, batch: np.ndarray, names: Sequence[str]) -> Dict[str, np.ndarray]:
        results = self.request.infer({0: batch}, share_outputs=False)  # copies: the next call reuses the buffers
        return {name: results[self.ports[name]] for name in names}

    def _infer_many(self, batches: Sequence[np.ndarray]) -> List[np.ndarray]:
        if not self.throughput:
            return super()._infer_many(batches)
        import openvino as ov

        results: List[Optional[np.ndarray]] = [None] * len(batches)
        first = self.output_index[self.primary]
        requests = ov.AsyncInferQueue(self.compiled, self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        requests.set_callback(_store_output)
        for i, batch in enumerate(batches):
            requests.start_async({0: batch}, userdata=(results, i, first))
        requests.wait_all()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        super().close()  # first: calls in other threads finish before the compiled model goes
        self.request = self.compiled = None
