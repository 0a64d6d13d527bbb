"""What every model family hands to the rest of the package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..info import ModelInfo  # noqa: F401  (what every family hands to the rest of the package)
from ..kernels import attention as gpu_attention
from ..kernels import designs, fused_merge
from ..merge import MERGE_IMPLS, Merge, TokenOwners, bipartite_soft_matching, cap_r, merge_wavg
from ..tasks import CLASSIFY, DENSE, EMBED, OUTPUTS, TOKENS


@dataclass(frozen=True)
class ToMeConfig:
    """The ToMe settings of a patched model. Frozen: changing them means patching again."""

    r: Tuple[int, ...]  # requested r per block (the per-block cap applies at run time)
    merge_impl: str = "gather"  # the lowering traced into exports and run on the CPU
    prop_attn: bool = True
    fused: bool = True  # on CUDA: matching and merge as Triton kernels (same decisions as merge_impl)

    def __post_init__(self) -> None:
        if self.merge_impl not in MERGE_IMPLS:
            raise ValueError(f"merge_impl must be one of {MERGE_IMPLS}, got {self.merge_impl!r}")


class TokenMatch(torch.nn.Module):
    """Bipartite matching of one block, returning the merge function.

    A module (without parameters) so that exported graphs can name its nodes: everything computed here
    is the token-matching path, which quantizers and precision converters must leave in fp32.
    """

    def __init__(self, r: int, num_protected: int, merge_impl: str) -> None:
        super().__init__()
        self.r, self.num_protected, self.merge_impl = r, num_protected, merge_impl

    def forward(self, keys: torch.Tensor) -> Merge:
        """``keys`` ``(B, heads, T, head_dim)``: the metric is their mean over heads, as in the reference."""
        return bipartite_soft_matching(keys.mean(dim=1), self.r, self.num_protected, self.merge_impl)

    def extra_repr(self) -> str:
        return f"r={self.r}, num_protected={self.num_protected}, merge_impl={self.merge_impl!r}"


class SizeBias(NamedTuple):
    """Proportional attention's bias for the next block: a token standing for s patches gets log(s) added to its
    attention logits. ``log`` ``(B, 1, 1, T)``; ``channels`` ``(B, T, 2)``: the same for padded heads, as the
    fused merge writes it (None: made where needed)."""

    log: torch.Tensor
    channels: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, size: torch.Tensor) -> "SizeBias":
        """From token sizes ``(B, T, 1)``."""
        return cls(size.log()[:, None, None, :, 0])


class TokenMerge(torch.nn.Module):
    """One block's ToMe step: match, size-weighted merge, source tracking, next attention's log-size bias.

    Families attach one to each block as ``tome_merge`` (no parameters: state_dict keys are unchanged).
    """

    def __init__(self, r: int, num_protected: int, merge_impl: str, prop_attn: bool, fused: bool = True) -> None:
        super().__init__()
        self.match = TokenMatch(r, num_protected, merge_impl)
        self.prop_attn = prop_attn
        self.fused = fused

    def merges(self, num_tokens: int) -> bool:
        """Whether this block merges anything at this token count (r after the reference's cap)."""
        return cap_r(self.match.r, num_tokens, self.match.num_protected) > 0

    def forward(
        self, x: torch.Tensor, keys: torch.Tensor, size: Optional[torch.Tensor], source: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[SizeBias]]:
        if self.fused and source is None and fused_merge.available(x):
            one_kernel = designs.design(x).merge == "one"
            x, size, log, channels = fused_merge.merge_weighted(x, keys, size, self.match.r, self.match.num_protected,
                                                                one_kernel)
            return x, size, None, SizeBias(log, channels) if self.prop_attn else None
        merge = self.match(keys)
        x, size = merge_wavg(merge, x, size)
        if source is not None:
            source = merge(source)
        return x, size, source, SizeBias.of(size) if self.prop_attn else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[SizeBias],
              dropout_p: float = 0.0) -> torch.Tensor:
    """Self-attention of ``(B, heads, T, head_dim)`` q/k/v with ToMe's proportional-attention bias.

    ``bias``: the keys' sizes (None before the first merge). Every family calls this, so the formulation of
    proportional attention is chosen in one place: the additive mask on the CPU and in exports, on a GPU the one
    measured fastest there at this batch (:mod:`tome_export.kernels.designs`) among those that take q, k, v as
    they are (padded heads start at the projection: see :func:`uses_padded_heads`).
    """
    if bias is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout_p)
    formulation = designs.design(q).attention_without("padded")
    return gpu_attention.FORMULATIONS[formulation](q, k, v, bias.log, dropout_p)


def uses_padded_heads(x: torch.Tensor, bias: Optional[SizeBias]) -> bool:
    """Whether a block's attention on ``x`` ``(B, T, C)`` runs with padded heads
    (:func:`tome_export.kernels.attention.padded_heads_attention`): where its GPU design puts them first and
    there is a bias to carry. A family that can pad its projections asks this before projecting."""
    return bias is not None and designs.design(x).attention[0] == "padded"


# A block's ToMe state between blocks: tokens, sizes, sources, the next attention's log-size bias.
State = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[SizeBias]]
BlockForward = Callable[[torch.nn.Module, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                         Optional[SizeBias]], State]


def identity_source(batch: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
    """The source map before any merge, ``(batch, tokens, tokens)``: token t holds input token t alone."""
    return torch.eye(tokens, dtype=like.dtype, device=like.device)[None].expand(batch, -1, -1)


# What the state's source slot tracks: nothing (False), the source map (True), or where each input token is.
OWNERS = "owners"
Track = Union[bool, str]


def run_blocks(blocks: Iterable[torch.nn.Module], block_forward: BlockForward, x: torch.Tensor,
               trace_source: Track = False) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Tokens ``x`` through ``blocks`` with ToMe's state, starting unmerged: ``(tokens, size, source)``.

    ``trace_source``: True tracks the source map ``(B, T, T0)``; :data:`OWNERS` tracks
    :class:`~tome_export.merge.TokenOwners` (which token holds each input token) in its place.
    """
    size = bias = None
    source: Any = None
    if trace_source == OWNERS:
        source = TokenOwners.start(x.shape[0], x.shape[1], x.device)
    elif trace_source:
        source = identity_source(x.shape[0], x.shape[1], x)
    for block in blocks:
        x, size, source, bias = block_forward(block, x, size, source, bias)
    return x, size, source


def merge_destinations(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, np.ndarray]:
    """Run ``model`` on ``x``; per merging block, ``rows[b, t]`` = the output token that holds input token t.

    Read from each block's own merge function applied to one-hot token ids, so it is what the model ran,
    whatever its lowering and precision. Keys are block names, in execution order.
    """
    found: Dict[str, np.ndarray] = {}

    def hook(name: str) -> Callable:
        def record(module: TokenMatch, inputs: Tuple[torch.Tensor], merge: Merge) -> None:
            keys = inputs[0]  # (B, heads, T, head_dim)
            found[name] = merge(identity_source(keys.shape[0], keys.shape[2], keys)).argmax(dim=1).cpu().numpy()
        return record

    handles = [m.register_forward_hook(hook(name.rsplit(".tome_merge", 1)[0]))
               for name, m in model.named_modules() if isinstance(m, TokenMatch)]
    merges = [m for m in model.modules() if isinstance(m, TokenMerge)]
    fused = [m.fused for m in merges]
    try:
        for m in merges:  # the fused kernel bypasses TokenMatch (and so these hooks); its decisions are the same
            m.fused = False
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, was in zip(merges, fused):
            m.fused = was
    return found


@dataclass(frozen=True)
class TaskPlan:
    """What a patched model's forward returns (:func:`tome_export.models.set_task` resolves it against the model).

    ``blocks``: how many blocks run (None: all); ``final_norm``: the family's per-token final norm after them;
    ``prefix``: the leading protected tokens (never part of ``dense``; in ``tokens`` only with ``keep_prefix``);
    ``grid``: ``(grid_h, grid_w)`` when ``dense`` is returned as ``(B, C, grid_h, grid_w)``.
    """

    name: str = CLASSIFY
    blocks: Optional[int] = None
    final_norm: bool = True
    prefix: int = 0
    keep_prefix: bool = False
    normalize: bool = False
    grid: Optional[Tuple[int, int]] = None

    @property
    def outputs(self) -> Tuple[str, ...]:
        return OUTPUTS[self.name]


def token_owners(tracked: Any) -> torch.Tensor:
    """Which final token holds each input token ``(B, T0)`` int64, from :class:`TokenOwners` or a source map."""
    if isinstance(tracked, TokenOwners):
        return tracked.index
    return tracked.argmax(dim=1)  # a source map (B, T, T0): each input token is in exactly one final token


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = x[b, index[b, j]]`` for tokens ``x`` ``(B, T, C)``: one Gather of whole rows in an export."""
    b, t, c = x.shape
    offsets = torch.arange(b, device=x.device)[:, None] * t
    return F.embedding(index + offsets, x.reshape(b * t, c))


def _sizes(x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    return size if size is not None else torch.ones_like(x[..., :1])


# The outputs of each task from (model, final tokens, their sizes, tracked owners or source map, plan).
def _classify(model: "ToMeModel", x, size, tracked, plan: TaskPlan) -> Tuple[torch.Tensor, ...]:
    return (model.tome_head(x, size),)


def _embed(model: "ToMeModel", x, size, tracked, plan: TaskPlan) -> Tuple[torch.Tensor, ...]:
    pooled = model.tome_pooled(x, size)
    return (F.normalize(pooled, dim=-1) if plan.normalize else pooled,)


def _dense(model: "ToMeModel", x, size, tracked, plan: TaskPlan) -> Tuple[torch.Tensor, ...]:
    features = gather_tokens(x, token_owners(tracked)[:, plan.prefix:])  # (B, patches, C)
    if plan.grid is not None:
        features = features.transpose(1, 2).reshape(x.shape[0], x.shape[2], *plan.grid)
    return (features,)


def _tokens(model: "ToMeModel", x, size, tracked, plan: TaskPlan) -> Tuple[torch.Tensor, ...]:
    start = 0 if plan.keep_prefix else plan.prefix
    sizes = _sizes(x, size)[:, start:, 0].round().to(torch.int64)
    return x[:, start:], sizes, token_owners(tracked)[:, plan.prefix:] - start


TASK_HEADS = {CLASSIFY: _classify, EMBED: _embed, DENSE: _dense, TOKENS: _tokens}


class ToMeModel:
    """What every patched model class mixes in before its own class.

    A family implements ``tome_features(x, trace_source, blocks, final_norm) -> (tokens, size, source)``,
    ``tome_head(tokens, size)`` and ``tome_pooled(tokens, size)`` (its embedding); the forward passes are the same
    for all families and return what the model's :class:`TaskPlan` asks for.
    """

    tome: ToMeConfig
    tome_task: TaskPlan = TaskPlan()

    @property
    def r(self) -> Tuple[int, ...]:
        """The requested r per block (read-only: the reference's ``model.r = 16`` has no effect here)."""
        return self.tome.r

    @r.setter
    def r(self, value: Any) -> None:
        # The schedule lives in each block's TokenMerge; silently storing a new r would change nothing.
        raise AttributeError(f"model.r is fixed when the model is patched: call tome_export.patch(model, {value!r}) "
                             f"again to re-configure (it keeps the weights)")

    def forward(self, x: torch.Tensor) -> Any:
        """The task's output: one tensor, or a tuple for a task with several outputs (``tome_task.outputs``)."""
        outputs = self.tome_outputs(x)
        return outputs[0] if len(outputs) == 1 else outputs

    def forward_with_source(self, x: torch.Tensor) -> Tuple[Any, torch.Tensor]:
        """The forward's output and the source map: ``source[b, t, j] = 1`` when input token j is merged into
        token t."""
        *outputs, source = self.tome_outputs(x, trace_source=True)
        return (outputs[0] if len(outputs) == 1 else tuple(outputs)), source

    def tome_outputs(self, x: torch.Tensor, trace_source: bool = False) -> Tuple[torch.Tensor, ...]:
        """The task's outputs in the order of their names, then (``trace_source``) the source map."""
        plan = self.tome_task
        track: Track = True if trace_source else (OWNERS if plan.name in (DENSE, TOKENS) else False)
        x, size, tracked = self.tome_features(x, track, plan.blocks, plan.final_norm)
        outputs = TASK_HEADS[plan.name](self, x, size, tracked, plan)
        return outputs + ((tracked,) if trace_source else ())


_PATCHED_CLASSES: dict = {}


def patch_model(model: torch.nn.Module, mixin: type, blocks, num_protected: int, cfg: ToMeConfig) -> torch.nn.Module:
    """Swap ``model``'s class for ``mixin`` + its class (once), store ``cfg`` and give every block its TokenMerge.

    Patching again re-configures. Blocks get a parameter-free ``tome_merge`` child, so state_dict keys stay.
    """
    base = type(model)
    if not isinstance(model, mixin):
        if base not in _PATCHED_CLASSES:
            _PATCHED_CLASSES[base] = type(f"ToMe{base.__name__}", (mixin, base), {})
        model.__class__ = _PATCHED_CLASSES[base]
    model.tome = cfg
    for block, r in zip(blocks, cfg.r):
        block.tome_merge = TokenMerge(r, num_protected, cfg.merge_impl, cfg.prop_attn, cfg.fused)
    return model
