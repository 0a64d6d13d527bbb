"""ToMe for timm's VisionTransformer family (ViT/AugReg, DeiT, distilled DeiT, DeiT-III, MAE, CLIP, DINOv2, SigLIP).

The patch swaps the model's class for a subclass whose forward threads ``size`` (and optionally the
token sources) through the blocks explicitly. Blocks and attention modules are not modified and the
state_dict keys are unchanged, so a patched model loads and saves plain timm checkpoints. The ToMe
settings live in one frozen :class:`ToMeConfig` on the model: there is no mutable state shared between
the model and its blocks, and nothing changes between calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.layers import Attention
from timm.layers.attention_pool import AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer

from ..info import ModelInfo
from ..preprocess import Preprocessing
from ..kernels.attention import padded_heads_attention
from .base import (SizeBias, State, Track, attention, ToMeConfig, ToMeModel, patch_model, run_blocks,
                   uses_padded_heads)
from . import digits_vit
from .checkpoint import hub_reachable, read_state_dict
from .family import Family

NAME = "timm-vit"
DESCRIPTION = (
    "timm VisionTransformer: vit_* (AugReg, MAE/avg-pool, CLIP, DINOv2, SigLIP/attention-pool), deit_*, "
    "distilled deit_*, deit3_* (LayerScale), register-token and qk-norm variants"
)
MODEL_CLASS = VisionTransformer  # models of this family (unsupported variants included)
SOURCE = "timm"

_CHECKS = "r=0 identity, reference parity, ONNX parity"
# (family, names, what the tests check) for --list-models and the README
VERIFIED: Tuple[Tuple[str, str, str], ...] = (
    ("AugReg ViT", "vit_t16 vit_s16 vit_b16 vit_l16, vit_{small,base,large}_patch16_{224,384}.augreg*",
     _CHECKS + ", training"),
    ("DeiT", "deit_t deit_s deit_b (deit_*_patch16_{224,384})",
     "r=0 identity, reference parity (its ONNX graph is the ViT's)"),
    ("distilled DeiT", "deit_*_distilled (class + distillation token protected)", _CHECKS + ", sources"),
    ("DeiT-III (LayerScale)", "deit3_s deit3_b (deit3_*_patch16_{224,384})", _CHECKS),
    ("MAE (avg pool + fc_norm)", "vit_*_patch16_224.mae with global_pool='avg'; --checkpoint of a fine-tuned "
     "MAE (avg pool inferred)", _CHECKS + ", size-weighted pooling"),
    ("CLIP vision towers", "vit_*_clip_224 (norm_pre), vit_*_clip_quickgelu_224", _CHECKS),
    ("DINOv2 (LayerScale + registers)", "vit_*_patch14_reg4_dinov2 at 518 px, vit_*_patch14_dinov2",
     _CHECKS + ", registers protected"),
    ("SigLIP (attention-pool head)", "vit_*_siglip_* (global_pool='map')", _CHECKS + ", size-biased pooling"),
)

_POOLS = ("token", "avg", "max", "avgmax", "", "map")

# Block and attention types of timm's VisionTransformer that ToMe cannot merge as it is defined.
_BLOCK_REASONS = {
    "ParallelScalingBlock": "attention and MLP run in parallel on the same input (no point between them to merge)",
    "DiffParallelScalingBlock": "attention and MLP run in parallel on the same input (no point between them to merge)",
    "ParallelThingsBlock": "parallel attention branches have no single set of keys to match tokens on",
    "ResPostBlock": "post-norm residual blocks (ResPostBlock) are not supported",
}
_ATTENTION_REASONS = {
    "DiffAttention": "differential attention (two softmax maps per head) is not supported",
}


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why this timm model cannot be merged correctly, or None when it can."""
    if not isinstance(model, VisionTransformer):
        cls = type(model).__name__
        known = next((why for key, why in _UNMERGEABLE.items() if cls.startswith(key)), None)
        return known or f"{cls} is not a timm VisionTransformer"
    if model.global_pool not in _POOLS:
        return f"global_pool={model.global_pool!r} is not supported (token, avg, max, avgmax and map are)"
    pool = getattr(model, "attn_pool", None)
    if pool is not None and (type(pool) is not AttentionPoolLatent or pool.pos_embed is not None):
        return f"attention pool {type(pool).__name__} with position embeddings or of another kind is not supported"
    for i, block in enumerate(model.blocks):
        kind = type(block).__name__
        if type(block) is not Block:
            return f"block {i} is a {kind}: " + _BLOCK_REASONS.get(kind, "only the pre-norm timm Block is supported")
        kind = type(block.attn).__name__
        if type(block.attn) is not Attention:
            return f"block {i} uses {kind}: " + _ATTENTION_REASONS.get(kind, "only timm's Attention is supported")
    return None


def data_config(model: VisionTransformer) -> Dict[str, Any]:
    """timm's eval preprocessing of the model's pretrained config, at the size the model really takes."""
    from timm.data import resolve_data_config

    cfg = dict(resolve_data_config(model=model))
    # timm keeps the pretrained config's size when a model is created with another img_size: the
    # model's own patch embedding says what it takes.
    size = getattr(model.patch_embed, "img_size", None)
    if size is not None and len(size) == 2:
        cfg["input_size"] = (cfg["input_size"][0], int(size[0]), int(size[1]))
    return cfg


def model_info(model: VisionTransformer, img_size: Optional[Tuple[int, int]] = None) -> ModelInfo:
    grid = model.patch_embed.grid_size
    if img_size is not None:
        p = model.patch_embed.patch_size
        grid = (img_size[0] // p[0], img_size[1] // p[1])
    block = model.blocks[0]
    return ModelInfo(
        family=NAME,
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


def _attention(attn: Attention, x: torch.Tensor, bias: Optional[SizeBias]) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm Attention with an additive logit bias (proportional attention); also returns the keys."""
    b, n, _ = x.shape
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if attn.gate is None and isinstance(attn.norm, torch.nn.Identity) and uses_padded_heads(x, bias):
        out, k = padded_heads_attention(x, (attn.qkv.weight, attn.qkv.bias), (attn.proj.weight, attn.proj.bias),
                                        attn.num_heads, bias.log, bias.channels, (attn.q_norm, attn.k_norm),
                                        dropout_p)
        return attn.proj_drop(out), k
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    x = attention(q, k, v, bias, dropout_p=dropout_p)
    x = x.transpose(1, 2).reshape(b, n, attn.attn_dim)
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    x = attn.proj_drop(attn.proj(x))
    return x, k


def _block(block: Block, x: torch.Tensor, size, source, bias) -> State:
    """One block: attention, then the merge, then the MLP (where the reference merges)."""
    attn_out, keys = _attention(block.attn, block.norm1(x), bias)
    x = x + block.drop_path1(block.ls1(attn_out))
    if block.tome_merge.merges(x.shape[1]):
        x, size, source, bias = block.tome_merge(x, keys, size, source)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size, source, bias


class ToMeVisionTransformerMixin(ToMeModel):
    """Forward of a ToMe-patched timm VisionTransformer (mixed in before the model's own class)."""

    tome: ToMeConfig

    def tome_features(
        self, x: torch.Tensor, trace_source: Track = False, blocks: Optional[int] = None, final_norm: bool = True
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Tokens after the first ``blocks`` blocks (None: all) and the final norm, their sizes ``(B, T, 1)`` and
        optionally what :func:`run_blocks` tracks (the sources ``(B, T, T0)``)."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x, size, source = run_blocks(list(self.blocks)[:blocks], _block, x, trace_source)
        return (self.norm(x) if final_norm else x), size, source

    def tome_head(self, x: torch.Tensor, size: Optional[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """The model's head; pooling weighs each token by its size (as if its patches were all still there)."""
        if size is None or self.global_pool not in ("avg", "avgmax", "map"):
            return self.forward_head(x, pre_logits=pre_logits)
        if not self.pool_include_prefix:
            x, size = x[:, self.num_prefix_tokens:], size[:, self.num_prefix_tokens:]
        if self.attn_pool is not None:
            # A token standing for s patches gets log(s) on its pooling logits: s copies of it would.
            pooled = self.attn_pool(x, attn_mask=size.log()[:, None, None, :, 0].to(x.dtype))
        else:
            pooled = (x * size).sum(dim=1) / size.sum(dim=1)
            if self.global_pool == "avgmax":
                pooled = 0.5 * (x.amax(dim=1) + pooled)
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def tome_pooled(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        """The embedding: the pooled tokens before the classifier, or a CLIP tower's image projection (timm keeps it
        as the head)."""
        pooled = self.tome_head(x, size, pre_logits=True)
        return self.head(pooled) if clip_projection(self) else pooled

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tome_features(x)[0]


def clip_projection(model: VisionTransformer) -> bool:
    """Whether the head is a CLIP tower's image projection (timm loads it as the head of the image-text weights,
    e.g. ``.openai``, ``.laion2b``), not a classifier fine-tuned on top (tags with ``ft``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return "_clip_" in cfg.get("architecture", "") and "ft" not in (cfg.get("tag") or "ft").split("_") \
        and isinstance(model.head, torch.nn.Linear)


def task_reason(model: VisionTransformer, task: str) -> Optional[str]:
    """Why ``task`` does not apply to this model (None when it does)."""
    if task == "embed" and model.global_pool == "":
        return "it has no pooling (global_pool=''): there is no pooled embedding; use --task tokens or dense"
    return None


def patch(model: VisionTransformer, cfg: ToMeConfig) -> VisionTransformer:
    """Patch ``model`` in place (or re-configure an already patched one) and return it."""
    return patch_model(model, ToMeVisionTransformerMixin, model.blocks, model.num_prefix_tokens, cfg)


# --- registration: names, weights, checkpoints ------------------------------------------------------------

# The AugReg aliases pin augreg_in21k_ft_in1k, the weights the ToMe paper reports on (vit_b16: 84.57 top-1 off the
# shelf); a bare timm name such as vit_base_patch16_224 follows timm's default tag (augreg2_in21k_ft_in1k today).
# Manifests record the tag that was used (model.pretrained_tag).
ALIASES: Dict[str, str] = {
    "vit_t16": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_s16": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_b16": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_l16": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "vit_l16_384": "vit_large_patch16_384.augreg_in21k_ft_in1k",
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
    "deit_t_distilled": "deit_tiny_distilled_patch16_224",
    "deit_s_distilled": "deit_small_distilled_patch16_224",
    "deit_b_distilled": "deit_base_distilled_patch16_224",
    "deit3_s": "deit3_small_patch16_224",
    "deit3_b": "deit3_base_patch16_224",
    "clip_b16": "vit_base_patch16_clip_224",
    "dinov2_s14_reg": "vit_small_patch14_reg4_dinov2",
    digits_vit.ALIAS: digits_vit.MODEL_NAME,  # the project's own 4-block, 32 px ViT (registered with timm on import)
}

# timm architectures ToMe cannot merge as defined (matched by class-name prefix), mostly because token positions
# are baked into their attention: merging would silently change them.
_UNMERGEABLE = {
    "Eva": "rotary position embeddings (RoPE) in every block tie each token to its grid position",
    "Beit": "relative position bias tables in every block are indexed by the token grid",
    "VisionTransformerRelPos": "relative position bias tables are indexed by the token grid",
    "VisionTransformerSAM": "windowed attention and relative positions need the full token grid",
    "SwinTransformer": "windowed attention needs the full token grid",
    "NaFlexVit": "variable-resolution patch sequences with masks are not supported",
    "Cait": "talking-heads attention mixes heads and class-attention layers follow the blocks",
    "Xcit": "cross-covariance attention and local patch interaction convolutions need the token grid",
    "PoolingVisionTransformer": "pooling layers between stages reshape tokens back into a grid",
    "MultiScaleVit": "pooling attention works on the token grid",
    "Hiera": "mask-unit attention works on the token grid",
}


def resolve(name: str) -> Optional[str]:
    """A timm model name (with or without its pretrained tag), or None."""
    import timm

    return name if timm.is_model(name) or timm.is_model(name.split(".")[0]) else None


def create(name: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    """``timm.create_model``; for pretrained weights offline, the hub client is told to use its cache only (it
    would otherwise retry for a minute)."""
    import huggingface_hub.constants as hub
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    offline_before = hub.HF_HUB_OFFLINE
    if not offline_before and not hub_reachable():
        hub.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    finally:
        hub.HF_HUB_OFFLINE = offline_before


def load_checkpoint(name: str, path: Path, kwargs: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """A timm state_dict, with the class count of its head and average pooling for MAE fine-tuned checkpoints."""
    sd = read_state_dict(path, prefer_ema=True)
    kwargs = dict(kwargs)
    head = sd.get("head.weight")
    if head is not None and head.ndim == 2 and "num_classes" not in kwargs:
        kwargs["num_classes"] = head.shape[0]
    if "fc_norm.weight" in sd and "norm.weight" not in sd and "global_pool" not in kwargs:
        kwargs["global_pool"] = "avg"  # MAE fine-tuned checkpoints: average pool, then fc_norm
    return sd, kwargs


def manifest_fields(name: str, model: torch.nn.Module) -> Dict[str, Any]:
    """``timm_name`` (manifests before other families had only this) and the pretrained tag of the weights."""
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    return {"timm_name": name, **({"pretrained_tag": tag} if tag else {})}


def claims(model: torch.nn.Module) -> bool:
    return isinstance(model, VisionTransformer) or type(model).__name__.startswith(tuple(_UNMERGEABLE))


def names() -> List[str]:
    """The names to suggest for a misspelt one: timm's models made by the VisionTransformer modules (its
    ``*vit*`` names also hold LeViT, MobileViT, EfficientViT, ..., which this family refuses)."""
    import timm

    return [n for module in ("vision_transformer", "deit") for n in timm.list_models(module=module)]


def example() -> VisionTransformer:
    """ViT-Tiny width, 2 blocks, 64 px (16 patches + the class token), 10 classes."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=10)


FAMILY = Family(
    name=NAME, source=SOURCE, description=DESCRIPTION, resolve=resolve, create=create,
    load_checkpoint=load_checkpoint, claims=claims, unsupported_reason=unsupported_reason,
    model_info=model_info, preprocessing=lambda model: Preprocessing.from_config(data_config(model)), patch=patch,
    aliases=ALIASES, names=names, verified=VERIFIED, libraries=("timm",),
    manifest_fields=manifest_fields, example=example, task_reason=task_reason,
)
