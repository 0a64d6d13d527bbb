"""The fused CUDA path (Triton kernel + batched matmul) against the portable lowerings, on the CPU.

The kernel itself runs under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before
Triton is imported); the model-level wiring runs the operator's CPU implementation with the fused path forced.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tome_testing.models import make_model
from tome_export import patch
from tome_export.kernels import fused_merge
from tome_export.models import base

pytest.importorskip("triton")

INTERPRETED = textwrap.dedent("""
    import torch
    from tome_export.kernels import plan as portable, triton_merge
    from tome_export.merge import cap_r

    gen = torch.Generator().manual_seed(0)
    cases = [(2, 3, 17, 16, 4, 1), (2, 3, 17, 16, 4, 2), (3, 2, 200, 64, 16, 1), (2, 12, 300, 64, 40, 1),
             (2, 2, 50, 80, 30, 5), (2, 2, 50, 32, 12, 0), (1, 4, 9, 16, 8, 1), (30, 1, 290, 16, 40, 1),
             (70, 1, 130, 16, 20, 1)]
    for batch, heads, tokens, dim, r, protected in cases:
        keys = torch.randn(batch, heads, tokens, dim, generator=gen)
        keys[:, :, 5] = keys[:, :, 7]  # exact ties in scores and best-scores
        keys[:, :, 9 % tokens] = keys[:, :, 7]
        keys[:, :, 3] = 0.0  # degenerate keys (no direction): their scores count as -inf, as in merge.py
        keys[0, :, 11 % tokens] = float("nan")
        size = torch.randint(1, 5, (batch, tokens), generator=gen).float() if tokens % 2 else None
        r = cap_r(r, tokens, protected)
        x = torch.randn(batch, tokens, 136, generator=gen)
        got = triton_merge.plan(keys, size, r, protected, torch.float32)
        want = portable.portable_plan(keys, size, r, protected, torch.float32)
        n = tokens - r
        for name in ("rows", "own", "size_out", "merged_src", "merged_dst"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (batch, tokens, r, protected, name)
        assert (got.log_size[:, :n] - want.log_size[:, :n]).abs().max() <= 1e-6, "log sizes"
        args = (size, want.own, want.size_out, want.merged_src, want.merged_dst)
        merged = triton_merge.merge(x, *args)
        assert (merged - portable.portable_merge(x, *args)).abs().max() <= 1e-5, "merge"
        grad = torch.randn(batch, n, 136, generator=gen)
        back = triton_merge.merge_backward(grad, size, want.rows, want.size_out, torch.float32)
        assert (back - portable.portable_merge_backward(grad, size, want.rows, want.size_out, torch.float32)
                ).abs().max() <= 1e-6, "backward"
    print("kernels ok")
""")


def _run_interpreted(code: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # the Triton interpreter runs the kernels element by element
def test_triton_kernel_matches_portable_lowering_under_interpreter():
    _run_interpreted(INTERPRETED)


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Run the fused path on CPU tensors (the operator's CPU implementation stands in for the kernel)."""
    monkeypatch.setattr(fused_merge, "available", lambda x: not torch.compiler.is_exporting())


@pytest.mark.parametrize("kind", ["vit", "distilled", "registers", "avgpool", "layerscale"])
def test_fused_path_computes_the_portable_lowering(kind, fused_on_cpu):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    fused, portable = make_model(kind, depth=4), make_model(kind, depth=4)
    patch(fused, r=16)
    patch(portable, r=16, fused=False)
    with torch.no_grad():
        got, want = fused(x), portable(x)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_fused_path_gradients_match(fused_on_cpu):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    grads = []
    for fused in (True, False):
        model = make_model("vit", depth=3)
        patch(model, r=12, trainable=True, fused=fused)
        model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * max(1.0, grads[1].abs().max().item())


def test_source_tracing_and_decision_reading_use_the_portable_path(fused_on_cpu):
    model = make_model("vit", depth=3)
    patch(model, r=12)
    x = torch.randn(1, 3, 224, 224)
    logits, source = model.forward_with_source(x)
    assert source.sum(dim=-1).min() >= 1  # every final token holds at least one input token
    assert set(base.merge_destinations(model, x)) == {f"blocks.{i}" for i in range(3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channel_attention_is_the_masked_attention(dtype):
    """The extra q/k channel computes proportional attention at least as exactly as the additive mask."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 64, generator=gen).to(dtype) for _ in range(3))
    bias = torch.randint(1, 200, (2, 1, 1, 37), generator=gen).float().log()
    want = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8 + bias.double(), dim=-1) @ v.double()
    masked = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(dtype))
    got = base.channel_attention(q, k, v, bias)
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.double() - want).abs().max() <= 1.5 * (masked.double() - want).abs().max() + 1e-6
