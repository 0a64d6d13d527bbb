"""What every model family hands to the rest of the package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from ..merge import MERGE_IMPLS


@dataclass(frozen=True)
class ToMeConfig:
    """The ToMe settings of a patched model. Frozen: changing them means patching again."""

    r: Tuple[int, ...]  # requested r per block (the per-block cap applies at run time)
    merge_impl: str = "gather"
    prop_attn: bool = True

    def __post_init__(self) -> None:
        if self.merge_impl not in MERGE_IMPLS:
            raise ValueError(f"merge_impl must be one of {MERGE_IMPLS}, got {self.merge_impl!r}")


@dataclass(frozen=True)
class ModelInfo:
    """Static shape facts of a ViT, enough for schedules, manifests and analytic FLOPs."""

    family: str
    num_blocks: int
    num_patches: int
    num_protected: int  # class + distillation + register tokens
    embed_dim: int
    num_heads: int
    attn_dim: int
    mlp_hidden: int
    patch_size: Tuple[int, int]
    in_chans: int
    num_classes: int
    distilled: bool = False

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_protected
