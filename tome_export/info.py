"""Static shape facts of a ViT that every layer needs (schedules, FLOPs, manifests), without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


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
