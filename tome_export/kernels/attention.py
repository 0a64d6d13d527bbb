"""Proportional attention, ``softmax(scale * q.k + log size) v``, in four exact formulations.

* ``mask``: the log sizes as an additive float mask. Portable, and what every export traces; on a GPU it rules
  out the flash kernel (SDPA falls back to the memory-efficient one).
* ``cudnn``: the same call with cuDNN's attention first in SDPA's priority (it takes a float bias).
* ``flex``: FlexAttention with a ``score_mod`` adding ``log_size[b, kv]``, compiled on CUDA.
* ``padded``: no bias at all. Every head gets :data:`PAD` extra channels from zero rows of the qkv projection;
  the query's first two come out as 1 from the projection's bias, the key's two take ``log(size) / scale`` as a
  high part and the remainder (:func:`tome_export.kernels.plan.split_log_size`), written in place; the output
  projection has zero columns for the extra channels. ``scale * [q, 1, 1].[k, hi, lo] = scale * q.k + log size``,
  so SDPA runs without a mask (flash-eligible), and nothing is sliced or concatenated. Padded weights are built
  once per weight version for inference and per call when the weights train.

Which one runs where is a measured choice (:mod:`tome_export.kernels.designs`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.weak import WeakIdKeyDictionary

from .plan import split_log_size

Tensor = torch.Tensor
PAD = 8  # extra channels per head: two carry the bias, the rest keep the head dim a multiple of 8


def mask_attention(q: Tensor, k: Tensor, v: Tensor, log_size: Tensor, dropout_p: float = 0.0) -> Tensor:
    """``(B, H, T, D)`` q/k/v with the keys' log sizes ``(B, 1, 1, T)`` as an additive mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=log_size.to(q.dtype), dropout_p=dropout_p)


_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.MATH]
# set_priority (torch >= 2.6) makes the list an order; without it SDPA's own order among them applies
_PRIORITY = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}


def cudnn_attention(q: Tensor, k: Tensor, v: Tensor, log_size: Tensor, dropout_p: float = 0.0) -> Tensor:
    """:func:`mask_attention` with cuDNN's kernel first; SDPA takes the next backend where cuDNN cannot run."""
    with sdpa_kernel(_CUDNN_FIRST, **_PRIORITY):
        return mask_attention(q, k, v, log_size, dropout_p)


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(cuda: bool) -> Callable:
    """FlexAttention compiled on CUDA (inside ``torch.compile`` the enclosing compile does it); eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_flex() if cuda and not torch.compiler.is_compiling() else flex_attention


def flex_attention(q: Tensor, k: Tensor, v: Tensor, log_size: Tensor, dropout_p: float = 0.0) -> Tensor:
    """FlexAttention adding ``log_size[b, kv]`` to each score (compiled on CUDA; FlexAttention has no dropout,
    so training with attention dropout takes the mask)."""
    if dropout_p:
        return mask_attention(q, k, v, log_size, dropout_p)
    bias = log_size[:, 0, 0, :]

    def add_log_size(score, b, h, q_idx, kv_idx):
        return score + bias[b, kv_idx]

    return _flex(q.is_cuda)(q, k, v, score_mod=add_log_size)


FORMULATIONS: Dict[str, Callable[..., Tensor]] = {"mask": mask_attention, "cudnn": cudnn_attention,
                                                 "flex": flex_attention}


# --- padded heads ----------------------------------------------------------------------------------------------


def padded_weights(qkv_weight: Tensor, qkv_bias: Optional[Tensor], proj_weight: Tensor,
                   heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The qkv weight and bias with :data:`PAD` extra rows per head (the query's first two biased to 1), and
    the output projection with zero columns for them. Differentiable in the original weights."""
    dim = qkv_weight.shape[1]
    d = qkv_weight.shape[0] // (3 * heads)
    weight = F.pad(qkv_weight.reshape(3, heads, d, dim), (0, 0, 0, PAD)).reshape(-1, dim)
    bias = qkv_bias if qkv_bias is not None else qkv_weight.new_zeros(3 * heads * d)
    ones = torch.zeros(3, 1, d + PAD, dtype=bias.dtype, device=bias.device)
    ones[0, 0, d:d + 2] = 1.0  # the query's two bias channels
    bias = (F.pad(bias.reshape(3, heads, d), (0, PAD)) + ones).reshape(-1)
    proj = F.pad(proj_weight.reshape(proj_weight.shape[0], heads, d), (0, PAD)).reshape(proj_weight.shape[0], -1)
    return weight, bias, proj


_PADDED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _stamp(*tensors: Optional[Tensor]) -> Tuple:
    """What identifies a weight's values: its storage, dtype and version."""
    return tuple(None if t is None else (t.data_ptr(), t.dtype, 0 if t.is_inference() else t._version)
                 for t in tensors)


def cached_padded_weights(qkv_weight: Tensor, qkv_bias: Optional[Tensor], proj_weight: Tensor,
                          heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`padded_weights`, kept per weight version for inference (a CUDA graph captures them once);
    built per call when the weights train or under ``torch.compile``."""
    trains = torch.is_grad_enabled() and (qkv_weight.requires_grad or proj_weight.requires_grad)
    if trains or torch.compiler.is_compiling():
        return padded_weights(qkv_weight, qkv_bias, proj_weight, heads)
    stamp = _stamp(qkv_weight, qkv_bias, proj_weight) + (heads,)
    hit = _PADDED.get(qkv_weight)
    if hit is None or hit[0] != stamp:
        with torch.no_grad():
            hit = _PADDED[qkv_weight] = (stamp, padded_weights(qkv_weight, qkv_bias, proj_weight, heads))
    return hit[1]


def _normalised(norm: Optional[torch.nn.Module], t: Tensor, d: int) -> Tensor:
    """``t`` with ``norm`` (a qk-norm) applied to its first ``d`` (real) channels only."""
    if norm is None or isinstance(norm, torch.nn.Identity):
        return t
    if torch.is_grad_enabled() and t.requires_grad:
        return torch.cat([norm(t[..., :d]), t[..., d:]], dim=-1)
    t[..., :d] = norm(t[..., :d])
    return t


def padded_heads_attention(x: Tensor, qkv: Tuple[Tensor, Optional[Tensor]], proj: Tuple[Tensor, Optional[Tensor]],
                           heads: int, log_size: Tensor, channels: Optional[Tensor],
                           norms: Tuple[Optional[torch.nn.Module], Optional[torch.nn.Module]] = (None, None),
                           dropout_p: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Self-attention of ``x`` ``(B, T, C)`` with padded heads: ``(output projection's output, keys)``.

    ``qkv``/``proj``: (weight, bias) of the packed q, k, v projection and of the output projection;
    ``channels`` ``(B, T, 2)``: the bias as the fused plan wrote it (None: made here from ``log_size``);
    ``norms``: the q and k norms of qk-norm models. The keys returned are the real channels, ``(B, H, T, D)``.
    """
    b, n, _ = x.shape
    d = qkv[0].shape[0] // (3 * heads)
    weight, bias, proj_weight = cached_padded_weights(qkv[0], qkv[1], proj[0], heads)
    qkv_out = F.linear(x, weight, bias).view(b, n, 3, heads, d + PAD).permute(2, 0, 3, 1, 4)
    q, k, v = qkv_out[0], qkv_out[1], qkv_out[2]  # single views: unbind's could not be written in place
    if channels is None:
        channels = split_log_size(log_size[:, 0, 0, :].float(), d, k.dtype)
    k[..., d:d + 2] = channels[:, None]
    q, k = _normalised(norms[0], q, d), _normalised(norms[1], k, d)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=d ** -0.5)
    return F.linear(out.transpose(1, 2).reshape(b, n, heads * (d + PAD)), proj_weight, proj[1]), k[..., :d]
