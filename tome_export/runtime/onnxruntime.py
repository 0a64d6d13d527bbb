"""Runner for the ``onnxruntime`` target: ``model.onnx`` (fp32, fp16, bf16 weights or int8) on ORT's CPU provider.

The artifact is saved after ORT's portable (``extended``) graph optimisations; the runner applies the level
the manifest names (``all``: adds the CPU-specific layout transforms, which must not be saved, see
:mod:`tome_export.backends.onnxruntime`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from ..errors import UserError
from .base import Runner

LEVELS = ("disabled", "basic", "extended", "all")


def session_options(optimization: str = "all", threads: Optional[int] = None):
    """ORT session options: graph optimisation level by name, intra-op threads (None: ORT's default)."""
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise UserError(f"ONNX Runtime optimisation level {optimization!r}: choose one of {', '.join(LEVELS)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    opts.log_severity_level = 3  # warnings go to the manifest's notes, not to the terminal
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


def create_session(model: Union[Path, bytes], optimization: str = "all", threads: Optional[int] = None):
    """A CPU session of a model file (or serialized model bytes)."""
    import onnxruntime as ort

    return ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                session_options(optimization, threads),
                                providers=["CPUExecutionProvider"])


class OnnxRuntimeRunner(Runner):
    """Latency mode: one request at a time on ``threads`` intra-op threads. Throughput mode: ``threads``
    single-threaded requests in parallel (:meth:`run_many`), which keeps every core busy on small batches."""

    backend = "onnxruntime"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        runtime = self.manifest.get("runtime", {})
        self.streams = (self.threads or os.cpu_count() or 1) if self.throughput else 1
        intra = 1 if self.throughput else self.threads
        self.session = create_session(self.directory / runtime.get("file", "model.onnx"),
                                      runtime.get("session_optimization", "all"), intra)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def _infer_many(self, batches: Sequence[np.ndarray]) -> List[np.ndarray]:
        if self.streams == 1:
            return [self._infer(b) for b in batches]
        with ThreadPoolExecutor(self.streams) as pool:  # ORT releases the GIL while it runs
            return list(pool.map(self._infer, batches))
