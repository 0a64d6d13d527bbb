"""Runner for ONNX graphs on ONNX Runtime's CPU provider: the ``onnx`` and ``onnxruntime`` targets' artifacts, and
every graph a build checks on the CPU (the TensorRT targets validate theirs here).

The runtime settings name the file and the graph optimisation level the session applies when it loads it
(``all``: adds the CPU-specific layout transforms, which the ``onnxruntime`` target must not save into a file).
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..errors import UserError
from ..onnx_files import external_locations, needs_external_data, refuse_outside_data, save_onnx
from .base import ArtifactIO, Runner

LEVELS = ("disabled", "basic", "extended", "all")
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


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


def expose_outputs(model: Any, names: Sequence[str]) -> Any:
    """A copy of an ``onnx.ModelProto`` that also outputs the named intermediate tensors."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    produced = {t for n in copy.graph.node for t in n.output}
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in produced:
            raise RuntimeError(f"tensor {name!r} is not in the graph (a rewrite renamed it)")
        if name not in present:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy


Graph = Union[Path, bytes, Any]  # a file, serialized model bytes, or an onnx.ModelProto


class OnnxRuntimeRunner(Runner):
    """Latency mode: one request at a time on ``threads`` intra-op threads. Throughput mode: ``threads``
    single-threaded requests in parallel (:meth:`run_many`), which keeps every core busy on small batches.

    ``graph`` runs another graph than the artifact's file (a build's candidate, in memory) with the same settings;
    graphs with external data run from their file (a session made from bytes finds the data in its folder).

    Thread-safe: ONNX Runtime documents ``InferenceSession.run`` as safe to call from several threads at once on one
    session, so calls share the session and run concurrently.
    """

    backend = "onnxruntime"
    concurrent = True

    def __init__(self, io: ArtifactIO, threads: Optional[int] = None, throughput: bool = False,
                 extra_outputs: Sequence[str] = (), graph: Optional[Graph] = None) -> None:
        super().__init__(io, threads, throughput, extra_outputs)
        self.optimization = str(io.runtime.get("session_optimization", "all"))
        self.streams = (self.threads or os.cpu_count() or 1) if self.throughput else 1
        self.data_folder: Optional[Path] = None
        self.scratch: Optional[tempfile.TemporaryDirectory] = None
        self.model = self._model_bytes(graph, extra_outputs)
        self.session = self._session(self.optimization, 1 if self.throughput else self.threads)
        self.input_name = self.session.get_inputs()[0].name
        available = {o.name for o in self.session.get_outputs()}
        self.output_names = [n for n in self.output_names if n in available]

    def _model_bytes(self, graph: Optional[Graph], extra_outputs: Sequence[str]) -> Union[str, bytes]:
        source = graph if graph is not None else self.directory / self.io.runtime.get("file", "model.onnx")
        if isinstance(source, Path):
            refuse_outside_data(source)
        if not extra_outputs and isinstance(source, (Path, bytes)):
            return str(source) if isinstance(source, Path) else source
        import onnx

        if isinstance(source, Path):  # weights stay in their file: the graph alone is re-serialized (< 2 GB)
            model = onnx.load(str(source), load_external_data=False)
            self.data_folder = source.parent if external_locations(model) else None
        else:
            model = onnx.ModelProto.FromString(source) if isinstance(source, bytes) else source
        if not needs_external_data(model):
            return expose_outputs(model, extra_outputs).SerializeToString()
        # An in-memory graph over 2 GB cannot be serialized: it runs from a file kept until close()
        self.scratch = tempfile.TemporaryDirectory(prefix="tome-ort-graph-")
        return str(save_onnx(expose_outputs(model, extra_outputs), Path(self.scratch.name) / "model.onnx"))

    def _session(self, optimization: str, threads: Optional[int], options: Any = None):
        import onnxruntime as ort

        options = options or session_options(optimization, threads)
        if self.data_folder is not None:  # a graph given as bytes finds its data files there
            options.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(self.data_folder))
        return ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])

    def _infer(self, batch: np.ndarray, names: Sequence[str]) -> Dict[str, np.ndarray]:
        return dict(zip(names, self.session.run(list(names), {self.input_name: batch})))

    def _infer_many(self, batches: Sequence[np.ndarray]) -> List[np.ndarray]:
        if self.streams == 1:
            return super()._infer_many(batches)
        with ThreadPoolExecutor(self.streams) as pool:  # ORT releases the GIL while it runs
            return list(pool.map(lambda b: self._infer(b, [self.primary])[self.primary], batches))

    def profile(self, batch: np.ndarray) -> List[Dict[str, Any]]:
        """ONNX Runtime's profiler events of one run of ``batch`` in a fresh session with the same settings."""
        with tempfile.TemporaryDirectory(prefix="tome-ort-profile-") as tmp:
            opts = session_options(self.optimization, self.threads)
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / "profile")
            session = self._session(self.optimization, self.threads, opts)
            session.run(None, {self.input_name: self.check(batch)})
            return json.loads(Path(session.end_profiling()).read_text())

    def close(self) -> None:
        super().close()  # first: calls in other threads finish before the session goes
        self.session = None
        if self.scratch is not None:
            self.scratch.cleanup()
