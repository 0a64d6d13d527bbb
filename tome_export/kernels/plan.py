"""A merge plan: what one block's matching decided, in the form the fused kernels consume and produce.

The portable implementations here (plain PyTorch over :mod:`tome_export.merge`) are the fused operators' CPU
implementations and the reference the Triton kernels are tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from ..merge import cap_r, destinations


def split_sizes(num_tokens: int, num_protected: int) -> Tuple[int, int, int, int]:
    """``(n_a, n_b, a0, b0)``: set sizes and the absolute positions of the first A and B tokens."""
    rest = num_tokens - num_protected
    n_a = (rest + 1) // 2 if num_protected % 2 == 0 else rest // 2
    a0 = num_protected + num_protected % 2
    b0 = num_protected + 1 - num_protected % 2
    return n_a, rest - n_a, a0, b0


def padded(tokens: int) -> int:
    """Row stride of the log-size buffer: SDPA takes a mask whose strides are multiples of 8 without copying it."""
    return -(-tokens // 8) * 8


class Plan(NamedTuple):
    """One block's merge of ``T`` tokens into ``T_out = T - r`` (batch-first, int32 positions).

    ``rows`` ``(B, T)``: the output row of every input token. ``own`` ``(B, T_out)``: the input token that each
    output row keeps (protected, kept A or B token). ``merged_src``/``merged_dst`` ``(B, r)``: the merged A tokens
    in position order and the rows they join. ``size_out`` ``(B, T_out)`` fp32: patches per output token;
    ``log_size`` ``(B, padded(T_out))`` its log in the attention dtype (padding columns unset);
    ``channels`` ``(B, T_out, 2)`` the same bias for padded attention heads: ``log(size) * sqrt(head_dim)``
    split into a high part and the remainder in the attention dtype (see :func:`split_log_size`).
    """

    rows: torch.Tensor
    own: torch.Tensor
    size_out: torch.Tensor
    log_size: torch.Tensor
    channels: torch.Tensor
    merged_src: torch.Tensor
    merged_dst: torch.Tensor

    @classmethod
    def empty(cls, batch: int, tokens: int, t_out: int, r: int, device: torch.device, dtype: torch.dtype) -> "Plan":
        i32 = dict(device=device, dtype=torch.int32)
        return cls(torch.empty(batch, tokens, **i32), torch.empty(batch, t_out, **i32),
                   torch.empty(batch, t_out, device=device, dtype=torch.float32),
                   torch.empty(batch, padded(t_out), device=device, dtype=dtype),
                   torch.empty(batch, t_out, 2, device=device, dtype=dtype),
                   torch.empty(batch, r, **i32), torch.empty(batch, r, **i32))


def split_log_size(log_size: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``log(size) / scale`` (scale = head_dim ** -0.5) as ``(..., 2)`` hi and lo parts in ``dtype``.

    With the query's two extra channels at 1, ``scale * (q.k + hi + lo)`` adds the log size to the logit; the
    split carries it in 16-bit keys about as exactly as an fp32 mask would. ``log_size`` is fp32.
    """
    term = log_size * math.sqrt(head_dim)
    hi = term.to(dtype)
    return torch.stack([hi, (term - hi.float()).to(dtype)], dim=-1)


def portable_plan(keys: torch.Tensor, size: Optional[torch.Tensor], r: int, num_protected: int,
                  dtype: torch.dtype) -> Plan:
    """The plan from :func:`tome_export.merge.destinations` on the head-mean keys ``(B, H, T, D)`` (fp32)."""
    batch, _, tokens, _ = keys.shape
    rows = destinations(keys.float().mean(dim=1), r, num_protected)  # (B, T)
    t_out = tokens - cap_r(r, tokens, num_protected)
    r = tokens - t_out
    sizes = size.float() if size is not None else torch.ones(batch, tokens, device=keys.device)
    size_out = torch.zeros(batch, t_out, device=keys.device).scatter_add(1, rows, sizes)
    n_a, _, a0, _ = split_sizes(tokens, num_protected)
    pos = torch.arange(tokens, device=keys.device)
    is_a = (pos >= a0) & ((pos - a0) % 2 == 0) & (pos < a0 + 2 * n_a)
    merged = is_a & (rows >= num_protected + n_a - r)
    # Every output row keeps the one token that is not a merged A token; merged ones go to a spare column.
    spare = torch.where(merged, t_out, rows)
    own = torch.zeros(batch, t_out + 1, dtype=torch.long, device=keys.device)
    own = own.scatter(1, spare, pos.expand(batch, -1))[:, :t_out]
    merged_src = torch.where(merged, pos, tokens + pos).sort(dim=-1).values[:, :r]
    log_size = torch.zeros(batch, padded(t_out), device=keys.device, dtype=dtype)
    log_size[:, :t_out] = size_out.log()
    channels = split_log_size(size_out.log(), keys.shape[-1], dtype)
    return Plan(rows.int(), own.int(), size_out, log_size, channels, merged_src.int(),
                rows.gather(1, merged_src).int())


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.long()[..., None].expand(-1, -1, x.shape[-1]))


def portable_merge(x: torch.Tensor, size: Optional[torch.Tensor], own: torch.Tensor, size_out: torch.Tensor,
                   merged_src: torch.Tensor, merged_dst: torch.Tensor) -> torch.Tensor:
    """Each output row: its own token plus the merged tokens joining it, size-weighted, in fp32."""
    weighted = x.float() if size is None else x.float() * size[..., None]
    out = _take(weighted, own)
    out = out.scatter_add(1, merged_dst.long()[..., None].expand(-1, -1, x.shape[-1]), _take(weighted, merged_src))
    return (out / size_out[..., None]).to(x.dtype)


def portable_merge_backward(grad: torch.Tensor, size: Optional[torch.Tensor], rows: torch.Tensor,
                            size_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of the merge: each input token gets its output row's gradient times its weight in that row."""
    weight = size_out.gather(1, rows.long()).reciprocal()
    if size is not None:
        weight = weight * size
    return (_take(grad.float(), rows) * weight[..., None]).to(dtype)
