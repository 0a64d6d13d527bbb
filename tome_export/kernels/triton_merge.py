"""Triton kernels behind :mod:`tome_export.kernels.fused_merge` (imported on first use).

Three kernels per merging block (or the one of ``_block_kernel``), then one more in the backward:

* ``_best_b_kernel``, one program per (image, tile of A tokens): head-mean and normalise the keys, score the
  tile against every B token, keep each A token's best score and the lowest B index reaching it;
* ``_plan_kernel``, one program per image: rank the A tokens (stable, descending), and write the merge plan:
  every input token's output row, every output row's own token, sizes, log sizes, the merged A tokens;
* ``_merge_kernel``, one program per (image, tile of output rows, tile of channels): each output row is its own
  token plus the merged tokens landing in it, size-weighted, summed in fp32 in a fixed order (no atomics; the
  merged tokens come in as one small fp32 product, so no loop waits on scalar loads);
* ``_merge_backward_kernel``: each input token's gradient is its output row's, times its weight;
* ``_block_kernel``, one program per (image, tile of channels): the three above in one launch. Every program
  of an image computes the whole matching and plan and writes the same values (a program reads only what it
  wrote itself before a barrier, so it never depends on another's progress), then merges its channels. The
  repeated matching is cheap at small batches, where the saved launches matter; which of the two a GPU runs
  at which batch is measured (:mod:`tome_export.kernels.designs`).

Memory traffic of the merge is one read and one write of the tokens, which is what a merge must cost.
Software pipelining is off (``num_stages=1``): Triton 3.6 staged the twelve unrolled head loads of the score
loop in shared memory, 0.4-0.8 MB, over the limit; the loops here run once or twice per program anyway.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
import triton
import triton.language as tl

from .plan import Plan, padded, split_sizes


def launch(kernel: Any) -> Any:
    """``kernel`` through ``torch.library.wrap_triton``, so that export and ``torch.compile`` trace the launch.

    Under ``TRITON_INTERPRET=1`` kernels are interpreted functions, which torch 2.14 passes through and
    older versions refuse: those are launched directly (the interpreter runs only in tests).
    """
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None:
        return kernel
    try:
        return wrap(kernel)
    except RuntimeError:
        return kernel


@triton.jit
def _metric_tile(keys, b, t, T, sk_b, sk_h, sk_t, sk_d, D,
                 H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Normalised head-mean keys of the ``BLOCK_T`` tokens at positions ``t``: ``(BLOCK_T, BLOCK_D)`` fp32."""
    d = tl.arange(0, BLOCK_D)
    ok = (t < T)[:, None] & (d < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for h in tl.static_range(H):  # unrolled: all heads' loads are in flight at once
        acc += tl.load(keys + b * sk_b + h * sk_h + t[:, None] * sk_t + d[None, :] * sk_d, mask=ok, other=0.0).to(
            tl.float32)
    m = acc / H
    return m / tl.sqrt(tl.sum(m * m, axis=1))[:, None]  # NaN for an all-zero row: scores NaN, counted as -inf


@triton.jit
def _best_b_tile(keys, best, dst, b, i, sk_b, sk_h, sk_t, sk_d, T, D, n_a, n_b, a0, b0,
                 H: tl.constexpr, IEEE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Best score and lowest best B index of the A tokens ``i`` of image ``b``."""
    a = _metric_tile(keys, b, a0 + 2 * i, T, sk_b, sk_h, sk_t, sk_d, D, H, BLOCK_A, BLOCK_D)
    top = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_A,), tl.int32)
    for j0 in range(0, n_b, BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        bm = _metric_tile(keys, b, tl.where(j < n_b, b0 + 2 * j, T), T, sk_b, sk_h, sk_t, sk_d, D, H, BLOCK_B, BLOCK_D)
        if IEEE:  # fp32 keys: fp32 scores, as the portable lowering computes them
            s = tl.dot(a, tl.trans(bm), input_precision="ieee")
        else:  # 16-bit keys: 16-bit normalised metrics on tensor cores, as a 16-bit model's lowering does
            s = tl.dot(a.to(keys.dtype.element_ty), tl.trans(bm.to(keys.dtype.element_ty)))
        s = tl.where((s == s) & (j < n_b)[None, :], s, float("-inf"))
        tile_top = tl.max(s, axis=1)
        better = tile_top > top  # strict: on equal scores an earlier tile's lower index stays
        arg = tl.where(better, tl.argmax(s, axis=1).to(tl.int32) + j0, arg)
        top = tl.where(better, tile_top, top)
    tl.store(best + b * n_a + i, top, mask=i < n_a)
    tl.store(dst + b * n_a + i, arg, mask=i < n_a)


@triton.jit
def _best_b_kernel(keys, best, dst, sk_b, sk_h, sk_t, sk_d, T, D, n_a, n_b, a0, b0,
                   H: tl.constexpr, IEEE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    i = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    _best_b_tile(keys, best, dst, tl.program_id(0), i, sk_b, sk_h, sk_t, sk_d, T, D, n_a, n_b, a0, b0,
                 H, IEEE, BLOCK_A, BLOCK_B, BLOCK_D)


@triton.jit
def _ranks(best, rank, b, n_a, BLOCK: tl.constexpr):
    """rank[i]: A token i's place in a stable descending sort of best scores (ties: lower index first)."""
    for i0 in range(0, n_a, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        vi = tl.load(best + b * n_a + i, mask=i < n_a, other=float("-inf"))
        count = tl.zeros((BLOCK,), tl.int32)
        for j0 in range(0, n_a, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            vj = tl.load(best + b * n_a + j, mask=j < n_a, other=float("-inf"))
            ahead = (vj[None, :] > vi[:, None]) | ((vj[None, :] == vi[:, None]) & (j[None, :] < i[:, None]))
            count += tl.sum((ahead & (j < n_a)[None, :]).to(tl.int32), axis=1)
        tl.store(rank + b * n_a + i, count, mask=i < n_a)


@triton.jit
def _size_of(size, b, t, T, HAS_SIZE: tl.constexpr):
    """Patches per token at positions ``t`` (1 before the first merge)."""
    if HAS_SIZE:
        s = tl.load(size + b * T + t, mask=t < T, other=0.0)
    else:
        s = (t < T).to(tl.float32)
    return s


@triton.jit
def _store_log_size(log_size, channels, b, row, s, T_out, T_pad, root_d, mask):
    """The bias of output rows ``row`` of size ``s``: its log, and ``log * sqrt(head_dim)`` as hi + lo."""
    log = tl.log(s)
    tl.store(log_size + b * T_pad + row, log.to(log_size.dtype.element_ty), mask=mask)
    term = log * root_d
    hi = term.to(channels.dtype.element_ty)
    tl.store(channels + (b * T_out + row) * 2, hi, mask=mask)
    tl.store(channels + (b * T_out + row) * 2 + 1, (term - hi.to(tl.float32)).to(channels.dtype.element_ty),
             mask=mask)


@triton.jit
def _plan_a_tokens(rank, dst, size, rows, own, size_out, log_size, channels, m_src, m_dst, b, T, T_out, T_pad, P,
                   n_a, a0, r, root_d, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Rows of the A tokens: merged ones join their B token's row, kept ones fill rows P.. by position."""
    for i0 in range(0, n_a, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        live = i < n_a
        place = tl.load(rank + b * n_a + i, mask=live, other=r)
        merged = place < r
        merged_before = tl.zeros((BLOCK,), tl.int32)
        for j0 in range(0, i0 + BLOCK, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            mj = (tl.load(rank + b * n_a + j, mask=j < n_a, other=r) < r) & (j < n_a)
            merged_before += tl.sum(((j[None, :] < i[:, None]) & mj[None, :]).to(tl.int32), axis=1)
        pos = a0 + 2 * i
        row = tl.where(merged, P + n_a - r + tl.load(dst + b * n_a + i, mask=live, other=0), P + i - merged_before)
        tl.store(rows + b * T + pos, row, mask=live)
        kept = live & (place >= r)
        s = _size_of(size, b, pos, T, HAS_SIZE)
        tl.store(own + b * T_out + row, pos, mask=kept)
        tl.store(size_out + b * T_out + row, s, mask=kept)
        _store_log_size(log_size, channels, b, row, s, T_out, T_pad, root_d, kept)
        tl.store(m_src + b * r + merged_before, pos, mask=live & merged)
        tl.store(m_dst + b * r + merged_before, row, mask=live & merged)


@triton.jit
def _plan_b_tokens(rank, dst, size, rows, own, size_out, log_size, channels, b, T, T_out, T_pad, P, n_a, n_b, a0,
                   b0, r, root_d, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Rows of the B tokens (after the kept A tokens) and of the protected tokens; B rows sum their merged sizes."""
    for j0 in range(0, n_b, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        pos = b0 + 2 * j
        row = P + n_a - r + j
        total = _size_of(size, b, pos, T, HAS_SIZE)
        for i0 in range(0, n_a, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            into = (tl.load(rank + b * n_a + i, mask=i < n_a, other=r) < r) & (i < n_a)
            to = tl.load(dst + b * n_a + i, mask=i < n_a, other=-1)
            s = _size_of(size, b, a0 + 2 * i, T, HAS_SIZE)
            total += tl.sum(tl.where(into[None, :] & (to[None, :] == j[:, None]), s[None, :], 0.0), axis=1)
        live = j < n_b
        tl.store(rows + b * T + pos, row, mask=live)
        tl.store(own + b * T_out + row, pos, mask=live)
        tl.store(size_out + b * T_out + row, total, mask=live)
        _store_log_size(log_size, channels, b, row, total, T_out, T_pad, root_d, live)
    for t0 in range(0, P, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        s = _size_of(size, b, t, T, HAS_SIZE)
        tl.store(rows + b * T + t, t, mask=t < P)
        tl.store(own + b * T_out + t, t, mask=t < P)
        tl.store(size_out + b * T_out + t, s, mask=t < P)
        _store_log_size(log_size, channels, b, t, s, T_out, T_pad, root_d, t < P)


@triton.jit
def _plan_image(best, dst, rank, size, rows, own, size_out, log_size, channels, m_src, m_dst, b,
                T, T_out, T_pad, P, n_a, n_b, a0, b0, r, root_d, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Image ``b``'s plan from every A token's best score and best B index."""
    _ranks(best, rank, b, n_a, BLOCK)
    tl.debug_barrier()  # the plan reads every A token's rank
    _plan_a_tokens(rank, dst, size, rows, own, size_out, log_size, channels, m_src, m_dst, b, T, T_out, T_pad, P,
                   n_a, a0, r, root_d, HAS_SIZE, BLOCK)
    _plan_b_tokens(rank, dst, size, rows, own, size_out, log_size, channels, b, T, T_out, T_pad, P, n_a, n_b, a0,
                   b0, r, root_d, HAS_SIZE, BLOCK)


@triton.jit
def _plan_kernel(best, dst, rank, size, rows, own, size_out, log_size, channels, m_src, m_dst,
                 T, T_out, T_pad, P, n_a, n_b, a0, b0, r, root_d, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    _plan_image(best, dst, rank, size, rows, own, size_out, log_size, channels, m_src, m_dst, tl.program_id(0),
                T, T_out, T_pad, P, n_a, n_b, a0, b0, r, root_d, HAS_SIZE, BLOCK)


@triton.jit
def _merge_tile(x, size, own, size_out, m_src, m_dst, out, b, q0, c, T, T_out, C, r, HAS_SIZE: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    """Output rows ``q0..q0+BLOCK_Q`` of image ``b`` in channels ``c``."""
    q = q0 + tl.arange(0, BLOCK_Q)
    live = q < T_out
    src = tl.load(own + b * T_out + q, mask=live, other=0)
    ok = live[:, None] & (c < C)[None, :]
    acc = tl.load(x + (b * T + src[:, None]) * C + c[None, :], mask=ok, other=0.0).to(tl.float32)
    acc = acc * _size_of(size, b, src, T, HAS_SIZE)[:, None]
    for k0 in range(0, r, BLOCK_R):  # the merged tokens landing in these rows, as one fp32 product per chunk
        k = k0 + tl.arange(0, BLOCK_R)
        to = tl.load(m_dst + b * r + k, mask=k < r, other=-1)
        here = (k < r) & (to >= q0) & (to < q0 + BLOCK_Q)
        at = tl.load(m_src + b * r + k, mask=here, other=0)
        rows = tl.load(x + (b * T + at[:, None]) * C + c[None, :], mask=here[:, None] & (c < C)[None, :],
                       other=0.0).to(tl.float32)
        weight = tl.where(here, _size_of(size, b, at, T, HAS_SIZE), 0.0)
        into = tl.where(to[None, :] == q[:, None], weight[None, :], 0.0)  # (BLOCK_Q, BLOCK_R)
        acc += tl.dot(into, rows, input_precision="ieee")
    acc = acc / tl.load(size_out + b * T_out + q, mask=live, other=1.0)[:, None]
    tl.store(out + (b * T_out + q[:, None]) * C + c[None, :], acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _merge_kernel(x, size, own, size_out, m_src, m_dst, out, T, T_out, C, r, HAS_SIZE: tl.constexpr,
                  BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    _merge_tile(x, size, own, size_out, m_src, m_dst, out, tl.program_id(0), tl.program_id(1) * BLOCK_Q, c,
                T, T_out, C, r, HAS_SIZE, BLOCK_Q, BLOCK_R)


@triton.jit
def _block_kernel(keys, x, size, best, dst, rank, rows, own, size_out, log_size, channels, m_src, m_dst, out,
                  sk_b, sk_h, sk_t, sk_d, T, T_out, T_pad, C, D, P, n_a, n_b, a0, b0, r, root_d,
                  H: tl.constexpr, IEEE: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK_A: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0)
    for i0 in range(0, n_a, BLOCK_A):  # the whole matching of the image, as every program of it does
        _best_b_tile(keys, best, dst, b, i0 + tl.arange(0, BLOCK_A), sk_b, sk_h, sk_t, sk_d, T, D, n_a, n_b, a0,
                     b0, H, IEEE, BLOCK_A, BLOCK_B, BLOCK_D)
    tl.debug_barrier()  # the plan reads every A token's best score
    _plan_image(best, dst, rank, size, rows, own, size_out, log_size, channels, m_src, m_dst, b,
                T, T_out, T_pad, P, n_a, n_b, a0, b0, r, root_d, HAS_SIZE, BLOCK)
    tl.debug_barrier()  # the merge reads the plan
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    for q0 in range(0, T_out, BLOCK_Q):
        _merge_tile(x, size, own, size_out, m_src, m_dst, out, b, q0, c, T, T_out, C, r, HAS_SIZE, BLOCK_Q, BLOCK_R)


@triton.jit
def _merge_backward_kernel(grad, size, rows, size_out, grad_x, T, T_out, C,
                           HAS_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = t < T
    row = tl.load(rows + b * T + t, mask=live, other=0)
    weight = _size_of(size, b, t, T, HAS_SIZE) / tl.load(size_out + b * T_out + row, mask=live, other=1.0)
    ok = live[:, None] & (c < C)[None, :]
    g = tl.load(grad + (b * T_out + row[:, None]) * C + c[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(grad_x + (b * T + t[:, None]) * C + c[None, :], (g * weight[:, None]).to(grad_x.dtype.element_ty), mask=ok)


def _scratch(batch: int, n_a: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each A token's best score, best B index and rank."""
    i32 = dict(device=device, dtype=torch.int32)
    return torch.empty(batch, n_a, device=device, dtype=torch.float32), torch.empty(batch, n_a, **i32), \
        torch.empty(batch, n_a, **i32)


def _plan_args(tokens: int, r: int, num_protected: int, head_dim: int) -> Tuple[Any, ...]:
    """The plan's shape arguments: ``T, T_out, T_pad, P, n_a, n_b, a0, b0, r, sqrt(head_dim)``."""
    n_a, n_b, a0, b0 = split_sizes(tokens, num_protected)
    return tokens, tokens - r, padded(tokens - r), num_protected, n_a, n_b, a0, b0, r, math.sqrt(head_dim)


def plan(keys: torch.Tensor, size: Optional[torch.Tensor], r: int, num_protected: int, dtype: torch.dtype) -> Plan:
    """Match on ``keys`` ``(B, H, T, D)`` and plan the merge (see :class:`Plan`); ``size`` ``(B, T)`` fp32 or None."""
    batch, heads, tokens, head_dim = keys.shape
    n_a, n_b, a0, b0 = split_sizes(tokens, num_protected)
    small = isinstance(batch, int) and batch * n_a <= 4096  # a symbolic (exported) batch takes the large tiles
    block_a = 16 if small else (64 if n_a <= 64 else 128)
    best, dst, rank = _scratch(batch, n_a, keys.device)
    launch(_best_b_kernel)[(batch, triton.cdiv(n_a, block_a))](
        keys, best, dst, *keys.stride(), tokens, head_dim, n_a, n_b, a0, b0,
        H=heads, IEEE=keys.dtype == torch.float32, BLOCK_A=block_a, BLOCK_B=128 if n_b <= 128 else 64,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), num_warps=4 if block_a <= 64 else 8, num_stages=1)
    out = Plan.empty(batch, tokens, tokens - r, r, keys.device, dtype)
    launch(_plan_kernel)[(batch,)](
        best, dst, rank, size if size is not None else best, out.rows, out.own, out.size_out, out.log_size,
        out.channels, out.merged_src, out.merged_dst, *_plan_args(tokens, r, num_protected, head_dim),
        HAS_SIZE=size is not None, BLOCK=128 if n_a <= 128 else 64, num_warps=8 if n_a <= 128 else 4,
        num_stages=1)
    return out


def merge(x: torch.Tensor, size: Optional[torch.Tensor], own: torch.Tensor, size_out: torch.Tensor,
          merged_src: torch.Tensor, merged_dst: torch.Tensor) -> torch.Tensor:
    """Size-weighted merge of contiguous ``x`` ``(B, T, C)`` by a plan; ``(B, T_out, C)`` in x's dtype."""
    batch, tokens, channels = x.shape
    t_out, r = own.shape[1], merged_src.shape[1]
    out = torch.empty(batch, t_out, channels, device=x.device, dtype=x.dtype)
    grid = (batch, triton.cdiv(t_out, 32), triton.cdiv(channels, 128))
    launch(_merge_kernel)[grid](x, size if size is not None else size_out, own, size_out, merged_src, merged_dst,
                                out, tokens, t_out, channels, r, HAS_SIZE=size is not None, BLOCK_Q=32, BLOCK_C=128,
                                BLOCK_R=16 if r <= 16 else 32, num_warps=4, num_stages=1)
    return out


def block(x: torch.Tensor, keys: torch.Tensor, size: Optional[torch.Tensor], r: int, num_protected: int,
          dtype: torch.dtype) -> Tuple[torch.Tensor, Plan]:
    """:func:`plan` then :func:`merge` in one launch: ``(merged x, plan)``; ``x`` contiguous ``(B, T, C)``."""
    batch, heads, tokens, head_dim = keys.shape
    channels = x.shape[2]
    n_a, n_b, _, _ = split_sizes(tokens, num_protected)
    best, dst, rank = _scratch(batch, n_a, keys.device)
    out = Plan.empty(batch, tokens, tokens - r, r, keys.device, dtype)
    merged = torch.empty(batch, tokens - r, channels, device=x.device, dtype=x.dtype)
    shape = _plan_args(tokens, r, num_protected, head_dim)
    launch(_block_kernel)[(batch, triton.cdiv(channels, 128))](
        keys, x, size if size is not None else best, best, dst, rank, out.rows, out.own, out.size_out,
        out.log_size, out.channels, out.merged_src, out.merged_dst, merged, *keys.stride(),
        *shape[:3], channels, head_dim, *shape[3:],
        H=heads, IEEE=keys.dtype == torch.float32, HAS_SIZE=size is not None, BLOCK_A=64 if n_a > 32 else 32,
        BLOCK_B=64, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK=128 if n_a <= 128 else 64,
        BLOCK_Q=32, BLOCK_C=128, BLOCK_R=16 if r <= 16 else 32, num_warps=8, num_stages=1)
    return merged, out


def merge_backward(grad: torch.Tensor, size: Optional[torch.Tensor], rows: torch.Tensor,
                   size_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of :func:`merge` with respect to ``x``: each token gets its output row's gradient times its weight."""
    batch, t_out, channels = grad.shape
    tokens = rows.shape[1]
    grad_x = torch.empty(batch, tokens, channels, device=grad.device, dtype=dtype)
    grid = (batch, triton.cdiv(tokens, 32), triton.cdiv(channels, 128))
    launch(_merge_backward_kernel)[grid](grad, size if size is not None else size_out, rows, size_out, grad_x,
                                         tokens, t_out, channels, HAS_SIZE=size is not None, BLOCK_T=32,
                                         BLOCK_C=128, num_warps=4, num_stages=1)
    return grad_x
