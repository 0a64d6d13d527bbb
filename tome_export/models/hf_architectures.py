"""Which transformers vision models the ToMe family takes, and how each lays out its layers (names only: data).

Every supported class maps to a kind of backbone (where its layers are, what its norms and attention modules are
called) and a head; architectures ToMe cannot merge are named with the reason.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

from ..errors import UserError


class Layout(NamedTuple):
    """Attribute names of one kind of transformers layer (same computation, different names)."""

    norm1: str
    attn: str
    out_proj: str
    attn_dropout: str  # the attention module's dropout probability
    norm2: str
    scale1: Optional[str]  # LayerScale of the attention branch
    scale2: Optional[str]  # LayerScale of the MLP branch
    drop: Optional[str]  # dropout or drop-path on both residual branches


VIT_LAYOUT = Layout("layernorm_before", "attention", "o_proj", "attention_dropout", "layernorm_after", None, None,
                      "dropout")
DINO_LAYOUT = Layout("norm1", "attention", "o_proj", "attention_dropout", "norm2", "layer_scale1", "layer_scale2",
                       "drop_path")
CLIP_LAYOUT = Layout("layer_norm1", "self_attn", "out_proj", "dropout", "layer_norm2", None, None, None)


class Kind(NamedTuple):
    """A transformers vision backbone: where its layers are, their classes, its norms."""

    layers: str  # dotted path of the layer list in the backbone
    layout: Layout
    layer_class: str
    attention_class: str
    pre_norm: Optional[str]  # applied to the embeddings
    final_norm: Optional[str]  # applied to every token after the last layer (last_hidden_state)
    interpolate_flag: bool  # whether the embeddings take ``interpolate_pos_encoding``


KINDS: Dict[str, Kind] = {
    "vit": Kind("layers", VIT_LAYOUT, "ViTLayer", "ViTAttention", None, "layernorm", True),
    "deit": Kind("layers", VIT_LAYOUT, "DeiTLayer", "DeiTAttention", None, "layernorm", True),
    "dinov2": Kind("encoder.layer", DINO_LAYOUT, "Dinov2Layer", "Dinov2Attention", None, "layernorm", False),
    "dinov2_with_registers": Kind("encoder.layer", DINO_LAYOUT, "Dinov2WithRegistersLayer",
                                   "Dinov2WithRegistersAttention", None, "layernorm", False),
    "clip": Kind("encoder.layers", CLIP_LAYOUT, "CLIPEncoderLayer", "CLIPAttention", "pre_layrnorm", None, True),
    "siglip": Kind("encoder.layers", CLIP_LAYOUT, "SiglipEncoderLayer", "SiglipAttention", None, "post_layernorm",
                    True),
}


class Arch(NamedTuple):
    kind: str  # key of KINDS
    backbone: str  # attribute holding the vision backbone; "" for the model itself
    head: str  # key of _HEADS


ARCHITECTURES: Dict[str, Arch] = {
    "ViTModel": Arch("vit", "", "pooler"),
    "ViTForImageClassification": Arch("vit", "vit", "class_token"),
    "DeiTModel": Arch("deit", "", "pooler"),
    "DeiTForImageClassification": Arch("deit", "deit", "class_token"),
    "DeiTForImageClassificationWithTeacher": Arch("deit", "deit", "distilled"),
    "Dinov2Model": Arch("dinov2", "", "first_token"),
    "Dinov2ForImageClassification": Arch("dinov2", "dinov2", "token_and_mean"),
    "Dinov2WithRegistersModel": Arch("dinov2_with_registers", "", "first_token"),
    "Dinov2WithRegistersForImageClassification": Arch("dinov2_with_registers", "dinov2_with_registers",
                                                       "token_and_mean"),
    "CLIPVisionModel": Arch("clip", "", "clip_pooled"),
    "CLIPVisionModelWithProjection": Arch("clip", "vision_model", "clip_projected"),
    "CLIPForImageClassification": Arch("clip", "vision_model", "patch_mean"),
    "SiglipVisionModel": Arch("siglip", "", "attention_pool"),
    "SiglipForImageClassification": Arch("siglip", "vision_model", "patch_mean"),  # no class token: every token
}

# Checkpoints of two-tower models load as their vision tower.
VISION_TOWERS = {"CLIPModel": "CLIPVisionModelWithProjection", "SiglipModel": "SiglipVisionModel"}
# The class a config without ``architectures`` is built as.
DEFAULT_CLASS = {
    "vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip": "CLIPVisionModelWithProjection", "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}
# transformers' image processor of each model type (its defaults apply when a directory has no processor config).
PROCESSORS = {
    "vit": "ViTImageProcessor", "deit": "DeiTImageProcessor", "dinov2": "BitImageProcessor",
    "dinov2_with_registers": "BitImageProcessor", "clip": "CLIPImageProcessor", "clip_vision_model": "CLIPImageProcessor",
    "siglip": "SiglipImageProcessor", "siglip_vision_model": "SiglipImageProcessor",
}

# transformers architectures ToMe cannot merge as defined (matched by class-name prefix).
UNMERGEABLE: Dict[str, str] = {
    "Beit": "relative position bias tables in every layer are indexed by the token grid",
    "Data2VecVision": "relative position bias tables in every layer are indexed by the token grid",
    "Swin": "windowed attention needs the full token grid",
    "DonutSwin": "windowed attention needs the full token grid",
    "DINOv3": "rotary position embeddings (RoPE) in every layer tie each token to its grid position",
    "VitDet": "windowed attention with relative position tables needs the token grid",
    "Siglip2": "variable-resolution patch sequences with attention masks are not supported",
    "ViTMAE": "random patch masking reorders and drops tokens before the encoder",
    "Pvt": "spatial-reduction attention reshapes tokens back into a grid",
    "MobileViT": "convolutions between attention layers need the token grid",
    "Levit": "attention-pooling stages subsample the token grid",
    "Hiera": "mask-unit attention works on the token grid",
}
GRID_HEADS = ("Backbone", "ForMaskedImageModeling", "ForDepthEstimation", "ForSemanticSegmentation")


def architecture_class(config: Dict[str, Any], where: str) -> str:
    """The transformers class a config is built as, or a one-line error saying why ToMe cannot take it."""
    model_type = config.get("model_type")
    names = config.get("architectures") or []
    name = names[0] if names else DEFAULT_CLASS.get(model_type)
    name = VISION_TOWERS.get(name, name)
    if name in ARCHITECTURES:
        return name
    shown = name or f"model_type {model_type!r}"
    why = unmergeable_reason(name or "") or (
        f"it is not a vision transformer tome-export supports (supported: {', '.join(ARCHITECTURES)})")
    raise UserError(f"{where} holds a {shown}: ToMe cannot merge it: {why}")


def unmergeable_reason(class_name: str) -> Optional[str]:
    for suffix in GRID_HEADS:
        if class_name.endswith(suffix):
            return f"its {suffix} head needs every token of the grid"
    return next((why for key, why in UNMERGEABLE.items() if class_name.startswith(key)), None)
