"""ToMe for timm's VisionTransformer family (ViT/AugReg, DeiT, distilled DeiT, DeiT-III, registers, qk-norm).

The patch swaps the model's class for a subclass whose forward threads ``size`` (and optionally the
token sources) through the blocks explicitly. Blocks and attention modules are not modified and the
state_dict keys are unchanged, so a patched model loads and saves plain timm checkpoints. The ToMe
settings live in one frozen :class:`ToMeConfig` on the model: there is no mutable state shared between
the model and its blocks, and nothing changes between calls.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from .base import ModelInfo, ToMeConfig, TokenMerge

FAMILY = "timm-vit"
DESCRIPTION = (
    "timm VisionTransformer: vit_* (AugReg, MAE/avg-pool, CLIP towers), deit_*, distilled deit_*, "
    "deit3_* (LayerScale), register-token and qk-norm variants"
)

_POOLS = ("token", "avg", "max", "avgmax", "")


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why this timm model cannot be merged correctly, or None when it can."""
    if not isinstance(model, VisionTransformer):
        return f"{type(model).__name__} is not a timm VisionTransformer"
    if getattr(model, "attn_pool", None) is not None:
        return f"attention-pool heads (global_pool={model.global_pool!r}) are not supported yet"
    if model.global_pool not in _POOLS:
        return f"global_pool={model.global_pool!r} is not supported"
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            return f"block {i} is a {type(block).__name__}; only the pre-norm timm Block is supported"
        if type(block.attn) is not Attention:
            return f"block {i} uses {type(block.attn).__name__}; only timm's Attention is supported"
    return None


def model_info(model: VisionTransformer, img_size: Optional[Tuple[int, int]] = None) -> ModelInfo:
    grid = model.patch_embed.grid_size
    if img_size is not None:
        p = model.patch_embed.patch_size
        grid = (img_size[0] // p[0], img_size[1] // p[1])
    block = model.blocks[0]
    return ModelInfo(
        family=FAMILY,
        num_blocks=len(model.blocks),
        num_patches=grid[0] * grid[1],
        num_protected=model.num_prefix_tokens,
        embed_dim=model.embed_dim,
        num_heads=block.attn.num_heads,
        attn_dim=block.attn.attn_dim,
        mlp_hidden=block.mlp.fc1.out_features,
        patch_size=tuple(model.patch_embed.patch_size),
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes,
        distilled=getattr(model, "dist_token", None) is not None,
    )


def _attention(attn: Attention, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm Attention with an additive logit bias (proportional attention); also returns the keys."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = None if bias is None else bias.to(q.dtype)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = x.transpose(1, 2).reshape(b, n, attn.attn_dim)
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    x = attn.proj_drop(attn.proj(x))
    return x, k


State = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


def _block(block: Block, x: torch.Tensor, size, source, bias) -> State:
    """One block: attention, then the merge, then the MLP (where the reference merges)."""
    attn_out, keys = _attention(block.attn, block.norm1(x), bias)
    x = x + block.drop_path1(block.ls1(attn_out))
    if block.tome_merge.merges(x.shape[1]):
        x, size, source, bias = block.tome_merge(x, keys, size, source)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size, source, bias


class ToMeVisionTransformerMixin:
    """Forward of a ToMe-patched timm VisionTransformer (mixed in before the model's own class)."""

    tome: ToMeConfig

    def tome_features(
        self, x: torch.Tensor, trace_source: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Tokens after the final norm, their sizes ``(B, T, 1)`` and optionally their sources ``(B, T, T0)``."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        size = source = bias = None
        if trace_source:
            source = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)[None].expand(x.shape[0], -1, -1)
        for block in self.blocks:
            x, size, source, bias = _block(block, x, size, source, bias)
        return self.norm(x), size, source

    def tome_head(self, x: torch.Tensor, size: Optional[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """The model's head, with average pooling weighted by token size."""
        if size is None or self.global_pool not in ("avg", "avgmax"):
            return self.forward_head(x, pre_logits=pre_logits)
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        pooled = (x * size).sum(dim=1) / size.sum(dim=1)
        if self.global_pool == "avgmax":
            pooled = 0.5 * (x.amax(dim=1) + pooled)
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tome_features(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size, _ = self.tome_features(x)
        return self.tome_head(x, size)

    def forward_with_source(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits and the source map: ``source[b, t, j] = 1`` when input token j is merged into token t."""
        x, size, source = self.tome_features(x, trace_source=True)
        return self.tome_head(x, size), source


_CLASSES: dict = {}


def patch(model: VisionTransformer, cfg: ToMeConfig) -> VisionTransformer:
    """Patch ``model`` in place (or re-configure an already patched one) and return it."""
    base = type(model)
    if not isinstance(model, ToMeVisionTransformerMixin):
        if base not in _CLASSES:
            _CLASSES[base] = type(f"ToMe{base.__name__}", (ToMeVisionTransformerMixin, base), {})
        model.__class__ = _CLASSES[base]
    model.tome = cfg
    for block, r in zip(model.blocks, cfg.r):
        block.tome_merge = TokenMerge(r, model.num_prefix_tokens, cfg.merge_impl, cfg.prop_attn)
    return model
