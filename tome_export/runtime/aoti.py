"""Runner for the ``aoti`` and ``aoti-cuda`` targets: an AOTInductor package, ``model.pt2``.

The package holds the compiled model (C++ and, on CUDA, Triton kernels) and its weights, so running it needs torch
and nothing of the build stack: no timm, onnx, PyYAML or model code (``pip install 'tome-export[aoti]'``). A
package is compiled for one machine kind and loads only where that fits, which this runner checks before torch
loads the compiled library: a CPU package needs the vector instructions it was compiled for (an AVX-512 package
would stop an AVX2-only CPU with an illegal instruction), a CUDA package needs a GPU, and either needs a torch close
to the one that compiled it (recorded as ``runtime.torch``; a mismatch that fails to load says so).

An ``aoti-cuda`` build made without a GPU holds only the exported program: the runner refuses it until
``tome-export engine DIR`` has compiled, validated and recorded the package on the GPU machine.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import UserError
from .base import ArtifactIO, Runner

PACKAGE = "model.pt2"  # the compiled package
PROGRAM = "exported_program.pt2"  # torch.export.save of what an aoti-cuda package is compiled from

# The vector instruction sets AOTInductor records in a CPU package (its AOTI_CPU_ISA metadata) and how torch
# tells whether this CPU has them.
CPU_ISAS: Dict[str, str] = {"AVX2": "_is_avx2_supported", "AVX512": "_is_avx512_supported"}


def cpu_isa_missing(torch: Any, isa: Optional[str]) -> bool:
    """Whether this CPU lacks the vector instructions a CPU package was compiled for (unknown names: no)."""
    check = getattr(torch.cpu, CPU_ISAS.get(str(isa).upper(), ""), None)
    return check is not None and not check()


def load_package(torch: Any, path: str, device: str, runners: int = 1) -> Callable[[Any], List[Any]]:
    """The package at ``path`` as ``run(images) -> [outputs]``.

    torch's package loader itself (what ``torch._inductor.aoti_load_package`` wraps) loads in milliseconds;
    the wrapper first imports all of Inductor, seconds of a cold start. The wrapper is the fallback for a torch
    whose loader takes other arguments.
    """
    index = 0 if device == "cuda" else -1
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, runners, index)
        return lambda images: list(loader.boxed_run([images]))
    except (AttributeError, TypeError):
        import torch._inductor

        compiled = torch._inductor.aoti_load_package(path)
        return lambda images: _flat(compiled(images))


def _flat(outputs: Any) -> List[Any]:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


class AOTIRunner(Runner):
    """Runs ``model.pt2`` with torch tensors on its device; numpy in, numpy out.

    ``threads``: the threads of the package's parallel loops (torch's intra-op thread count, set for the calling
    thread during each call and restored after it; None: torch's default). ``throughput`` changes nothing: calls
    run one at a time, each on every thread.

    Thread-safe: one runner may be shared by any number of threads; this class runs their calls one at a time,
    and the package's own threads work in parallel within each call.
    """

    backend = "aoti"
    concurrent = False
    libraries = ("torch",)

    def __init__(self, io: ArtifactIO, threads: Optional[int] = None, throughput: bool = False,
                 extra_outputs: Sequence[str] = ()) -> None:
        import torch  # ImportError: runtime.load names the extra to install

        super().__init__(io, threads, throughput, extra_outputs)
        self.torch = torch
        runtime = io.runtime
        self.device = str(runtime.get("device", "cpu"))
        path = self.directory / str(runtime.get("file", PACKAGE))
        self._check_loadable(runtime, path)
        try:
            self.package: Optional[Callable[[Any], List[Any]]] = load_package(torch, str(path), self.device)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"torch {torch.__version__} could not load {path.name} (compiled with torch "
                            f"{runtime.get('torch', '?')}): {first}; rebuild the artifact with this torch") from None
        self.output_names = [n for n in self.output_names if n in io.outputs]  # a package exposes no intermediates

    def _check_loadable(self, runtime: Any, path: Any) -> None:
        torch = self.torch
        if runtime.get("compiled") is False:
            raise UserError(f"{str(self.directory)!r} holds no compiled {PACKAGE}: this {self.io.target} build was "
                            f"made without a GPU; run `tome-export engine {self.directory}` on the GPU machine to "
                            f"compile, validate and record it")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{path.name} is a CUDA package: it runs on an NVIDIA GPU, and torch sees none here")
        if self.device == "cpu" and cpu_isa_missing(torch, runtime.get("cpu_isa")):
            raise UserError(f"{path.name} was compiled for CPUs with {runtime.get('cpu_isa')} and this CPU lacks it: "
                            f"rebuild the artifact on (a CPU like) this one")

    def _infer(self, batch: np.ndarray, names: Sequence[str]) -> Dict[str, np.ndarray]:
        torch = self.torch
        default = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        try:
            with torch.inference_mode():
                outputs = self.package(torch.from_numpy(batch).to(self.device))
                by_name = dict(zip(self.io.outputs, outputs))
                return {name: by_name[name].cpu().numpy() for name in names}
        finally:
            if self.threads:
                torch.set_num_threads(default)

    def accelerator(self) -> Optional[Dict[str, str]]:
        if self.device != "cuda":
            return None
        major, minor = self.torch.cuda.get_device_capability(0)
        return {"name": self.torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}

    def close(self) -> None:
        self.package = None  # the loader frees the library and its weights when collected
        super().close()
