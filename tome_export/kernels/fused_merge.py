"""One block's matching and size-weighted merge as GPU kernels, registered as torch operators.

The portable lowerings in :mod:`tome_export.merge` spend about twenty small kernels per block on a GPU (head
mean, norm, scores, max, sort, index building, two gathers, a scatter-add, ``x * size``, ``/ size``, the log):
at small batches their launches cost more than the merged tokens save, and at large ones their passes over the
tokens add up. Here (see :mod:`tome_export.kernels.triton_merge`) one kernel finds each A token's best B token,
one plans the merge per image (ranking, rows, sizes, log sizes) and one merges: one read and one write of the
tokens, summed in fp32 in a fixed order (no atomics), with a one-kernel backward for training. ``merge_block``
does all three in one launch (which of the two runs is a measured choice per GPU and batch).

The decisions follow :mod:`tome_export.merge`'s documented semantics and tie-break. Each operator runs its
Triton kernels on CUDA tensors and the portable code of :mod:`tome_export.kernels.plan` on others (the kernels'
test reference, run under ``TRITON_INTERPRET=1``). They are ``torch.library.triton_op`` operators: export keeps
them as operators and AOTInductor and ``torch.compile`` see through them to the kernels, so a compiled package
contains the kernels. Without Triton or that API they are opaque custom operators with fake implementations.
ONNX exports never see them: exports trace the portable lowerings unless :func:`in_exports` says otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Callable, Iterator, Optional, Tuple

import torch

from ..merge import cap_r
from .plan import Plan, padded, portable_merge, portable_merge_backward, portable_plan

Tensor = torch.Tensor

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_KERNELS_IN_EXPORTS = False


def _operator(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Register a function as the operator ``tome_export::<name>``: a ``triton_op`` where Triton and that API
    exist (its fake implementation is the function itself, traced), else an opaque custom op using ``fake``."""
    def register(fn: Callable) -> Callable:
        if _HAS_TRITON and hasattr(torch.library, "triton_op"):
            return torch.library.triton_op(f"tome_export::{name}", fn, mutates_args=())
        op = torch.library.custom_op(f"tome_export::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op
    return register


def _plan_fake(keys, size, r, num_protected, dtype):
    batch, _, tokens, _ = keys.shape
    return tuple(Plan.empty(batch, tokens, tokens - r, r, keys.device, dtype))


@_operator("merge_plan", _plan_fake)
def merge_plan(keys: Tensor, size: Optional[Tensor], r: int, num_protected: int,
               dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Match one block's tokens on ``keys`` ``(B, heads, T, head_dim)`` and plan the merge (a :class:`Plan`).

    ``size`` ``(B, T)`` fp32 patches per token (None: all 1); ``r`` already capped; ``dtype``: the log sizes'.
    """
    if keys.is_cuda:
        from .triton_merge import plan

        return tuple(plan(keys, size, r, num_protected, dtype))
    return tuple(portable_plan(keys, size, r, num_protected, dtype))


def _merge_fake(x, size, rows, own, size_out, merged_src, merged_dst):
    return x.new_empty(x.shape[0], own.shape[1], x.shape[2])


@_operator("merge_tokens", _merge_fake)
def merge_tokens(x: Tensor, size: Optional[Tensor], rows: Tensor, own: Tensor, size_out: Tensor,
                 merged_src: Tensor, merged_dst: Tensor) -> Tensor:
    """Size-weighted merge of ``x`` ``(B, T, C)`` by a plan: ``(B, T - r, C)`` in x's dtype (``rows``: backward)."""
    if x.is_cuda:
        from .triton_merge import merge

        return merge(x.contiguous(), size, own, size_out, merged_src, merged_dst)
    return portable_merge(x, size, own, size_out, merged_src, merged_dst)


def _block_fake(x, keys, size, r, num_protected, dtype):
    batch, _, tokens, _ = keys.shape
    return (x.new_empty(batch, tokens - r, x.shape[2]),
            *Plan.empty(batch, tokens, tokens - r, r, keys.device, dtype))


@_operator("merge_block", _block_fake)
def merge_block(x: Tensor, keys: Tensor, size: Optional[Tensor], r: int, num_protected: int, dtype: torch.dtype
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`merge_plan` then :func:`merge_tokens` in one kernel: ``(merged x, *plan)``."""
    if x.is_cuda:
        from .triton_merge import block

        merged, plan = block(x.contiguous(), keys, size, r, num_protected, dtype)
        return (merged, *plan)
    plan = portable_plan(keys, size, r, num_protected, dtype)
    return (portable_merge(x, size, plan.own, plan.size_out, plan.merged_src, plan.merged_dst), *plan)


def _backward_fake(grad, size, rows, size_out, dtype):
    return grad.new_empty(grad.shape[0], rows.shape[1], grad.shape[2], dtype=dtype)


@_operator("merge_tokens_backward", _backward_fake)
def merge_tokens_backward(grad: Tensor, size: Optional[Tensor], rows: Tensor, size_out: Tensor,
                          dtype: torch.dtype) -> Tensor:
    """Gradient of :func:`merge_tokens` with respect to ``x``."""
    if grad.is_cuda:
        from .triton_merge import merge_backward

        return merge_backward(grad.contiguous(), size, rows, size_out, dtype)
    return portable_merge_backward(grad, size, rows, size_out, dtype)


def _setup_merge(ctx, inputs, output) -> None:
    x, size, rows, _, size_out, _, _ = inputs
    ctx.save_for_backward(size, rows, size_out)
    ctx.dtype = x.dtype


def _merge_grad(ctx, grad):
    size, rows, size_out = ctx.saved_tensors
    return merge_tokens_backward(grad, size, rows, size_out, ctx.dtype), None, None, None, None, None, None


def _setup_block(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[2], output[1], output[3])  # size, rows, size_out
    ctx.dtype = inputs[0].dtype


def _block_grad(ctx, grad, *plan_grads):
    size, rows, size_out = ctx.saved_tensors
    return merge_tokens_backward(grad, size, rows, size_out, ctx.dtype), None, None, None, None, None


merge_tokens.register_autograd(_merge_grad, setup_context=_setup_merge)
merge_block.register_autograd(_block_grad, setup_context=_setup_block)


def available(x: Tensor) -> bool:
    """Whether the fused kernels run on ``x``: a CUDA tensor with Triton installed, not exporting (unless
    :func:`in_exports`)."""
    return x.is_cuda and _HAS_TRITON and (_KERNELS_IN_EXPORTS or not torch.compiler.is_exporting())


@contextlib.contextmanager
def in_exports() -> Iterator[None]:
    """Within this block ``torch.export`` traces the fused operators on CUDA tensors instead of the portable
    lowering: for AOTInductor packages, which compile the kernels in. ONNX exports need the portable lowering.
    A process-wide switch: do not export an ONNX graph from another thread meanwhile."""
    global _KERNELS_IN_EXPORTS
    before, _KERNELS_IN_EXPORTS = _KERNELS_IN_EXPORTS, True
    try:
        yield
    finally:
        _KERNELS_IN_EXPORTS = before


def merge_weighted(x: Tensor, keys: Tensor, size: Optional[Tensor], r: int, num_protected: int,
                   one_kernel: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Size-weighted merge of ``x`` ``(B, T, C)`` matched on ``keys`` (as :func:`tome_export.merge.merge_wavg`).

    Returns ``(x', size' (B, T-r, 1), log_size (B, 1, 1, T-r), channels (B, T-r, 2))``: the next attention's
    bias as a mask and as padded-head channels (see :class:`Plan`). Under autocast both come in the autocast
    dtype (the attention's); x keeps its own dtype. ``one_kernel``: :func:`merge_block` instead of
    :func:`merge_plan` and :func:`merge_tokens`.
    """
    r = cap_r(r, keys.shape[2], num_protected)
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
    sizes = None if size is None else size[..., 0]
    if one_kernel:
        merged, rows, own, size_out, log_size, channels, merged_src, merged_dst = merge_block(
            x, keys.detach(), sizes, r, num_protected, dtype)
    else:
        rows, own, size_out, log_size, channels, merged_src, merged_dst = merge_plan(
            keys.detach(), sizes, r, num_protected, dtype)
        merged = merge_tokens(x, sizes, rows, own, size_out, merged_src, merged_dst)
    return merged, size_out[..., None], log_size[:, None, None, : size_out.shape[1]], channels


__all__ = ["merge_plan", "merge_tokens", "merge_block", "merge_tokens_backward", "merge_weighted", "available",
           "in_exports", "padded"]
