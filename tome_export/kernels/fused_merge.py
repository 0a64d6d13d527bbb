"""One block's matching and size-weighted merge as one GPU kernel plus one batched matmul.

The portable lowerings in :mod:`tome_export.merge` spend about twenty small kernels per block on a GPU (head
mean, norm, scores, max, sort, index building, two gathers, a scatter-add, ``x * size``, ``/ size``, the log):
at batch 1 that launch overhead costs more than the merged tokens save. Here one Triton program per batch
element does the whole matching and writes the merge as a dense weight matrix

    ``W[b, row, t] = size[b, t] / size'[b, row]`` when input token ``t`` lands in output row ``row``, else 0,

so the merged tokens are one batched GEMM, ``x' = W @ x`` (deterministic: no atomics, and its backward is
``Wᵀ @ grad``). The decisions follow :mod:`tome_export.merge`'s documented semantics and tie-break; the
operator's CPU implementation *is* that module, and tests run this kernel under ``TRITON_INTERPRET=1`` against
it. Exports never see this operator: they trace the portable lowerings.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional, Tuple

import torch

from ..merge import bipartite_soft_matching, cap_r


def padded(tokens: int) -> int:
    """Columns of the log-size buffer: SDPA takes a mask whose row stride is a multiple of 8 without copying it."""
    return -(-tokens // 8) * 8


@torch.library.custom_op("tome_export::match_merge", mutates_args=())
def match_merge(keys: torch.Tensor, size: Optional[torch.Tensor], r: int, num_protected: int,
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match one block's tokens and describe the size-weighted merge.

    ``keys`` ``(B, heads, T, head_dim)``; ``size`` ``(B, T)`` patches per token (None = all 1); ``r`` already
    capped (see :func:`tome_export.merge.cap_r`). Returns ``(W, size', log size', rows)``: ``W`` ``(B, T-r, T)``
    in ``dtype`` with merged tokens ``= W @ x``; ``size'`` ``(B, T-r)`` in fp32; its log in ``dtype``, padded to
    :func:`padded` columns (the rest is unset); ``rows`` ``(B, T)`` int32, the output row of every input token.
    This CPU implementation runs :mod:`tome_export.merge`.
    """
    batch, _, tokens, _ = keys.shape
    merge = bipartite_soft_matching(keys.float().mean(dim=1), r, num_protected, "gather")
    onehot = merge(torch.eye(tokens, dtype=torch.float32, device=keys.device).expand(batch, -1, -1).contiguous())
    sizes = size.float() if size is not None else torch.ones(batch, tokens, device=keys.device)
    size_out = onehot @ sizes[..., None]
    weights = (onehot * sizes[:, None, :] / size_out).to(dtype)
    log_size = torch.zeros(batch, padded(tokens - r), dtype=dtype, device=keys.device)
    log_size[:, :tokens - r] = size_out[..., 0].log()
    return weights, size_out[..., 0], log_size, onehot.argmax(dim=1).to(torch.int32)


@match_merge.register_kernel("cuda")
def _match_merge_cuda(keys, size, r, num_protected, dtype):
    from .match_triton import launch

    return launch(keys, size, r, num_protected, dtype)


@match_merge.register_fake
def _match_merge_fake(keys, size, r, num_protected, dtype):
    batch, _, tokens, _ = keys.shape
    return (keys.new_empty(batch, tokens - r, tokens, dtype=dtype),
            keys.new_empty(batch, tokens - r, dtype=torch.float32),
            keys.new_empty(batch, padded(tokens - r), dtype=dtype),
            keys.new_empty(batch, tokens, dtype=torch.int32))


def available(x: torch.Tensor) -> bool:
    """Whether the fused kernel can run on ``x``'s device (a CUDA tensor with Triton installed, not exporting)."""
    return x.is_cuda and not torch.compiler.is_exporting() and _has_triton()


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def merge_weighted(x: torch.Tensor, keys: torch.Tensor, size: Optional[torch.Tensor], r: int,
                   num_protected: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x`` ``(B, T, C)`` matched on ``keys``.

    Returns ``(x', size' (B, T-r, 1), bias (B, 1, 1, T-r))``, the bias being the log sizes for the next attention.
    """
    r = cap_r(r, keys.shape[2], num_protected)
    # Under autocast the merge is a matmul like the others, in the autocast dtype; the result goes back to x's.
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
    sizes = None if size is None else size[..., 0]
    weights, size_out, log_size, _ = match_merge(keys.detach(), sizes, r, num_protected, dtype)
    merged = torch.bmm(weights, x.to(dtype)).to(x.dtype)
    return merged, size_out[..., None], log_size[:, None, None, : size_out.shape[1]]
