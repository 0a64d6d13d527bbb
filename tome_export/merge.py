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

Degenerate keys: a metric row that is all zero or not finite has no direction, so its cosines are NaN.
A NaN score counts as -inf (computed as :data:`NO_SCORE`, a finite value below every cosine). An A token
whose scores are all NaN therefore picks the lowest B index and ranks after every A token with a real best
score (ties by lower A index, as above), and no A token picks a degenerate B token while it has a real
score elsewhere. Mass is always conserved: every input token lands in exactly one output row.

Merges are "sum" merges. Size-weighting (:func:`merge_wavg`) merges ``x * size`` and ``size`` and
divides, which is the reference's weighted average.

Following patches through the blocks: a merge function applied to :class:`TokenOwners` (for each input token, the
row of the current tokens that holds it) returns where those tokens are after the merge, by composing the index
with the block's :meth:`MergeFn.rows` (one small integer gather per block). After the last block it says which
final token holds each patch: "unmerging" is then one row gather of the final tokens, with static shapes, and
costs O(patches) per block where the source map of ``--trace-source`` costs O(tokens x patches).

The canonical form of a matching is :func:`destinations`: for each input token, the output row it lands
in. It is the reference for every implementation of the matching, fused kernels included. Two lowerings
compute identical matchings and add the tokens of each output row in the same order, ``[protected, B,
A by position]``: their results differ only where a backend's matrix product adds in blocks rather than in
order (ONNX Runtime's CPU GEMM does for long token rows; the difference is rounding):

* ``gather`` (ONNX Runtime, OpenVINO): ArgMax picks each A token's B token and TopK ranks the A tokens (ONNX
  breaks ArgMax and TopK ties by lower index; eager PyTorch uses ``max`` and a stable sort, whose ties are
  the same); the merge is a row Gather and a ScatterElements(reduction=add) of the r merged rows (ONNX
  opset >= 16, we use 18);
* ``onehot`` (TensorRT): the matching by comparisons, a min and a cumulative sum only, so it is exact
  whatever a backend's tie order; the merge is one product with the one-hot matrix of the destinations.
  No TopK, ArgMax or Scatter and Gathers only with constant indices: no plugin on TensorRT and no
  atomics-dependent sums on GPU.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .schedule import cap_r

MergeImpl = Literal["gather", "onehot"]
MERGE_IMPLS: Tuple[str, ...] = ("gather", "onehot")

Merge = Callable[[torch.Tensor], torch.Tensor]


class TokenOwners(NamedTuple):
    """Where the input tokens are: ``index[b, j]`` is the row of the current tokens that holds input token j,
    ``(B, T0)`` int64. Before any merge, token j is row j; a merge function maps it to the rows after the merge."""

    index: torch.Tensor

    @classmethod
    def start(cls, batch: int, tokens: int, device: torch.device) -> "TokenOwners":
        return cls(torch.arange(tokens, device=device).expand(batch, tokens))


class MergeFn:
    """One block's merge: ``merge(x)`` sum-merges tokens ``(B, T, C)`` into ``(B, T - r, C)``; ``merge(owners)``
    (:class:`TokenOwners`) follows the input tokens to the rows that hold them after the merge.

    :meth:`rows` is the matching's canonical form (:func:`destinations`), computed from this matching's own
    decisions (not matched again) only when asked for.
    """

    def __init__(self, apply: Merge, rows: Callable[[], torch.Tensor]) -> None:
        self._apply, self._rows = apply, rows

    def __call__(self, x):
        if isinstance(x, TokenOwners):
            return TokenOwners(self.rows().gather(1, x.index))
        return self._apply(x)

    def rows(self) -> torch.Tensor:
        """For each token, the output row it lands in, ``(B, T)`` int64 (what :func:`destinations` returns)."""
        return self._rows()


def split_ab(x: torch.Tensor, num_protected: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split tokens ``(B, T, C)`` into (protected, A, B) with static slices.

    A and B alternate over absolute positions (even = A, as in the reference), so after the protected
    prefix the first unprotected token is in A when ``num_protected`` is even and in B when odd.
    """
    protected, rest = x[:, :num_protected], x[:, num_protected:]
    if num_protected % 2 == 0:
        return protected, rest[:, 0::2], rest[:, 1::2]
    return protected, rest[:, 1::2], rest[:, 0::2]


def destinations(metric: torch.Tensor, r: int, num_protected: int) -> torch.Tensor:
    """For each token of ``metric`` ``(B, T, C)``, the output row it lands in: ``(B, T)`` int64.

    The canonical form of the matching (after the cap on r), with the semantics, tie-break and degenerate-key
    rule of this module: protected token t stays at row t, unmerged A tokens fill the next rows by position,
    B token j is at row ``T - r - nB + j`` and a merged A token is at its B token's row.
    """
    n, t, _ = metric.shape
    r = cap_r(r, t, num_protected)
    positions = torch.arange(t, device=metric.device)
    if r == 0:
        return positions.expand(n, t).clone()
    layout = _layout(t, num_protected, r, metric.device)
    with torch.no_grad():
        merged, best_b = _match(metric, layout)
        return _rows(_rows_of_a(merged, best_b, layout), layout, positions).to(torch.int64)


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_protected: int = 1, impl: MergeImpl = "gather"
) -> Merge:
    """Match tokens of ``metric`` ``(B, T, C)`` and return ``merge(x)``, a sum-merge of any ``(B, T, C')`` (a
    :class:`MergeFn`, which also follows :class:`TokenOwners`).

    ``r`` is capped (see :func:`cap_r`); with nothing to merge the returned function is the identity.
    """
    if impl not in MERGE_IMPLS:
        raise ValueError(f"unknown merge impl {impl!r}; expected one of {MERGE_IMPLS}")
    r = cap_r(r, metric.shape[1], num_protected)
    if r == 0:
        return lambda x: x
    layout = _layout(metric.shape[1], num_protected, r, metric.device)
    with torch.no_grad():
        if impl == "gather":
            return _gather_merge(_scores(metric, layout), layout)
        return _onehot_merge(_rows_of_a(*_match(metric, layout), layout), layout)


def merge_wavg(merge: Merge, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x``; ``size`` ``(B, T, 1)`` counts the patches in each token (None = all 1)."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size)
    size = merge(size)
    return x / size, size


# --- shared: where the tokens sit, their scores ---------------------------------------------------


class _Layout(NamedTuple):
    """Where the tokens of one block sit: static facts of (tokens, protected, r), built as constants."""

    num_tokens: int
    num_protected: int
    r: int
    first_a: int  # position of A token 0 (A tokens are the unprotected even positions)
    first_b: int  # position of B token 0
    a_pos: torch.Tensor  # (nA,) positions of the A tokens
    b_pos: torch.Tensor  # (nB,) positions of the B tokens

    @property
    def first_b_row(self) -> int:
        """Output row of B token 0: after the protected and the unmerged A tokens."""
        return self.num_protected + len(self.a_pos) - self.r


def _layout(num_tokens: int, num_protected: int, r: int, device: torch.device) -> _Layout:
    first_a = num_protected + num_protected % 2
    first_b = num_protected + 1 - num_protected % 2
    a_pos = torch.arange(first_a, num_tokens, 2, device=device)
    b_pos = torch.arange(first_b, num_tokens, 2, device=device)
    return _Layout(num_tokens, num_protected, r, first_a, first_b, a_pos, b_pos)


# What a NaN score (a key without direction) becomes: below every cosine, so it acts as -inf. Finite, because
# OpenVINO's CPU ReduceMax returns the lowest finite float, not -inf, for a row of -inf.
NO_SCORE = -2.0


def _scores(metric: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Cosine similarity of every A token with every B token ``(B, nA, nB)``; NaN (no direction) is NO_SCORE."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric.index_select(1, layout.a_pos), metric.index_select(1, layout.b_pos)
    scores = a @ b.transpose(-1, -2)
    return scores.masked_fill(scores.isnan(), NO_SCORE)


# --- the matching by comparisons (onehot lowering, destinations) -------------------------------


def _match(metric: torch.Tensor, layout: _Layout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which A tokens merge ``(B, nA)`` bool, and each A token's best B index ``(B, nA)`` (float32)."""
    scores = _scores(metric, layout)
    best = scores.amax(dim=-1, keepdim=True)  # (B, nA, 1)
    n_b = scores.shape[-1]
    b_index = torch.arange(n_b, device=scores.device, dtype=torch.float32)
    best_b = torch.where(scores == best, b_index, n_b).amin(dim=-1)  # first (lowest) B with the best score
    # Rank in a stable descending sort: A token j is ahead of i when its best score is higher, or equal and
    # j < i. Counting comparisons keeps the tie-break exact on every backend.
    n_a = scores.shape[1]
    a_index = torch.arange(n_a, device=scores.device)
    earlier = a_index < a_index[:, None]  # earlier[i, j] = j < i
    other = best.transpose(1, 2)
    ahead = (other > best) | ((other == best) & earlier)
    merged = ahead.to(torch.float32).sum(dim=-1) < layout.r
    return merged, best_b


def _rows_of_a(merged: torch.Tensor, best_b: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Output row of every A token ``(B, nA)`` (float32): its B token's row if merged, else the next free row."""
    kept_row = (layout.num_protected + torch.arange(len(layout.a_pos), device=merged.device)
                - merged.to(torch.float32).cumsum(dim=-1))  # minus the merged A tokens before it
    return torch.where(merged, best_b + layout.first_b_row, kept_row)


def _rows(a_rows: torch.Tensor, layout: _Layout, order: torch.Tensor) -> torch.Tensor:
    """Output rows ``(B, len(order))`` of the tokens at positions ``order``, given the rows of the A tokens."""
    p = layout.num_protected
    is_a = (order >= p) & (order % 2 == 0)
    a_index = ((order - layout.first_a) // 2).clamp(min=0)
    fixed = torch.where(order < p, order, layout.first_b_row + (order - layout.first_b) // 2)  # protected, B
    return torch.where(is_a, a_rows.index_select(1, a_index), fixed.to(torch.float32))


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


def _gather_merge(scores: torch.Tensor, layout: _Layout) -> MergeFn:
    n, n_a = scores.shape[:2]
    t, r, p = layout.num_tokens, layout.r, layout.num_protected
    best, best_b = scores.max(dim=-1)  # ties: the first (lowest) B index, in PyTorch and in ONNX ArgMax
    src, kept = _argsort_desc(best).split([r, n_a - r], dim=-1)  # A indices: merging ones best first
    src, kept = _sort_int_asc(src), _sort_int_asc(kept)  # by position: each B row adds its A tokens in order
    merging = src
    dst = (best_b.gather(1, src) + layout.first_b_row)[..., None]  # output rows of their B tokens
    # Rows of the flattened (B*T, C) tokens. F.embedding is a row gather that exports to one ONNX Gather of
    # whole rows (GatherElements indexes every element and measured 2.5x slower).
    offsets = torch.arange(n, device=scores.device)[:, None] * t
    fixed = torch.arange(p, device=scores.device) + offsets
    first_a = layout.first_a + offsets
    keep = torch.cat([fixed, kept * 2 + first_a, layout.b_pos + offsets], dim=1)
    src = src * 2 + first_a

    def merge(x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        flat = x.reshape(b * t, c)
        return F.embedding(keep, flat).scatter_add(1, dst.expand(b, r, c), F.embedding(src, flat))

    def rows() -> torch.Tensor:
        merged = (merging[:, :, None] == torch.arange(n_a, device=scores.device)).any(dim=1)  # (B, nA)
        a_rows = _rows_of_a(merged, best_b.to(torch.float32), layout)
        return _rows(a_rows, layout, torch.arange(t, device=scores.device)).to(torch.int64)

    return MergeFn(merge, rows)


# --- one-hot lowering ------------------------------------------------------------------------------


def _onehot_merge(a_rows: torch.Tensor, layout: _Layout) -> MergeFn:
    # Columns in the order [protected, B, A]: the product adds each B token first and its merged A tokens
    # after it by position, the order of the gather lowering's scatter-add.
    order = torch.cat([torch.arange(layout.num_protected, device=a_rows.device), layout.b_pos, layout.a_pos])
    rows = _rows(a_rows, layout, order)  # (B, T)
    out_rows = torch.arange(layout.num_tokens - layout.r, device=a_rows.device, dtype=torch.float32)
    onehot = (rows[:, None, :] == out_rows[:, None]).to(torch.float32)  # (B, T - r, T)

    def merge(x: torch.Tensor) -> torch.Tensor:
        return onehot.to(x.dtype) @ x.index_select(1, order)

    def rows_by_position() -> torch.Tensor:
        positions = torch.arange(layout.num_tokens, device=a_rows.device)
        return _rows(a_rows, layout, positions).to(torch.int64)

    return MergeFn(merge, rows_by_position)
