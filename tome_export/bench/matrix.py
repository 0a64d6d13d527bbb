"""What a benchmark matrix is made of: backends, precisions, variants (built once) and cells (timed).

A backend of the config is either eager PyTorch or a build target of :mod:`tome_export.backends`, run through
:func:`tome_export.runtime.load`. The mapping is explicit and never substitutes one target for another: when a
target is not registered in this installation, its cells are skipped with that reason, and they light up as soon
as the target exists.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..schedule import RSpec, r_label

if TYPE_CHECKING:  # config imports this module
    from .config import BenchConfig, ModelConfig


@dataclass(frozen=True)
class Backend:
    name: str
    target: Optional[str]  # a build target in tome_export.backends.TARGETS; None: eager PyTorch
    device: str  # cpu | cuda
    description: str


BACKENDS: Dict[str, Backend] = {b.name: b for b in (
    Backend("torch", None, "cpu", "eager PyTorch on the CPU, ToMe patched in place"),
    Backend("torch-cuda", None, "cuda", "eager PyTorch on an NVIDIA GPU"),
    Backend("onnx", "onnx", "cpu", "the exported fp32 ONNX graph in ONNX Runtime's CPU provider"),
    Backend("onnxruntime", "onnxruntime", "cpu", "ONNX Runtime CPU recipes"),
    Backend("openvino", "openvino", "cpu", "OpenVINO CPU recipes"),
    Backend("tensorrt", "tensorrt", "cuda", "TensorRT engines"),
    Backend("tensorrt-rtx", "tensorrt-rtx", "cuda", "TensorRT-RTX engines"),
)}

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp8")

# Eager PyTorch precisions: bf16/fp16 convert weights and activations (``model.to(dtype)``); int8 is dynamic
# quantization of the Linear layers (int8 weights, activations quantized per batch), which runs on the CPU only.
TORCH_PRECISIONS = ("fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class Variant:
    """One model state: built (or patched) and loaded once, timed at every batch size and thread count."""

    model: "ModelConfig"
    backend: str
    precision: str
    r: RSpec

    @property
    def r_label(self) -> str:
        return r_label(self.r)

    @property
    def id(self) -> str:
        return f"{self.model.key}/{self.backend}/{self.precision}/{self.r_label}"

    @property
    def is_baseline(self) -> bool:
        return self.precision == "fp32" and self.r_label == "r0"


@dataclass(frozen=True)
class Cell:
    variant: Variant
    batch: int
    threads: int

    @property
    def id(self) -> str:
        return f"{self.variant.id}/b{self.batch}/t{self.threads}"

    @property
    def group(self) -> Tuple[str, str, int, int]:
        """Cells of one group are timed side by side (interleaved); speedups are taken within a group."""
        return (self.variant.model.key, self.variant.backend, self.batch, self.threads)


def r_text(r: RSpec) -> str:
    """The CLI form of a schedule (``16``, ``16:-1.0``, ``8,8,...``), which ``parse_r_text`` reads back."""
    if isinstance(r, int):
        return str(r)
    if isinstance(r, tuple):
        return f"{r[0]}:{float(r[1])}"
    return ",".join(str(v) for v in r)


def variants(config: "BenchConfig") -> List[Variant]:
    return [Variant(m, b, p, r) for m in config.models for b in config.backends for p in config.precisions
            for r in (m.r if m.r is not None else config.r)]


def cells(config: "BenchConfig") -> List[Cell]:
    return [Cell(v, batch, t) for v in variants(config) for t in config.threads for batch in config.batches]


def gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install is the same as no GPU here
        return False


def skip_reason(backend: str, precision: str, gpu: bool) -> Optional[str]:
    """Why a (backend, precision) cannot run in this installation, or None when it can be tried."""
    from ..backends import TARGETS
    from ..runtime import RUNNERS

    spec = BACKENDS[backend]
    if spec.device == "cuda" and not gpu:
        return f"{backend} needs an NVIDIA GPU; none is available here (torch.cuda.is_available() is False)"
    if spec.target is None:
        if precision not in TORCH_PRECISIONS:
            return f"eager PyTorch has no {precision} mode here (available: {', '.join(TORCH_PRECISIONS)})"
        if precision == "int8" and spec.device == "cuda":
            return "eager PyTorch int8 (dynamic quantization) runs on the CPU only"
        return None
    target = TARGETS.get(spec.target)
    if target is None:
        return (f"build target {spec.target!r} is not part of this installation "
                f"(registered targets: {', '.join(sorted(TARGETS))})")
    if precision not in target.precisions:
        return f"target {spec.target} offers {', '.join(target.precisions)}, not {precision}"
    for module in target.requires:
        if importlib.util.find_spec(module) is None:
            return f"target {spec.target} needs the Python package {module!r}: pip install 'tome-export[{spec.target}]'"
    if spec.target not in RUNNERS:
        return f"target {spec.target} builds artifacts but this installation has no runner to time them"
    return None
