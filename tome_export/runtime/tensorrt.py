"""Runner for the ``tensorrt`` and ``tensorrt-rtx`` targets: ``model.engine`` on an NVIDIA GPU.

Needs the engine's library (``tensorrt`` or ``tensorrt_rtx``) and a CUDA GPU. Device memory comes from
cuda-python when it is installed (no torch on deployment machines), else from torch.cuda; neither is imported
before a runner is created. Without them, loading fails with a message that says what is missing; there is
no CPU fallback that would pretend to be the engine.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import UnvalidatedEngineWarning, UserError
from .base import ArtifactIO, Runner


class _CudaPython:
    """Device buffers and a stream through cuda-python's runtime bindings."""

    def __init__(self) -> None:
        cudart = _cudart()
        self.cudart = cudart
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count == 0:
            raise UserError(f"no CUDA GPU is available ({err.name if hasattr(err, 'name') else err}): "
                            f"TensorRT engines run only on an NVIDIA GPU with its driver")
        self.stream = self._ok(cudart.cudaStreamCreate())
        self.handle = int(self.stream)

    def _ok(self, result: Tuple) -> Any:
        err, *value = result if isinstance(result, tuple) else (result,)
        if err != self.cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error {err}")
        return value[0] if value else None

    def alloc(self, nbytes: int) -> int:
        return int(self._ok(self.cudart.cudaMalloc(max(nbytes, 1))))

    def free(self, ptr: int) -> None:
        self.cudart.cudaFree(ptr)

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream))

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream))

    def synchronize(self) -> None:
        self._ok(self.cudart.cudaStreamSynchronize(self.stream))


class _TorchCuda:
    """The same through torch.cuda (when cuda-python is not installed)."""

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise UserError("no CUDA GPU is available (torch.cuda.is_available() is False): TensorRT engines run "
                            "only on an NVIDIA GPU with its driver")
        self.torch = torch
        self.stream_obj = torch.cuda.Stream()
        self.handle = self.stream_obj.cuda_stream
        self.buffers: Dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        t = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device="cuda")
        self.buffers[t.data_ptr()] = t
        return t.data_ptr()

    def free(self, ptr: int) -> None:
        self.buffers.pop(ptr, None)

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        src = self.torch.from_numpy(array.view(np.uint8).reshape(-1))
        with self.torch.cuda.stream(self.stream_obj):
            self.buffers[ptr][: array.nbytes].copy_(src, non_blocking=False)

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        with self.torch.cuda.stream(self.stream_obj):
            host = self.buffers[ptr][: array.nbytes].cpu().numpy()
        array.view(np.uint8).reshape(-1)[:] = host

    def synchronize(self) -> None:
        self.stream_obj.synchronize()


def _device() -> Any:
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        return _TorchCuda()
    except ImportError:
        raise UserError("running a TensorRT engine needs cuda-python (pip install cuda-python) or torch with CUDA "
                        "for device memory; neither is installed") from None


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    return cudart


def cuda_device() -> Optional[Dict[str, str]]:
    """The CUDA GPU engines run on here (name, compute capability), asked of cuda-python, else torch.cuda (what
    :class:`TensorRTRunner` allocates with); None without a GPU or without either package."""
    try:
        cudart = _cudart()
    except ImportError:
        cudart = None
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or count == 0:
            return None
        err, props = cudart.cudaGetDeviceProperties(0)
        if err != cudart.cudaError_t.cudaSuccess:
            return None
        name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
        return {"name": name, "compute_capability": f"{props.major}.{props.minor}"}
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:  # no torch, or a CUDA build of torch without a driver
        return None


class TensorRTRunner(Runner):
    """Runs ``model.engine`` with the library the runtime settings name (``tensorrt`` or ``tensorrt_rtx``).

    Outputs are the engine's own; intermediate tensors cannot be exposed (``extra_outputs`` is refused).

    Thread-safe by serialising: one execution context and one set of device buffers serve every call, so calls
    from several threads run one at a time (:class:`~tome_export.runtime.base.Runner` holds the lock).
    """

    backend = "tensorrt"

    def __init__(self, io: ArtifactIO, threads: Optional[int] = None, throughput: bool = False,
                 extra_outputs: Sequence[str] = ()) -> None:
        super().__init__(io, threads, throughput)
        if extra_outputs:
            raise UserError("a TensorRT engine's outputs are fixed when it is built: it cannot expose "
                            f"{', '.join(extra_outputs)}")
        self.buffers: Dict[str, Tuple[int, int]] = {}  # name -> (pointer, bytes)
        module = str(io.runtime.get("library", "tensorrt"))
        self.backend = module
        engine_path = self.directory / io.runtime.get("file", "model.engine")
        if not engine_path.is_file():
            raise UserError(f"{str(self.directory)!r} holds no {engine_path.name}: it was not built on this machine "
                            f"({io.runtime.get('engine_note', 'no engine')}); on the target GPU machine run "
                            f"`tome-export engine {self.directory}` (or ./build_engine.sh), then load it again")
        if io.runtime.get("engine_validated") is False:
            warnings.warn(f"{engine_path.name} in {str(self.directory)!r} is checksummed but was never validated "
                          f"(only the ONNX it was built from was): run `tome-export engine {self.directory} "
                          f"--validate-only` on the GPU machine to compare it with the ONNX and record the result",
                          UnvalidatedEngineWarning, stacklevel=3)
        try:
            trt = importlib.import_module(module)
        except (ImportError, OSError):
            raise UserError(f"running this {io.target} engine needs the Python package {module!r} and an NVIDIA "
                            f"GPU; {module!r} is not installed: {io.runtime.get('install', 'install it')}") from None
        self.device = _device()
        self.trt = trt
        self.engine = self._deserialize(trt, engine_path, module)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.input_name = next(n for n, i in zip(names, is_input) if i)
        self.output_names = [n for n, i in zip(names, is_input) if not i]
        if self.dynamic_batch:
            low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.batch_range = (int(low[0]), int(high[0]))
        else:
            self.batch_range = (self.batch_size, self.batch_size)

    def _deserialize(self, trt: Any, engine_path: Any, module: str) -> Any:
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise UserError(f"{engine_path} could not be loaded by {module} {getattr(trt, '__version__', '')}: it was "
                            f"built by another version or for another GPU; rebuild it there with ./build_engine.sh")
        return engine

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.device.free(ptr)
            ptr = self.device.alloc(nbytes)
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def _infer(self, batch: np.ndarray, names: Sequence[str]) -> Dict[str, np.ndarray]:
        low, high = self.batch_range
        if not low <= len(batch) <= high:
            raise UserError(f"batch of {len(batch)} images is outside the engine's profile {low}..{high}: "
                            f"rebuild with --dynamic-batch MIN:OPT:MAX covering it")
        self.context.set_input_shape(self.input_name, batch.shape)
        src = self._buffer(self.input_name, batch.nbytes)
        self.device.to_device(src, batch)
        self.context.set_tensor_address(self.input_name, src)
        outputs = {}
        for name in self.output_names:  # every output needs an address, even one not asked for
            shape = tuple(self.context.get_tensor_shape(name))
            host = np.empty(shape, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))
            self.context.set_tensor_address(name, self._buffer(name, host.nbytes))
            outputs[name] = host
        if not self.context.execute_async_v3(self.device.handle):
            raise RuntimeError("TensorRT failed to enqueue the inference")
        for name, host in outputs.items():
            self.device.to_host(host, self.buffers[name][0])
        self.device.synchronize()
        return {name: outputs[name] for name in names}

    def accelerator(self) -> Optional[Dict[str, str]]:
        return cuda_device()

    def close(self) -> None:
        super().close()  # first: calls in other threads finish before the buffers go
        for ptr, _ in getattr(self, "buffers", {}).values():
            try:
                self.device.free(ptr)
            except Exception:  # the context may already be gone at interpreter exit
                pass
        self.buffers = {}
        self.context = self.engine = None

    def __del__(self) -> None:
        self.close()
