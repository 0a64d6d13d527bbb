"""The runner every backend implements: inputs checked once here, named outputs, resources freed on close.

A runner runs one artifact, described by an :class:`ArtifactIO` (where its files are, its input and outputs, its
preprocessing and the runtime settings its build validated with). Deployments get one from
:func:`tome_export.runtime.load`; builds make one for the artifact they are writing, so validation, merge-decision
measurement, ``visualize --artifact``, the bench and deployments all run the same code.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import UserError
from ..graph_names import OUTPUT_NAME
from ..manifest import InputSpec, Manifest
from ..preprocess import Preprocessing
from ..resources import check_threads


@dataclass(frozen=True)
class ArtifactIO:
    """What a runner needs to run an artifact."""

    directory: Path
    input: InputSpec
    preprocessing: Optional[Preprocessing]  # None for a bare graph run on arrays
    outputs: Tuple[str, ...] = (OUTPUT_NAME,)
    runtime: Mapping[str, Any] = field(default_factory=dict)  # the runner's settings (file, compile config, ...)
    target: str = ""

    @classmethod
    def from_manifest(cls, directory: Path, manifest: Manifest, runtime: Optional[Mapping[str, Any]] = None
                      ) -> "ArtifactIO":
        return cls(Path(directory), manifest.input, Preprocessing.from_dict(manifest.preprocessing),
                   tuple(manifest.outputs), dict(runtime if runtime is not None else manifest.runtime),
                   manifest.target)


# Runners still open when the interpreter exits, closed while it is whole. Left to the final teardown, a backend's
# objects can be destroyed (or its library's static state torn down) while a daemon thread is still inside a call:
# ONNX Runtime then aborts ("terminate called", exit 134) and OpenVINO aborts or hangs.
_OPEN: "weakref.WeakSet[Runner]" = weakref.WeakSet()
CLOSE_WAIT_S = 30.0  # how long closing waits for calls in progress in other threads


@atexit.register
def _close_open_runners() -> None:
    for runner in list(_OPEN):
        if runner.stop_calls():  # no call is inside the backend any more: safe to free
            runner.close()
    gc.collect()


class Runner:
    """Runs one artifact. ``runner(batch) -> its first output`` (logits, embeddings, features or tokens, as its task
    says); ``runner.infer(batch) -> {output name: array}``.

    ``extra_outputs``: names of intermediate tensors to return as well (where the backend can expose them),
    e.g. the merge-decision tensors. Use as a context manager, or call :meth:`close`, to free the backend's
    resources (sessions, compiled models, device memory) before the object is collected.

    Thread safety: one runner may be shared by any number of threads. Backends whose ``_infer`` is safe to call
    concurrently say so with ``concurrent = True``; for the others this class runs one call at a time. Closing
    refuses new calls, waits (up to :data:`CLOSE_WAIT_S`) for those in progress, then frees the backend; a runner
    left open is closed that way when the interpreter exits, so daemon threads still calling it cannot take the
    process down with them (their next call raises a UserError instead).
    """

    backend = "base"
    concurrent = False  # whether _infer may run in several threads at once
    libraries: Tuple[str, ...] = ()  # modules whose version decides what it computes (default: the backend's)

    def __init__(self, io: ArtifactIO, threads: Optional[int] = None, throughput: bool = False,
                 extra_outputs: Sequence[str] = ()) -> None:
        check_threads(threads)  # before the backend is handed a count it would reject with a traceback (or take 0)
        self.io = io
        self.directory = io.directory
        self.threads = threads
        self.throughput = throughput
        self.dynamic_batch = io.input.dynamic_batch
        self.batch_size: Optional[int] = io.input.batch
        self.image_shape = io.input.image_shape
        self.dtype = np.dtype(io.input.dtype)
        self.preprocessing = io.preprocessing
        self.output_names: List[str] = list(io.outputs) + [n for n in extra_outputs if n not in io.outputs]
        self.primary = io.outputs[0] if io.outputs else OUTPUT_NAME  # what ``runner(batch)`` returns
        self.closed = False
        self._serial = threading.Lock()
        self._calls = 0  # calls inside the backend now
        self._state = threading.Condition()
        _OPEN.add(self)

    def preprocess(self, image: Union[Image.Image, str, os.PathLike]) -> np.ndarray:
        """One image (PIL or path) -> ``(C, H, W)`` array, as the model was trained."""
        if self.preprocessing is None:
            raise UserError(f"{self!r} runs a bare graph: it has no preprocessing; pass preprocessed arrays")
        return self.preprocessing(image)

    def preprocess_batch(self, images: Sequence[Union[Image.Image, str, os.PathLike]]) -> np.ndarray:
        return np.stack([self.preprocess(img) for img in images])

    def check(self, batch: Any) -> np.ndarray:
        if self.closed:
            raise UserError(f"{self!r} was closed: load the artifact again")
        if not isinstance(batch, np.ndarray):
            raise UserError(f"expected a numpy array of shape (N, {', '.join(map(str, self.image_shape))}), "
                            f"got {type(batch).__name__}")
        if batch.dtype != self.dtype:
            raise UserError(f"expected dtype {self.dtype}, got {batch.dtype}: convert with batch.astype(np.{self.dtype})")
        want = (self.batch_size if self.batch_size is not None else "N", *self.image_shape)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.image_shape or (
                self.batch_size is not None and batch.shape[0] != self.batch_size) or batch.shape[0] < 1:
            hint = "" if self.batch_size is None else " (this artifact has a static batch; rebuild with --dynamic-batch)"
            raise UserError(f"expected input shape {want}, got {tuple(batch.shape)}{hint}")
        return np.ascontiguousarray(batch)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """The first output of a preprocessed batch ``(N, C, H, W)``: logits ``(N, classes)`` for a classifier,
        else its task's first output (``embeddings``, ``features``, ``tokens``)."""
        return self._run(self.check(batch), [self.primary])[self.primary]

    def infer(self, batch: np.ndarray, outputs: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        """Named outputs of a preprocessed batch: ``outputs`` (default: every output, extra outputs included)."""
        if isinstance(outputs, str):  # one name, not its letters
            outputs = [outputs]
        names = list(outputs) if outputs is not None else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise UserError(f"the artifact has no output {unknown[0]!r}; it has {', '.join(self.output_names)}")
        return self._run(self.check(batch), names)

    def run_many(self, batches: Sequence[np.ndarray]) -> List[np.ndarray]:
        """The first output of several batches; in throughput mode backends overlap them (batch serving)."""
        checked = [self.check(b) for b in batches]
        with self._call(), (contextlib.nullcontext() if self.concurrent else self._serial):
            return self._infer_many(checked)

    def _run(self, batch: np.ndarray, names: Sequence[str]) -> Dict[str, np.ndarray]:
        with self._call(), (contextlib.nullcontext() if self.concurrent else self._serial):
            return self._infer(batch, names)

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """One call inside the backend: refused once the runner is closing, counted so closing can wait for it."""
        with self._state:
            if self.closed:
                raise UserError(f"{self!r} was closed: load the artifact again")
            self._calls += 1
        try:
            yield
        finally:
            with self._state:
                self._calls -= 1
                self._state.notify_all()

    def stop_calls(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Refuse new calls and wait for those in progress; whether none is left inside the backend."""
        state = getattr(self, "_state", None)
        if state is None:  # a subclass that failed before Runner.__init__ ran
            self.closed = True
            return True
        with state:
            self.closed = True
            return state.wait_for(lambda: self._calls == 0, timeout=timeout)

    def _infer(self, batch: np.ndarray, names: Sequence[str]) -> Dict[str, np.ndarray]:  # backends implement this
        raise NotImplementedError

    def _infer_many(self, batches: Sequence[np.ndarray]) -> List[np.ndarray]:  # backends may overlap requests
        return [self._infer(b, [self.primary])[self.primary] for b in batches]

    def environment(self) -> Dict[str, Any]:
        """What this runner's results depend on beyond the artifact: the runner, the CPU (model, feature flags,
        ISA-limiting variables), the versions of its libraries and the device it runs on. The self-check's cache
        is keyed by it and the manifest records it as where the build validated."""
        from .machine import RUNTIME_MODULES, cpu_description, module_versions

        versions = module_versions(self.libraries or (self.backend,)) or module_versions(RUNTIME_MODULES)
        return {"runner": f"{type(self).__module__}:{type(self).__qualname__}", "versions": versions,
                "cpu": cpu_description(), "device": self.accelerator()}

    def accelerator(self) -> Optional[Dict[str, Any]]:
        """The accelerator this runner computes on (name, capability); None: the CPU. GPU runners override it."""
        return None

    def close(self) -> None:
        """Free the backend's resources; the runner cannot run afterwards. Closing twice is harmless.

        Backends free their resources after this (``super().close()`` first): calls in progress in other threads
        end before anything they use is freed.
        """
        self.stop_calls()
        _OPEN.discard(self)

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, input={(self.batch_size or 'N', *self.image_shape)})"
