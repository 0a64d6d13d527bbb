"""Token merging semantics: bipartite soft matching and the size-weighted merge.

This module is the whole algorithm; everything else in the package wires it into models.

Semantics (those of the ToMe paper's reference implementation):

* tokens alternate between set A (even positions) and set B (odd positions);
* the first ``num_protected`` tokens (class, distillation, register tokens) never merge: they are
  left out of the matching and keep their place at the front of the sequence;
* score = cosine similarity of the metric (attention keys averaged over heads) between A and B;
  each A token picks its best B token, and the ``r`` A tokens with the highest best-score merge
  into their pick (several may pick the same B token: all of them are summed);
* r is capped at ``(tokens - num_protected) // 2``;
* output order: ``[protected tokens, unmerged A tokens by original position, B tokens]``.

Tie-break (documented and identical in eager PyTorch and in exported graphs): equal best-scores rank
the lower A index first; an A token with several equal best B tokens picks the lowest B index.

Merges are "sum" merges. Size-weighting (:func:`merge_wavg`) merges ``x * size`` and ``size`` and
divides, which is the reference's weighted average.

Two lowerings compute identical results:

* ``gather``: TopK + Gather + ScatterElements(reduction=add) (ONNX opset >= 16, we use 18);
* ``onehot``: ranks counted by comparisons, merges as one-hot matrix products. No TopK, ArgMax,
  Gather or Scatter, so it needs no plugin on TensorRT, does not depend on a backend's TopK
  tie-breaking and has no atomics-dependent sums on GPU.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Tuple

import torch

MergeImpl = Literal["gather", "onehot"]
MERGE_IMPLS: Tuple[str, ...] = ("gather", "onehot")

Merge = Callable[[torch.Tensor], torch.Tensor]


def cap_r(r: int, num_tokens: int, num_protected: int) -> int:
    """The number of merges a block can really make (the reference's cap)."""
    return max(0, min(r, (num_tokens - num_protected) // 2))


def split_ab(x: torch.Tensor, num_protected: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split tokens ``(B, T, C)`` into (protected, A, B) with static slices.

    A and B alternate over absolute positions (even = A, as in the reference), so after the protected
    prefix the first unprotected token is in A when ``num_protected`` is even and in B when odd.
    """
    protected, rest = x[:, :num_protected], x[:, num_protected:]
    if num_protected % 2 == 0:
        return protected, rest[:, 0::2], rest[:, 1::2]
    return protected, rest[:, 1::2], rest[:, 0::2]


def _scores(metric: torch.Tensor, num_protected: int) -> torch.Tensor:
    metric = metric / metric.norm(dim=-1, keepdim=True)
    _, a, b = split_ab(metric, num_protected)
    return a @ b.transpose(-1, -2)


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_protected: int = 1, impl: MergeImpl = "gather"
) -> Merge:
    """Match tokens of ``metric`` ``(B, T, C)`` and return ``merge(x)``, a sum-merge of any ``(B, T, C')``.

    ``r`` is capped (see :func:`cap_r`); with nothing to merge the returned function is the identity.
    """
    r = cap_r(r, metric.shape[1], num_protected)
    if r == 0:
        return lambda x: x
    with torch.no_grad():
        scores = _scores(metric, num_protected)
        if impl == "gather":
            return _gather_merge(scores, r, num_protected)
        if impl == "onehot":
            return _onehot_merge(scores, r, num_protected)
    raise ValueError(f"unknown merge impl {impl!r}; expected one of {MERGE_IMPLS}")


def merge_wavg(merge: Merge, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x``; ``size`` ``(B, T, 1)`` counts the patches in each token (None = all 1)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size)
    size = merge(size)
    return x / size, size


# --- gather lowering -------------------------------------------------------------------------------


def _argsort_desc(v: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``v`` descending along the last dim, ties by lower index.

    The exported graph uses TopK (the ONNX spec breaks ties by lower index); eager PyTorch uses a
    stable sort, whose tie order is the same. torch.topk's eager tie order is unspecified.
    """
    if torch.compiler.is_exporting():
        return torch.topk(v, v.shape[-1], dim=-1).indices
    return torch.sort(v, dim=-1, descending=True, stable=True).indices


def _sort_int_asc(idx: torch.Tensor) -> torch.Tensor:
    """Sort distinct integer indices ascending (no ties possible)."""
    if torch.compiler.is_exporting():
        return torch.topk(idx, idx.shape[-1], dim=-1, largest=False).values
    return torch.sort(idx, dim=-1).values


def _gather_merge(scores: torch.Tensor, r: int, num_protected: int) -> Merge:
    n_a, n_b = scores.shape[1], scores.shape[2]
    node_max, node_idx = scores.max(dim=-1)  # best B for each A; ties -> first (lowest) B index
    order = _argsort_desc(node_max)
    src_idx = order[:, :r]  # A tokens that merge, best first
    unm_idx = _sort_int_asc(order[:, r:])  # A tokens that stay, by position
    dst_idx = node_idx.gather(dim=1, index=src_idx)  # the B token each merging A token goes to
    # Work in absolute token positions of the flattened (B*T, C) tokens: a merge is then two row gathers
    # (ONNX Gather copies whole rows; GatherElements indexes every element and measured 2.5x slower) and one
    # scatter-add. Row offsets make the indices valid for any batch size.
    n = scores.shape[0]
    num_tokens = num_protected + n_a + n_b
    a0 = num_protected + num_protected % 2  # position of the first unprotected A token
    b0 = num_protected + 1 - num_protected % 2
    fixed = torch.arange(num_protected, device=scores.device).expand(n, num_protected)
    b_pos = torch.arange(b0, b0 + 2 * n_b, 2, device=scores.device).expand(n, n_b)
    offsets = torch.arange(n, device=scores.device)[:, None] * num_tokens
    keep_rows = (torch.cat([fixed, unm_idx * 2 + a0, b_pos], dim=1) + offsets).reshape(-1)  # output row -> input row
    src_rows = (src_idx * 2 + a0 + offsets).reshape(-1)
    dst_pos = (dst_idx + (num_protected + n_a - r))[..., None]  # output positions of the B tokens they join

    def merge(x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        rows = x.reshape(b * t, c)
        out = rows.index_select(0, keep_rows).reshape(b, t - r, c)
        src = rows.index_select(0, src_rows).reshape(b, r, c)
        return out.scatter_add(1, dst_pos.expand(b, r, c), src)

    return merge


# --- one-hot lowering ------------------------------------------------------------------------------


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Keep only the first True along the last dim (counts, so it is exact on every backend)."""
    m = mask.to(torch.float32)
    return mask & (m.cumsum(dim=-1) == 1)


def _onehot_merge(scores: torch.Tensor, r: int, num_protected: int) -> Merge:
    node_max = scores.amax(dim=-1, keepdim=True)  # (B, nA, 1)
    best = _first_true(scores == node_max)  # (B, nA, nB): one-hot of each A token's best B
    v = node_max[..., 0]
    n_a = v.shape[-1]
    pos = torch.arange(n_a, device=v.device)
    # rank[i] = #{j: v[j] > v[i]} + #{j < i: v[j] == v[i]}: the position of A token i in a stable
    # descending sort, computed with comparisons only.
    vi, vj = v[:, :, None], v[:, None, :]
    earlier = pos[None, :] < pos[:, None]  # earlier[i, j] = j < i
    ahead = (vj > vi) | ((vj == vi) & earlier)
    rank = ahead.to(torch.float32).sum(dim=-1)  # (B, nA)
    merged = rank < r
    kept = ~merged
    # Kept A tokens keep their order: the p-th kept token goes to output row p.
    kept_pos = kept.to(torch.float32).cumsum(dim=-1) - 1
    rows = torch.arange(n_a - r, device=v.device, dtype=torch.float32)
    unm_onehot = kept[:, None, :] & (kept_pos[:, None, :] == rows[None, :, None])  # (B, nA-r, nA)
    into_b = (best & merged[..., None]).transpose(1, 2)  # (B, nB, nA): A token i adds into B row j

    def merge(x: torch.Tensor) -> torch.Tensor:
        protected, a, b = split_ab(x, num_protected)
        unm = unm_onehot.to(x.dtype) @ a
        b = b + into_b.to(x.dtype) @ a
        return torch.cat([protected, unm, b], dim=1)

    return merge
