"""One block's matching and size-weighted merge as three GPU kernels, registered as torch operators.

The portable lowerings in :mod:`tome_export.merge` spend about twenty small kernels per block on a GPU (head
mean, norm, scores, max, sort, index building, two gathers, a scatter-add, ``x * size``, ``/ size``, the log):
at small batches their launches cost more than the merged tokens save, and at large ones their passes over the
tokens add up. Here (see :mod:`tome_export.kernels.triton_merge`) one kernel finds each A token's best B token,
one plans the merge per image (ranking, rows, sizes, log sizes) and one merges: one read and one write of the
tokens, summed in fp32 in a fixed order (no atomics), with a one-kernel backward for training.

The decisions follow :mod:`tome_export.merge`'s documented semantics and tie-break; each operator's CPU
implementation is the portable code in :mod:`tome_export.kernels.plan`, the kernels' test reference (run under
``TRITON_INTERPRET=1``). The operators have fake implementations, so ``torch.compile`` and CUDA graphs take
them; exports never see them (they trace the portable lowerings).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional, Tuple

import torch

from ..merge import cap_r
from .plan import Plan, padded, portable_merge, portable_merge_backward, portable_plan

Tensor = torch.Tensor


@torch.library.custom_op("tome_export::merge_plan", mutates_args=())
def merge_plan(keys: Tensor, size: Optional[Tensor], r: int, num_protected: int,
               dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Match one block's tokens on ``keys`` ``(B, heads, T, head_dim)`` and plan the merge (a :class:`Plan`).

    ``size`` ``(B, T)`` fp32 patches per token (None: all 1); ``r`` already capped; ``dtype``: the log sizes'.
    """
    return tuple(portable_plan(keys, size, r, num_protected, dtype))


@merge_plan.register_kernel("cuda")
def _merge_plan_cuda(keys, size, r, num_protected, dtype):
    from .triton_merge import plan

    return tuple(plan(keys, size, r, num_protected, dtype))


@merge_plan.register_fake
def _merge_plan_fake(keys, size, r, num_protected, dtype):
    batch, _, tokens, _ = keys.shape
    return tuple(Plan.empty(batch, tokens, tokens - r, r, keys.device, dtype))


@torch.library.custom_op("tome_export::merge_tokens", mutates_args=())
def merge_tokens(x: Tensor, size: Optional[Tensor], rows: Tensor, own: Tensor, size_out: Tensor,
                 merged_src: Tensor, merged_dst: Tensor) -> Tensor:
    """Size-weighted merge of ``x`` ``(B, T, C)`` by a plan: ``(B, T - r, C)`` in x's dtype (``rows``: backward)."""
    return portable_merge(x, size, own, size_out, merged_src, merged_dst)


@merge_tokens.register_kernel("cuda")
def _merge_tokens_cuda(x, size, rows, own, size_out, merged_src, merged_dst):
    from .triton_merge import merge

    return merge(x.contiguous(), size, own, size_out, merged_src, merged_dst)


@merge_tokens.register_fake
def _merge_tokens_fake(x, size, rows, own, size_out, merged_src, merged_dst):
    return x.new_empty(x.shape[0], own.shape[1], x.shape[2])


@torch.library.custom_op("tome_export::merge_tokens_backward", mutates_args=())
def merge_tokens_backward(grad: Tensor, size: Optional[Tensor], rows: Tensor, size_out: Tensor,
                          dtype: torch.dtype) -> Tensor:
    """Gradient of :func:`merge_tokens` with respect to ``x``."""
    return portable_merge_backward(grad, size, rows, size_out, dtype)


@merge_tokens_backward.register_kernel("cuda")
def _merge_tokens_backward_cuda(grad, size, rows, size_out, dtype):
    from .triton_merge import merge_backward

    return merge_backward(grad.contiguous(), size, rows, size_out, dtype)


@merge_tokens_backward.register_fake
def _merge_tokens_backward_fake(grad, size, rows, size_out, dtype):
    return grad.new_empty(grad.shape[0], rows.shape[1], grad.shape[2], dtype=dtype)


def _setup_merge(ctx, inputs, output) -> None:
    x, size, rows, _, size_out, _, _ = inputs
    ctx.save_for_backward(size, rows, size_out)
    ctx.dtype = x.dtype


def _merge_grad(ctx, grad):
    size, rows, size_out = ctx.saved_tensors
    return merge_tokens_backward(grad, size, rows, size_out, ctx.dtype), None, None, None, None, None, None


merge_tokens.register_autograd(_merge_grad, setup_context=_setup_merge)


def available(x: Tensor) -> bool:
    """Whether the fused kernels run on ``x``'s device (a CUDA tensor with Triton installed, not exporting)."""
    return x.is_cuda and not torch.compiler.is_exporting() and _has_triton()


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def merge_weighted(x: Tensor, keys: Tensor, size: Optional[Tensor], r: int,
                   num_protected: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Size-weighted merge of ``x`` ``(B, T, C)`` matched on ``keys`` (as :func:`tome_export.merge.merge_wavg`).

    Returns ``(x', size' (B, T-r, 1), bias (B, 1, 1, T-r))``, the bias being the log sizes for the next attention.
    Under autocast the log sizes come in the autocast dtype (the attention's); x keeps its own dtype.
    """
    r = cap_r(r, keys.shape[2], num_protected)
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
    sizes = None if size is None else size[..., 0]
    rows, own, size_out, log_size, merged_src, merged_dst = merge_plan(keys.detach(), sizes, r, num_protected, dtype)
    merged = merge_tokens(x, sizes, rows, own, size_out, merged_src, merged_dst)
    return merged, size_out[..., None], log_size[:, None, None, : size_out.shape[1]]


__all__ = ["merge_plan", "merge_tokens", "merge_tokens_backward", "merge_weighted", "available", "padded"]
