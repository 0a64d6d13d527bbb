"""The program an AOTInductor package is compiled from: the patched model, exported as it runs on its device.

:func:`export_program` wraps the model so that the package takes what every artifact takes (fp32 images) and
returns its task's outputs, floats as fp32 (and the source map where the build traces it), the model in between in
the build's precision,
and traces it with ``torch.export`` on the device the package is for: on a CUDA device the patched model runs (and
so exports) its CUDA path, the fused ToMe operators included (:func:`kernels_in_export`), on the CPU its portable
lowering. :func:`compile_package` compiles a program with AOTInductor; :func:`program_facts` says what a program
contains, for the manifest.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from ...graph_names import INPUT_NAME, OUTPUT_NAME, SOURCE_NAME

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Inductor settings per device. CPU: OpenMP loops take the thread count when they run (torch.set_num_threads),
# not the building machine's core count, which would otherwise be compiled in.
INDUCTOR_CONFIGS: Dict[str, Dict[str, Any]] = {"cpu": {"cpp.dynamic_threads": True}, "cuda": {}}
OWN_OPS = "tome_export."  # the namespace of the package's own operators (the fused ToMe kernels)


class ImagesToLogits(torch.nn.Module):
    """fp32 images in, the task's outputs out (logits, embeddings, features or tokens; floats as fp32, then the source
    map with ``with_source``), the model in its own dtype."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, with_source: bool) -> None:
        super().__init__()
        self.model, self.dtype, self.with_source = model, dtype, with_source

    def forward(self, images: torch.Tensor) -> Any:
        outputs = tuple(o.float() if o.is_floating_point() else o
                        for o in self.model.tome_outputs(images.to(self.dtype), self.with_source))
        return outputs[0] if len(outputs) == 1 else outputs


def export_program(model: torch.nn.Module, precision: str, device: str, image_shape: Sequence[int], batch: int,
                   dynamic_batch: bool, max_batch: int, with_source: bool) -> Any:
    """``torch.export`` of a copy of ``model`` in ``precision`` on ``device`` (``model`` itself is left alone).

    A dynamic batch is traced at 2 images (a batch of 1 would be specialised) and accepts 1 to ``max_batch``.
    """
    dtype = DTYPES[precision]
    wrapped = ImagesToLogits(copy.deepcopy(model).to(device=device, dtype=dtype), dtype, with_source).eval()
    example = torch.randn(2 if dynamic_batch else batch, *image_shape, generator=torch.Generator().manual_seed(0))
    return trace(wrapped, example.to(device), max_batch if dynamic_batch else None)


def trace(wrapped: ImagesToLogits, example: torch.Tensor, max_batch: Optional[int]) -> Any:
    """``torch.export`` of ``wrapped`` on ``example`` (``max_batch``: a dynamic batch of 1 to that many images),
    keeping the fused ToMe operators where ``example`` is on CUDA."""
    shapes = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=max_batch)}} if max_batch else None
    with torch.no_grad(), kernels_in_export(example.device.type):
        return torch.export.export(wrapped, (example,), dynamic_shapes=shapes)


def kernels_in_export(device: str) -> Any:
    """On CUDA the export keeps the fused ToMe operators, whose Triton kernels AOTInductor then compiles into the
    package (ONNX exports trace the portable lowering; ``fused_merge.in_exports`` lifts that for this block).
    Elsewhere, or with a kernels module that has no such switch, the export traces what the model runs."""
    from ...kernels import fused_merge

    switch = getattr(fused_merge, "in_exports", None)
    return switch() if device == "cuda" and switch is not None else contextlib.nullcontext()


def compile_package(program: Any, path: Path, device: str) -> Dict[str, Any]:
    """Compile ``program`` into the AOTInductor package ``path`` (a ``.pt2``); returns facts for the manifest."""
    started = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                             inductor_configs=dict(INDUCTOR_CONFIGS[device]))
    facts: Dict[str, Any] = {"compile_seconds": round(time.perf_counter() - started, 1),
                             "inductor_configs": INDUCTOR_CONFIGS[device], "bytes": Path(path).stat().st_size}
    if device == "cpu":  # what the compiled code needs of the CPU that runs it
        metadata = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).get_metadata()
        facts["cpu_isa"] = metadata.get("AOTI_CPU_ISA")
    return facts


def program_facts(program: Any) -> Dict[str, Any]:
    """What the exported program runs: its operators (the package's own ones by name) and so the lowering."""
    ops = Counter(str(node.target) for node in program.graph.nodes if node.op == "call_function")
    own = {op: n for op, n in sorted(ops.items()) if op.startswith(OWN_OPS)}
    lowering = "fused ToMe operators" if own else "portable ToMe lowering (aten operators)"
    return {"lowering": lowering, "tome_operators": own, "operators": sum(ops.values())}


def run_program(program: Any, device: str, names: Sequence[str] = (OUTPUT_NAME, SOURCE_NAME)
                ) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
    """The exported program run eagerly by PyTorch on ``device``: a batch of images -> its outputs, by ``names`` (the
    artifact's outputs, in order)."""
    module = program.module()

    def infer(batch: np.ndarray) -> Dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(batch).to(device))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(names, (o.cpu().numpy() for o in outputs)))
    return infer


def versions(device: str) -> Mapping[str, str]:
    """torch (and on CUDA, Triton and CUDA) that compiled or would compile the package."""
    found = {"torch": torch.__version__}
    if device == "cuda":
        found["cuda"] = str(torch.version.cuda)
        try:
            import triton

            found["triton"] = triton.__version__
        except ImportError:
            found["triton"] = "not installed"
    return found
