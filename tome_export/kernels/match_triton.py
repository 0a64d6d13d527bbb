"""The Triton kernel behind :func:`tome_export.kernels.fused_merge.match_merge` (imported on first CUDA use).

One program per batch element runs five phases that hand over through global scratch (a few KB, in L2):
normalised metric, each A token's best B, the r best A tokens, every input token's output row, then sizes,
log sizes and merge weights. Heads are unrolled and a ViT-B/16's 98 x 98 scores fit one 128-token tile, so
at batch 1 the program is a short chain of dependent loads rather than a loop.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


def split_sizes(num_tokens: int, num_protected: int) -> Tuple[int, int, int, int]:
    """``(n_a, n_b, a0, b0)``: set sizes and the absolute positions of the first A and B tokens."""
    rest = num_tokens - num_protected
    n_a = (rest + 1) // 2 if num_protected % 2 == 0 else rest // 2
    a0 = num_protected + num_protected % 2
    b0 = num_protected + 1 - num_protected % 2
    return n_a, rest - n_a, a0, b0


@triton.jit
def _normalised_metric(keys, metric, b, sk_b, sk_h, sk_t, sk_d, T, P, D,
                       H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """metric[b, t] = mean over heads of keys[b, :, t], L2-normalised (NaN for an all-zero row); t >= P."""
    d = tl.arange(0, BLOCK_D)
    for t0 in range(P, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < T)[:, None] & (d < D)[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for h in tl.static_range(H):  # unrolled: all heads' loads are in flight at once
            acc += tl.load(keys + b * sk_b + h * sk_h + t[:, None] * sk_t + d[None, :] * sk_d,
                           mask=ok, other=0.0).to(tl.float32)
        m = acc / H
        m = m / tl.sqrt(tl.sum(m * m, axis=1))[:, None]
        tl.store(metric + (b * T + t[:, None]) * BLOCK_D + d[None, :], m.to(metric.dtype.element_ty),
                 mask=(t < T)[:, None])


@triton.jit
def _best_b(metric, best, dst, b, T, n_a, n_b, a0, b0,
            IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """For each A token: its best score over B (NaN counts as -inf) and the lowest B index reaching it."""
    d = tl.arange(0, BLOCK_D)
    for i0 in range(0, n_a, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)
        a = tl.load(metric + (b * T + a0 + 2 * i)[:, None] * BLOCK_D + d[None, :], mask=(i < n_a)[:, None], other=0.0)
        top = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_T,), tl.int32)
        for j0 in range(0, n_b, BLOCK_T):
            j = j0 + tl.arange(0, BLOCK_T)
            bm = tl.load(metric + (b * T + b0 + 2 * j)[:, None] * BLOCK_D + d[None, :],
                         mask=(j < n_b)[:, None], other=0.0)
            if IEEE:  # fp32 keys: exact fp32 scores, as the portable lowering computes them
                s = tl.dot(a, tl.trans(bm), input_precision="ieee")
            else:  # 16-bit keys: 16-bit normalised metrics on tensor cores, as a 16-bit model's lowering does
                s = tl.dot(a, tl.trans(bm))
            s = tl.where((s == s) & (j < n_b)[None, :], s, float("-inf"))
            tile_top = tl.max(s, axis=1)
            better = tile_top > top  # strict: on equal scores an earlier tile's lower index stays
            arg = tl.where(better, tl.argmax(s, axis=1).to(tl.int32) + j0, arg)
            top = tl.where(better, tile_top, top)
        tl.store(best + b * n_a + i, top, mask=i < n_a)
        tl.store(dst + b * n_a + i, arg, mask=i < n_a)


@triton.jit
def _merged_flags(best, merged, b, n_a, r, BLOCK_T: tl.constexpr):
    """merged[i] = A token i is among the r best: its stable descending rank (ties: lower index first) < r."""
    for i0 in range(0, n_a, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)
        vi = tl.load(best + b * n_a + i, mask=i < n_a, other=float("-inf"))
        rank = tl.zeros((BLOCK_T,), tl.int32)
        for j0 in range(0, n_a, BLOCK_T):
            j = j0 + tl.arange(0, BLOCK_T)
            vj = tl.load(best + b * n_a + j, mask=j < n_a, other=float("-inf"))
            ahead = (vj[None, :] > vi[:, None]) | ((vj[None, :] == vi[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((ahead & (j < n_a)[None, :]).to(tl.int32), axis=1)
        tl.store(merged + b * n_a + i, (rank < r).to(tl.int32), mask=i < n_a)


@triton.jit
def _output_rows(merged, dst, rows, b, T, P, n_a, n_b, a0, b0, r, BLOCK_T: tl.constexpr):
    """rows[b, t] = the output row input token t lands in: [protected, kept A by position, B]."""
    for i0 in range(0, n_a, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)
        mi = tl.load(merged + b * n_a + i, mask=i < n_a, other=1)
        kept_before = tl.zeros((BLOCK_T,), tl.int32)
        for j0 in range(0, i0 + BLOCK_T, BLOCK_T):
            j = j0 + tl.arange(0, BLOCK_T)
            mj = tl.load(merged + b * n_a + j, mask=j < n_a, other=1)
            kept_before += tl.sum(((j[None, :] < i[:, None]) & (mj == 0)[None, :]).to(tl.int32), axis=1)
        to = tl.load(dst + b * n_a + i, mask=i < n_a, other=0)
        row = tl.where(mi != 0, P + n_a - r + to, P + kept_before)
        tl.store(rows + b * T + a0 + 2 * i, row, mask=i < n_a)
    for j0 in range(0, n_b, BLOCK_T):
        j = j0 + tl.arange(0, BLOCK_T)
        tl.store(rows + b * T + b0 + 2 * j, P + n_a - r + j, mask=j < n_b)
    for t0 in range(0, P, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tl.store(rows + b * T + t, t, mask=t < P)


@triton.jit
def _weights(rows, size, weights, size_out, log_size, b, T, T_out, T_pad,
             HAS_SIZE: tl.constexpr, BLOCK_T: tl.constexpr):
    """size'[row] = sum of the sizes landing in it; W[row, t] = size[t] / size'[row] where t lands in row."""
    for q0 in range(0, T_out, BLOCK_T):
        q = q0 + tl.arange(0, BLOCK_T)
        total = tl.zeros((BLOCK_T,), tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            rt = tl.load(rows + b * T + t, mask=t < T, other=-1)
            st = tl.load(size + b * T + t, mask=t < T, other=0.0) if HAS_SIZE else (t < T).to(tl.float32)
            total += tl.sum(tl.where(rt[None, :] == q[:, None], st[None, :], 0.0), axis=1)
        tl.store(size_out + b * T_out + q, total, mask=q < T_out)
        tl.store(log_size + b * T_pad + q, tl.log(total).to(log_size.dtype.element_ty), mask=q < T_out)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            rt = tl.load(rows + b * T + t, mask=t < T, other=-1)
            st = tl.load(size + b * T + t, mask=t < T, other=0.0) if HAS_SIZE else (t < T).to(tl.float32)
            w = tl.where(rt[None, :] == q[:, None], st[None, :] / total[:, None], 0.0)
            tl.store(weights + (b * T_out + q[:, None]) * T + t[None, :], w.to(weights.dtype.element_ty),
                     mask=(q < T_out)[:, None] & (t < T)[None, :])


@triton.jit
def _match_merge_kernel(keys, size, weights, size_out, log_size, rows, metric, best, dst, merged,
                        sk_b, sk_h, sk_t, sk_d, T, D, P, n_a, n_b, a0, b0, r, T_out, T_pad,
                        H: tl.constexpr, HAS_SIZE: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    _normalised_metric(keys, metric, b, sk_b, sk_h, sk_t, sk_d, T, P, D, H, BLOCK_T, BLOCK_D)
    tl.debug_barrier()  # each phase reads what the whole program wrote in the one before
    _best_b(metric, best, dst, b, T, n_a, n_b, a0, b0, IEEE, BLOCK_T, BLOCK_D)
    tl.debug_barrier()
    _merged_flags(best, merged, b, n_a, r, BLOCK_T)
    tl.debug_barrier()
    _output_rows(merged, dst, rows, b, T, P, n_a, n_b, a0, b0, r, BLOCK_T)
    tl.debug_barrier()
    _weights(rows, size, weights, size_out, log_size, b, T, T_out, T_pad, HAS_SIZE, BLOCK_T)


def launch(keys: torch.Tensor, size: Optional[torch.Tensor], r: int, num_protected: int,
           dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the kernel (on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``); see ``match_merge``."""
    batch, heads, tokens, head_dim = keys.shape
    n_a, n_b, a0, b0 = split_sizes(tokens, num_protected)
    t_out = tokens - r
    t_pad = -(-t_out // 8) * 8  # SDPA takes a mask whose row stride is a multiple of 8 without copying it
    block_t = 128 if max(n_a, n_b) <= 128 else 64
    block_d = max(16, triton.next_power_of_2(head_dim))
    f32 = dict(device=keys.device, dtype=torch.float32)
    i32 = dict(device=keys.device, dtype=torch.int32)
    weights = torch.empty(batch, t_out, tokens, device=keys.device, dtype=dtype)
    size_out = torch.empty(batch, t_out, **f32)
    log_size = torch.empty(batch, t_pad, device=keys.device, dtype=dtype)
    rows = torch.empty(batch, tokens, **i32)
    ieee = keys.dtype == torch.float32
    metric = torch.empty(batch, tokens, block_d, device=keys.device, dtype=torch.float32 if ieee else keys.dtype)
    best, dst, merged = torch.empty(batch, n_a, **f32), torch.empty(batch, n_a, **i32), torch.empty(batch, n_a, **i32)
    size_arg = size.to(torch.float32).contiguous() if size is not None else size_out  # unread without HAS_SIZE
    _match_merge_kernel[(batch,)](
        keys, size_arg, weights, size_out, log_size, rows, metric, best, dst, merged,
        *keys.stride(), tokens, head_dim, num_protected, n_a, n_b, a0, b0, r, t_out, t_pad,
        H=heads, HAS_SIZE=size is not None, IEEE=ieee, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=8 if block_t == 128 else 4,
    )
    return weights, size_out, log_size, rows
