"""The Triton kernels against their portable reference, run by Triton's interpreter on the CPU.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the checks run in a subprocess. The plan must be
identical (rows, kept tokens, sizes, merged tokens: the documented tie-break and degenerate-key rule), the merge
and its backward equal to rounding (both sum in fp32 in a fixed order), the log sizes and padded-head bias
channels equal; for the three-kernel path and for the one-kernel block, with the bias in fp32 and 16-bit. (Keys
are fp32: with 16-bit keys the kernels score in 16 bits, as a 16-bit model's portable lowering does, and near-ties
may then rank differently from the fp32 reference.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow  # the interpreter runs the kernels element by element

CHECKS = textwrap.dedent("""
    import torch
    from tome_export.kernels import plan as portable, triton_merge
    from tome_export.merge import cap_r

    PLAN = ("rows", "own", "size_out", "merged_src", "merged_dst")


    def inputs(gen, batch, heads, tokens, dim):
        keys = torch.randn(batch, heads, tokens, dim, generator=gen)
        keys[:, :, 5] = keys[:, :, 7]  # exact ties in scores and best-scores
        keys[:, :, 9 % tokens] = keys[:, :, 7]
        keys[:, :, 3] = 0.0  # degenerate keys (no direction): their scores count as -inf, as in merge.py
        keys[0, :, 11 % tokens] = float("nan")
        size = torch.randint(1, 5, (batch, tokens), generator=gen).float() if tokens % 2 else None
        return keys, size, torch.randn(batch, tokens, 136, generator=gen)


    def same_plan(got, want, n, case):
        for name in PLAN:
            assert torch.equal(getattr(got, name), getattr(want, name)), (case, name)
        ulp = 1e-6 if want.log_size.dtype == torch.float32 else torch.finfo(want.log_size.dtype).eps * 8
        assert (got.log_size[:, :n].float() - want.log_size[:, :n].float()).abs().max() <= ulp, (case, "log")
        # hi + lo carries log(size) * sqrt(d) to about the square of the precision, whichever way hi was rounded
        # (the interpreter truncates fp32 to bf16, PyTorch rounds to nearest)
        hi_lo = got.channels.float().sum(-1), want.channels.float().sum(-1)
        tol = 1e-6 if want.channels.dtype == torch.float32 else 4 * torch.finfo(want.channels.dtype).eps ** 2
        assert (hi_lo[0] - hi_lo[1]).abs().max() <= tol * hi_lo[1].abs().max().clamp(min=1), (case, "channels")


    def check(gen, case, dtype=torch.float32, block=False):
        batch, heads, tokens, dim, r, protected = case
        keys, size, x = inputs(gen, batch, heads, tokens, dim)
        r = cap_r(r, tokens, protected)
        want = portable.portable_plan(keys, size, r, protected, dtype)
        args = (size, want.own, want.size_out, want.merged_src, want.merged_dst)
        merged = portable.portable_merge(x, *args)
        if block:
            got_merged, got = triton_merge.block(x, keys, size, r, protected, dtype)
        else:
            got, got_merged = triton_merge.plan(keys, size, r, protected, dtype), triton_merge.merge(x, *args)
        same_plan(got, want, tokens - r, case)
        assert (got_merged - merged).abs().max() <= 1e-5, (case, "merge")
        grad = torch.randn(batch, tokens - r, 136, generator=gen)
        back = triton_merge.merge_backward(grad, size, want.rows, want.size_out, torch.float32)
        want_back = portable.portable_merge_backward(grad, size, want.rows, want.size_out, torch.float32)
        assert (back - want_back).abs().max() <= 1e-6, (case, "backward")


    gen = torch.Generator().manual_seed(0)
    # (batch, heads, tokens, head dim, r, protected): odd and even protected counts, none, registers, r at the
    # cap, a head dim that is not a power of two, and shapes that take every tile size of the three-kernel path
    for case in [(2, 3, 17, 16, 4, 1), (2, 3, 17, 16, 4, 2), (3, 2, 200, 64, 16, 1), (2, 12, 300, 64, 40, 1),
                 (2, 2, 50, 80, 30, 5), (2, 2, 50, 32, 12, 0), (1, 4, 9, 16, 8, 1), (30, 1, 290, 16, 40, 1),
                 (70, 1, 130, 16, 20, 1)]:
        check(gen, case)
    for case in [(2, 3, 17, 16, 4, 1), (2, 2, 41, 16, 8, 0), (2, 2, 50, 80, 30, 5), (1, 4, 9, 16, 8, 1),
                 (1, 2, 150, 16, 20, 1)]:
        check(gen, case, block=True)
    for dtype in (torch.float16, torch.bfloat16):  # the bias in a half-precision attention's dtype
        check(gen, (2, 2, 41, 16, 8, 1), dtype)
        check(gen, (2, 2, 41, 16, 8, 1), dtype, block=True)
    print("kernels ok")
""")


def test_triton_kernels_match_the_portable_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels ok" in done.stdout
