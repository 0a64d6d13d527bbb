"""What can run a benchmark: backends (PyTorch or a build target), their precisions, and why a cell cannot run.

A backend is PyTorch (eager on the CPU or an NVIDIA GPU, or CUDA-graph replays) or a registered build target, whose artifacts run through
:func:`tome_export.runtime.load`; the list follows the target registry. A target is never substituted for
another: a cell that cannot run here is skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Backend:
    name: str
    target: Optional[str]  # a registered build target; None: PyTorch
    device: str  # cpu | cuda
    description: str
    cuda_graph: bool = False  # PyTorch: time replays of a captured CUDA graph rather than eager calls


EAGER = (Backend("torch", None, "cpu", "eager PyTorch on the CPU, ToMe patched in place"),
         Backend("torch-cuda", None, "cuda", "eager PyTorch on an NVIDIA GPU"),
         Backend("torch-cuda-graph", None, "cuda", "PyTorch on an NVIDIA GPU, each batch size's forward captured "
                 "once as a CUDA graph and replayed (no launch overhead)", cuda_graph=True))

# Eager PyTorch precisions: bf16/fp16 convert weights and activations (``model.to(dtype)``); int8 is dynamic
# quantization of the Linear layers (int8 weights, activations quantized per batch), which runs on the CPU only.
TORCH_PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def backends() -> Dict[str, Backend]:
    """Eager PyTorch, then every registered build target (named as the target)."""
    from ..targets import targets

    built = [Backend(t.name, t.name, t.device, t.description) for t in targets().values()]
    return {b.name: b for b in (*EAGER, *built)}


def precisions() -> Tuple[str, ...]:
    """Every precision a backend offers: eager PyTorch's, then the targets'."""
    from ..targets import targets

    return tuple(dict.fromkeys(TORCH_PRECISIONS + tuple(p for t in targets().values() for p in t.precisions)))


def skip_reason(backend: str, precision: str, gpu: bool) -> Optional[str]:
    """Why a (backend, precision) cannot run in this installation, or None when it can be tried."""
    from ..targets import targets

    spec = backends()[backend]
    if spec.device == "cuda" and not gpu:
        return f"{backend} needs an NVIDIA GPU; none is available here (torch.cuda.is_available() is False)"
    if spec.target is None:
        if precision not in TORCH_PRECISIONS:
            return f"eager PyTorch has no {precision} mode here (available: {', '.join(TORCH_PRECISIONS)})"
        if precision == "int8" and spec.device == "cuda":
            return "eager PyTorch int8 (dynamic quantization) runs on the CPU only"
        return None
    target = targets()[spec.target]
    if precision not in target.precisions:
        return f"target {spec.target} offers {', '.join(target.precisions)}, not {precision}"
    missing = target.missing_module()
    if missing is not None:
        return f"target {spec.target} needs the Python package {missing!r}: {target.install_hint}"
    return None
