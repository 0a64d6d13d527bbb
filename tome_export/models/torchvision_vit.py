"""ToMe for torchvision's VisionTransformer (vit_b_16 ... vit_h_14, including the SWAG weights).

torchvision blocks (``EncoderBlock``) use ``nn.MultiheadAttention``, which returns neither the keys nor
accepts a per-key additive bias for a batch, so the patched forward computes q/k/v from the module's
``in_proj`` weights and runs ``scaled_dot_product_attention`` itself, with the same semantics as the timm
family: keys averaged over heads as the metric, the merge between attention and MLP, the class token
protected, proportional attention through the log-size bias. As there, the patch swaps the model's class
and attaches a :class:`TokenMerge` to each block; parameters and state_dict keys are unchanged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torchvision.models import get_model_builder, get_model_weights
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer, interpolate_embeddings
from torchvision.transforms._presets import ImageClassification

from ..errors import UserError
from ..info import ModelInfo
from ..preprocess import Preprocessing
from ..kernels.attention import padded_heads_attention
from .base import (SizeBias, State, Track, attention, ToMeConfig, ToMeModel, patch_model, run_blocks,
                   uses_padded_heads)
from .checkpoint import read_state_dict, url_reachable
from .family import Family

NAME = "torchvision-vit"
DESCRIPTION = "torchvision VisionTransformer: vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14 (ImageNet and SWAG weights)"
MODEL_CLASS = VisionTransformer  # models of this family (unsupported variants included)
SOURCE = "torchvision"

BUILDERS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")

# The SWAG end-to-end fine-tuned weights the ToMe paper reports on (384 / 512 / 518 px).
ALIASES: Dict[str, str] = {
    "tv_vit_b16": "vit_b_16.IMAGENET1K_SWAG_E2E_V1",
    "tv_vit_l16": "vit_l_16.IMAGENET1K_SWAG_E2E_V1",
    "tv_vit_h14": "vit_h_14.IMAGENET1K_SWAG_E2E_V1",
}

# (family, names, what the tests check) for --list-models and the README
VERIFIED: Tuple[Tuple[str, str, str], ...] = (
    ("SWAG / torchvision ViT", "tv_vit_b16 tv_vit_l16 tv_vit_h14, vit_b_16[.WEIGHTS] ...",
     "r=0 identity, reference parity at 224 and 384 px, sources, ONNX parity, node roles, "
     "preprocessing == the weights' transforms, checkpoints, CLI build, training"),
)



def canonical_name(name: str) -> Optional[str]:
    """``builder.WEIGHTS`` for a torchvision alias, builder name or ``builder.WEIGHTS``; None if not torchvision."""
    name = ALIASES.get(name, name)
    builder, _, tag = name.partition(".")
    if builder not in BUILDERS:
        return None
    enum = get_model_weights(builder)
    if not tag:
        return f"{builder}.{enum.DEFAULT.name}"
    if tag not in enum.__members__:
        raise UserError(
            f"unknown torchvision weights {tag!r} for {builder}: choose one of {', '.join(enum.__members__)}"
        )
    return name


def _weights(name: str):
    builder, _, tag = name.partition(".")
    return get_model_weights(builder)[tag]


def _weights_image_size(weights) -> int:
    return int(weights.meta["min_size"][0])


def build(name: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    """The model of a canonical name, random (seed it before) or with torchvision's pretrained weights.

    ``img_size`` (alias of ``image_size``) defaults to the weights' size; pretrained position embeddings are
    interpolated to other sizes. Other kwargs go to ``VisionTransformer`` (e.g. ``num_classes``).
    """
    weights = _weights(name)
    builder = get_model_builder(name.partition(".")[0])
    if "img_size" in kwargs:
        kwargs["image_size"] = kwargs.pop("img_size")
    native = _weights_image_size(weights)
    image_size = int(kwargs.pop("image_size", None) or native)
    kwargs.setdefault("num_classes", len(weights.meta["categories"]))
    try:
        model = builder(weights=None, image_size=image_size, **kwargs)
    except (TypeError, AssertionError, RuntimeError) as exc:
        raise UserError(f"cannot build {name} with {kwargs} at {image_size} px: {exc}") from None
    new_head = False
    if pretrained:
        sd = _pretrained_state_dict(weights)
        if image_size != native:
            sd = interpolate_embeddings(image_size, model.patch_size, sd)
        new_head = kwargs["num_classes"] != len(weights.meta["categories"])
        if new_head:  # a fresh classifier for another class count, as timm does
            sd = {k: v for k, v in sd.items() if not k.startswith("heads.")}
        model.load_state_dict(sd, strict=not new_head)
    if not pretrained or new_head:
        # torchvision initialises the classifier to zero: every logit would be 0 and validation vacuous.
        with torch.no_grad():
            torch.nn.init.trunc_normal_(model.heads.head.weight, std=0.02)
    model.tome_weights = weights  # the weights' transforms are the model's preprocessing
    return model


def _pretrained_state_dict(weights) -> Dict[str, torch.Tensor]:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not cached.is_file() and not url_reachable(weights.url):
        raise ConnectionError(f"{weights.url} is not reachable and {cached} is not cached")
    return weights.get_state_dict(progress=False, check_hash=True)


def upgrade_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename the MLP keys of checkpoints saved before torchvision 0.13 (``mlp.linear_1`` -> ``mlp.0``)."""
    renames = {".mlp.linear_1.": ".mlp.0.", ".mlp.linear_2.": ".mlp.3."}
    out = {}
    for key, value in sd.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def architecture_kwargs(name: str, sd: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Image size, class count and representation size a checkpoint was saved with."""
    kwargs: Dict[str, Any] = {}
    head = sd.get("heads.head.weight")
    if head is not None and head.ndim == 2:
        kwargs["num_classes"] = head.shape[0]
    pre = sd.get("heads.pre_logits.weight")
    if pre is not None and pre.ndim == 2:
        kwargs["representation_size"] = pre.shape[0]
    pos = sd.get("encoder.pos_embedding")
    patch = int(name.partition(".")[0].rsplit("_", 1)[1])
    if pos is not None and pos.ndim == 3:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1:
            kwargs["image_size"] = side * patch
    return kwargs


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why this torchvision model cannot be merged correctly, or None when it can."""
    if not isinstance(model, VisionTransformer):
        return f"{type(model).__name__} is not a torchvision VisionTransformer"
    for i, block in enumerate(model.encoder.layers):
        if type(block) is not EncoderBlock:
            return f"encoder layer {i} is a {type(block).__name__}; only torchvision's EncoderBlock is supported"
        mha = block.self_attention
        if not (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn):
            return f"encoder layer {i} uses a MultiheadAttention variant (kdim/vdim, bias_k or zero-attn)"
    return None


def model_info(model: VisionTransformer) -> ModelInfo:
    block = model.encoder.layers[0]
    side = model.image_size // model.patch_size
    proj = model.conv_proj
    return ModelInfo(
        family=NAME,
        num_blocks=len(model.encoder.layers),
        num_patches=side * side,
        num_protected=1,  # the class token
        embed_dim=model.hidden_dim,
        num_heads=block.self_attention.num_heads,
        attn_dim=model.hidden_dim,
        mlp_hidden=model.mlp_dim,
        patch_size=(model.patch_size, model.patch_size),
        in_chans=proj.in_channels if isinstance(proj, torch.nn.Conv2d) else 3,
        num_classes=model.num_classes,
    )


def _matching_weights(model: VisionTransformer):
    """The torchvision weights made for this architecture at this image size (default weights first)."""
    for builder in BUILDERS:
        enum = get_model_weights(builder)
        members = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
        for w in members:
            meta = w.meta
            if (_weights_image_size(w) == model.image_size and int(builder.rsplit("_", 1)[1]) == model.patch_size
                    and meta["num_params"] == sum(p.numel() for p in model.parameters())):
                return w
    return None


def transforms_config(weights, image_size: int) -> Dict[str, Any]:
    """Eval preprocessing of torchvision weights (resize, centre crop, mean/std, interpolation) at ``image_size``.

    ``weights`` None: torchvision's ImageNet defaults (resize by 256/224, bilinear). At another size than the
    weights' the resize keeps the weights' crop ratio.
    """
    t = weights.transforms() if weights is not None else ImageClassification(crop_size=224)
    return {
        "input_size": (3, image_size, image_size),
        "mean": tuple(t.mean),
        "std": tuple(t.std),
        "crop_pct": t.crop_size[0] / t.resize_size[0],
        "crop_mode": "center",
        "interpolation": t.interpolation.value,
    }


def data_config(model: VisionTransformer) -> Dict[str, Any]:
    """The preprocessing of the model's weights: known to models built by :func:`build`; for others the
    weights made for the architecture at its image size, else torchvision's ImageNet defaults."""
    weights = getattr(model, "tome_weights", None) or _matching_weights(model)
    return transforms_config(weights, model.image_size)


def _attention(mha: torch.nn.MultiheadAttention, x: torch.Tensor, bias: Optional[SizeBias]):
    """``nn.MultiheadAttention`` self-attention with an additive logit bias; also returns the keys."""
    b, n, c = x.shape
    if uses_padded_heads(x, bias):
        return padded_heads_attention(x, (mha.in_proj_weight, mha.in_proj_bias),
                                      (mha.out_proj.weight, mha.out_proj.bias), mha.num_heads, bias.log,
                                      bias.channels, dropout_p=mha.dropout if mha.training else 0.0)
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.reshape(b, n, 3, mha.num_heads, mha.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = attention(q, k, v, bias, dropout_p=mha.dropout if mha.training else 0.0)
    return mha.out_proj(out.transpose(1, 2).reshape(b, n, c)), k


def _block(block: EncoderBlock, x: torch.Tensor, size, source, bias) -> State:
    """One encoder block: attention, then the merge, then the MLP."""
    attn_out, keys = _attention(block.self_attention, block.ln_1(x), bias)
    x = x + block.dropout(attn_out)
    if block.tome_merge.merges(x.shape[1]):
        x, size, source, bias = block.tome_merge(x, keys, size, source)
    x = x + block.mlp(block.ln_2(x))
    return x, size, source, bias


class ToMeVisionTransformerMixin(ToMeModel):
    """Forward of a ToMe-patched torchvision VisionTransformer (mixed in before the model's own class)."""

    tome: ToMeConfig

    def tome_features(
        self, x: torch.Tensor, trace_source: Track = False, blocks: Optional[int] = None, final_norm: bool = True
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Tokens after the first ``blocks`` encoder layers (None: all) and the final norm, their sizes
        ``(B, T, 1)`` and optionally what :func:`run_blocks` tracks (the sources ``(B, T, T0)``)."""
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder.dropout(x + self.encoder.pos_embedding)
        x, size, source = run_blocks(list(self.encoder.layers)[:blocks], _block, x, trace_source)
        return (self.encoder.ln(x) if final_norm else x), size, source

    def tome_head(self, x: torch.Tensor, size: Optional[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """The class-token head (sizes do not matter for it)."""
        x = x[:, 0]
        return self.heads[:-1](x) if pre_logits else self.heads(x)

    def tome_pooled(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        """The embedding: the class token after the final norm (and the pre-logits layer, where there is one)."""
        return self.tome_head(x, size, pre_logits=True)


def patch(model: VisionTransformer, cfg: ToMeConfig) -> VisionTransformer:
    """Patch ``model`` in place (or re-configure an already patched one) and return it."""
    return patch_model(model, ToMeVisionTransformerMixin, model.encoder.layers, 1, cfg)


# --- registration -------------------------------------------------------------------------------------------


def load_checkpoint(name: str, path: Path, kwargs: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """A torchvision state_dict in current key names, and the architecture it was saved with (an explicit image
    size wins)."""
    sd = upgrade_state_dict(read_state_dict(path))
    inferred = architecture_kwargs(name, sd)
    if "img_size" in kwargs:
        inferred.pop("image_size", None)
    return sd, {**inferred, **kwargs}


def example() -> VisionTransformer:
    """2 encoder layers of width 64, patch 16 at 64 px (16 patches + the class token), 10 classes."""
    return VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128,
                             num_classes=10)


FAMILY = Family(
    name=NAME, source=SOURCE, description=DESCRIPTION, resolve=canonical_name, create=build,
    load_checkpoint=load_checkpoint, claims=lambda model: isinstance(model, VisionTransformer),
    unsupported_reason=unsupported_reason, model_info=model_info,
    preprocessing=lambda model: Preprocessing.from_config(data_config(model)), patch=patch, aliases=ALIASES,
    names=lambda: BUILDERS, verified=VERIFIED, libraries=("torchvision",), example=example,
)
