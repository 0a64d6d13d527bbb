"""The fused CUDA path's wiring against the portable lowerings, on the CPU.

The model-level wiring runs the operators' CPU implementation with the fused path forced, in both merge designs
(three kernels per block, one). The kernels themselves are checked in test_kernels_interpreted.py.
"""

from __future__ import annotations

import pytest
import torch

from tome_testing.models import make_model
from tome_export import patch
from tome_export.kernels import designs, fused_merge
from tome_export.kernels.designs import Design
from tome_export.models import base

MERGES = [Design(("mask",), "three"), Design(("mask",), "one")]

@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Run the fused path on CPU tensors (the operator's CPU implementation stands in for the kernel)."""
    monkeypatch.setattr(fused_merge, "available", lambda x: not torch.compiler.is_exporting())


@pytest.mark.parametrize("kind, merge", [(kind, MERGES[0]) for kind in ("vit", "distilled", "avgpool", "layerscale")]
                         + [("registers", MERGES[0]), ("vit", MERGES[1]), ("registers", MERGES[1])])
def test_fused_path_computes_the_portable_lowering(kind, merge, fused_on_cpu):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)  # 36 patches: r=6 merges in every block, the cap binds in the last
    fused, portable = make_model(kind, depth=4, img_size=96), make_model(kind, depth=4, img_size=96)
    patch(fused, r=6)
    patch(portable, r=6, fused=False)
    with torch.no_grad(), designs.forced(merge):
        got, want = fused(x), portable(x)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("merge", MERGES, ids=["three", "one"])
def test_fused_path_gradients_match(merge, fused_on_cpu):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    grads = []
    for fused in (True, False):
        model = make_model("vit", depth=3, img_size=96)
        patch(model, r=6, trainable=True, fused=fused)
        with designs.forced(merge):
            model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * max(1.0, grads[1].abs().max().item())


def test_source_tracing_and_decision_reading_use_the_portable_path(fused_on_cpu):
    model = make_model("vit", depth=3, img_size=96)
    patch(model, r=6)
    x = torch.randn(1, 3, 96, 96)
    logits, source = model.forward_with_source(x)
    assert source.sum(dim=-1).min() >= 1  # every final token holds at least one input token
    assert set(base.merge_destinations(model, x)) == {f"blocks.{i}" for i in range(3)}


@pytest.mark.slow  # two compilations (~10 s each)
@pytest.mark.parametrize("merge", MERGES, ids=["three", "one"])
def test_the_fused_training_step_compiles_whole(merge, fused_on_cpu):
    """Forward and backward compile as one graph (no break at the fused operators or the design choice), with
    the gradients of the eager portable model."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for compiled in (True, False):
        model = patch(make_model("vit", depth=3, img_size=64), r=4, trainable=True, fused=compiled)
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        with designs.forced(merge):
            run(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch._dynamo.reset()
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * max(1.0, grads[1].abs().max().item())
