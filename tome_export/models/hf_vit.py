"""ToMe for Hugging Face transformers ViTs: ViT, DeiT (distilled), DINOv2 (with registers), CLIP and SigLIP towers.

Same semantics as the timm family: the merge sits between each layer's attention and MLP, the metric is the
attention keys averaged over heads, class / distillation / register tokens are protected, proportional attention
adds log(size) to the attention logits and pooling heads weigh each token by its size (SigLIP's attention-pool head
gets log(size) on its logits). The patched forward computes q/k/v from each attention module's own projections and
calls :func:`~tome_export.models.base.attention`, whatever attention implementation (eager, sdpa, ...) the model was
loaded with. As in the other families the model's class is swapped and each layer gets a parameter-free
``tome_merge``; parameters and state_dict keys are unchanged.

A patched model returns one tensor: the logits of ``*ForImageClassification`` (the mean of both heads for
``DeiTForImageClassificationWithTeacher``), ``image_embeds`` of ``CLIPVisionModelWithProjection`` and the
``pooler_output`` of the bare vision models (the final class token for a ``ViTModel`` without pooler).

Models are named ``hf:<repo id>`` (the hub or its cache) or by the path of a ``save_pretrained`` directory. transformers
is imported only when such a model is used: it is an optional dependency.
"""


from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..info import ModelInfo
from ..preprocess import Preprocessing
from .base import SizeBias, State, ToMeConfig, ToMeModel, Track, attention, patch_model, run_blocks
from .family import Family
from .hf_architectures import ARCHITECTURES, KINDS, VISION_TOWERS, Arch, Kind, Layout, unmergeable_reason
from .hf_hub import build, pair, preprocessing, quiet_transformers, resolve

NAME = "transformers-vit"
SOURCE = "transformers"
DESCRIPTION = (
    "transformers vision transformers (hf:<repo id> or a save_pretrained directory): ViTModel, "
    "ViTForImageClassification, DeiT (incl. WithTeacher), Dinov2(WithRegisters)Model/ForImageClassification, "
    "CLIPVisionModel(WithProjection), CLIPForImageClassification, SiglipVisionModel, SiglipForImageClassification"
)

_CHECKS = "every class: r=0 identity (eager and sdpa), reference parity with sources"
# (family, names, what the tests check) for --list-models and the README
VERIFIED: Tuple[Tuple[str, str, str], ...] = (
    ("transformers ViT", "ViTModel, ViTForImageClassification (hf:google/vit-base-patch16-224 ...)",
     _CHECKS + "; same ToMe output as the timm family on converted weights; ForImageClassification: ONNX parity, "
     "CLI builds from a directory (onnx, openvino int8)"),
    ("transformers DeiT", "DeiTForImageClassification, DeiTForImageClassificationWithTeacher (class + distillation "
     "token protected)", _CHECKS + "; WithTeacher: ONNX parity, CLI build (openvino int8)"),
    ("transformers DINOv2", "Dinov2Model, Dinov2ForImageClassification, Dinov2WithRegisters* (LayerScale, "
     "registers protected)", _CHECKS + ", size-weighted patch mean, 224 px on a 518 px config; WithRegisters: "
     "ONNX parity, CLI build (openvino int8)"),
    ("transformers CLIP", "CLIPVisionModel, CLIPVisionModelWithProjection (pre-layernorm), CLIPForImageClassification; "
     "CLIPModel checkpoints load the vision tower", _CHECKS + "; WithProjection: ONNX parity, CLI build (openvino int8)"),
    ("transformers SigLIP", "SiglipVisionModel (no class token, attention-pool head), SiglipForImageClassification; "
     "SiglipModel checkpoints load the vision tower",
     _CHECKS + ", size-biased pooling; SiglipVisionModel: ONNX parity, CLI build (openvino int8)"),
)


class _AnyTransformersModel(type):
    def __instancecheck__(cls, obj: object) -> bool:
        transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported
        return transformers is not None and isinstance(obj, transformers.PreTrainedModel)


class MODEL_CLASS(metaclass=_AnyTransformersModel):
    """Models of this family (unsupported architectures included): any transformers ``PreTrainedModel``."""



# --- structure -------------------------------------------------------------------------------------------------


def _base_class(model: torch.nn.Module) -> type:
    cls = type(model)
    return cls.__bases__[1] if issubclass(cls, ToMeTransformersMixin) else cls


def _arch(model: torch.nn.Module) -> Optional[Arch]:
    """The architecture entry of a transformers model of exactly a supported class, else None."""
    cls = _base_class(model)
    return ARCHITECTURES.get(cls.__name__) if cls.__module__.startswith("transformers.") else None


def _backbone(model: torch.nn.Module, arch: Arch) -> torch.nn.Module:
    return getattr(model, arch.backbone) if arch.backbone else model


def _layers(backbone: torch.nn.Module, kind: Kind) -> torch.nn.ModuleList:
    return functools.reduce(getattr, kind.layers.split("."), backbone)


def _num_protected(backbone: torch.nn.Module, arch: Arch) -> int:
    """Class, distillation and register tokens: the prefix ToMe never merges."""
    if arch.kind == "siglip":
        return 0
    if arch.kind == "deit":
        return 2  # transformers' DeiT embeddings always add the distillation token
    registers = getattr(backbone.embeddings, "register_tokens", None)
    return 1 + (registers.shape[1] if registers is not None else 0)


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why this transformers model cannot be merged correctly, or None when it can."""
    if not isinstance(model, MODEL_CLASS):
        return f"{type(model).__name__} is not a transformers model"
    arch = _arch(model)
    name = _base_class(model).__name__
    if arch is None:
        if name in VISION_TOWERS:
            return f"{name} is a two-tower model: patch its vision tower ({VISION_TOWERS[name]}.from_pretrained)"
        return unmergeable_reason(name) or (
            f"{name} is not a transformers vision model tome-export supports ({', '.join(ARCHITECTURES)})")
    kind = KINDS[arch.kind]
    try:
        backbone = _backbone(model, arch)
        layers = _layers(backbone, kind)
    except AttributeError:
        return (f"{name} does not have the module layout tome-export knows (transformers 5.24: "
                f"{arch.backbone or 'the model'}.{kind.layers}); install a transformers version with it")
    for i, layer in enumerate(layers):
        attn = getattr(layer, kind.layout.attn, None)
        if type(layer).__name__ != kind.layer_class or type(attn).__name__ != kind.attention_class:
            return (f"layer {i} is a {type(layer).__name__} with {type(attn).__name__}: only transformers' "
                    f"{kind.layer_class} with {kind.attention_class} is supported")
        scaling = getattr(attn, "scaling", getattr(attn, "scale", None))
        if scaling is None or abs(scaling - attn.head_dim ** -0.5) > 1e-9:
            return f"layer {i} scales attention logits by {scaling}, not 1/sqrt(head_dim)"
    if arch.head == "attention_pool" and getattr(backbone, "head", None) is None:
        return f"{name} without its attention-pooling head (vision_use_head=False) has no pooled output to export"
    return None


def data_config(model: torch.nn.Module) -> Dict[str, Any]:
    """The preprocessing the model was loaded with (its image processor), else its model type's defaults."""
    cfg = getattr(model, "tome_data_config", None)
    return dict(cfg) if cfg is not None else preprocessing(None, _backbone(model, _arch(model)).config)


def _linear_out(module: torch.nn.Module, default: int) -> int:
    return module.out_features if isinstance(module, torch.nn.Linear) else default


def _output_dim(model: torch.nn.Module, backbone: torch.nn.Module, arch: Arch, hidden: int) -> int:
    """Size of the one output the patched model returns (logits or embedding)."""
    if arch.head == "distilled":
        return _linear_out(model.cls_classifier, hidden)
    if arch.head in ("class_token", "patch_mean"):
        return _linear_out(model.classifier, hidden)
    if arch.head == "token_and_mean":
        return _linear_out(model.classifier, 2 * hidden)
    if arch.head == "pooler" and backbone.pooler is not None:
        return backbone.pooler.dense.out_features
    if arch.head == "clip_projected":
        return model.visual_projection.out_features
    return hidden


def model_info(model: torch.nn.Module) -> ModelInfo:
    arch = _arch(model)
    backbone = _backbone(model, arch)
    layers = _layers(backbone, KINDS[arch.kind])
    attn = getattr(layers[0], KINDS[arch.kind].layout.attn)
    mlp = layers[0].mlp
    # A SwiGLU MLP has three c x h' matrices; 1.5 h' makes the two-matrix MAC count of the FLOP model exact.
    mlp_hidden = mlp.fc1.out_features if hasattr(mlp, "fc1") else 3 * mlp.gate_proj.out_features // 2
    config = backbone.config
    h, w = data_config(model)["input_size"][1:]
    p = pair(config.patch_size)
    return ModelInfo(
        family=NAME,
        num_blocks=len(layers),
        num_patches=(h // p[0]) * (w // p[1]),
        num_protected=_num_protected(backbone, arch),
        embed_dim=config.hidden_size,
        num_heads=attn.q_proj.out_features // attn.head_dim,
        attn_dim=attn.q_proj.out_features,
        mlp_hidden=mlp_hidden,
        patch_size=p,
        in_chans=config.num_channels,
        num_classes=_output_dim(model, backbone, arch, config.hidden_size),
        distilled=arch.head == "distilled",
    )


# --- forward ---------------------------------------------------------------------------------------------------


def _self_attention(attn: torch.nn.Module, x: torch.Tensor, bias: Optional[SizeBias],
                    layout: Layout) -> Tuple[torch.Tensor, torch.Tensor]:
    """A transformers attention module with the log-size bias, through ``attention``; also returns the keys."""
    b, n, _ = x.shape
    shape = (b, n, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    out = attention(q, k, v, bias, dropout_p=getattr(attn, layout.attn_dropout) if attn.training else 0.0)
    return getattr(attn, layout.out_proj)(out.transpose(1, 2).reshape(b, n, -1)), k


def _branch(layer: torch.nn.Module, scale: Optional[str], drop: Optional[str], x: torch.Tensor) -> torch.Tensor:
    """A residual branch's LayerScale, then its dropout / drop-path (the order of every layout here)."""
    if scale is not None:
        x = getattr(layer, scale)(x)
    return getattr(layer, drop)(x) if drop is not None else x


def _layer(layout: Layout, layer: torch.nn.Module, x: torch.Tensor, size, source, bias) -> State:
    """One layer: attention, then the merge, then the MLP (where the reference merges)."""
    out, keys = _self_attention(getattr(layer, layout.attn), getattr(layer, layout.norm1)(x), bias, layout)
    x = x + _branch(layer, layout.scale1, layout.drop, out)
    if layer.tome_merge.merges(x.shape[1]):
        x, size, source, bias = layer.tome_merge(x, keys, size, source)
    x = x + _branch(layer, layout.scale2, layout.drop, layer.mlp(getattr(layer, layout.norm2)(x)))
    return x, size, source, bias


def _embed(backbone: torch.nn.Module, kind: Kind, pixels: torch.Tensor) -> torch.Tensor:
    if kind.interpolate_flag:  # position embeddings are interpolated when the input is not the config's size
        other = tuple(pixels.shape[-2:]) != pair(backbone.config.image_size)
        x = backbone.embeddings(pixels, interpolate_pos_encoding=other)
    else:
        x = backbone.embeddings(pixels)  # DINOv2 interpolates whenever the size differs
    return getattr(backbone, kind.pre_norm)(x) if kind.pre_norm else x


def _weighted_mean(x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens, each counted as the patches it holds."""
    return x.mean(dim=1) if size is None else (x * size).sum(dim=1) / size.sum(dim=1)


def _attention_pool(head: torch.nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """SigLIP's attention-pooling head; a token of size s gets log(s) on its pooling logits, as s copies would."""
    mha = head.attention
    b, n, c = x.shape
    d = c // mha.num_heads
    w, bias_in = mha.in_proj_weight, mha.in_proj_bias  # packed q, k, v rows

    def project(tokens: torch.Tensor, i: int) -> torch.Tensor:
        out = F.linear(tokens, w[i * c:(i + 1) * c], bias_in[i * c:(i + 1) * c])
        return out.view(b, -1, mha.num_heads, d).transpose(1, 2)

    q, k, v = project(head.probe.expand(b, -1, -1), 0), project(x, 1), project(x, 2)
    bias = SizeBias.of(size) if size is not None else None
    out = attention(q, k, v, bias, dropout_p=mha.dropout if mha.training else 0.0)
    out = mha.out_proj(out.transpose(1, 2).reshape(b, -1, c))
    out = out + head.mlp(head.layernorm(out))
    return out[:, 0]


def _tail(x: torch.Tensor, size: Optional[torch.Tensor], start: int):
    return x[:, start:], (size[:, start:] if size is not None else None)


# head name -> output of (model, backbone, final tokens, sizes, number of protected tokens)
_HEADS: Dict[str, Callable[..., torch.Tensor]] = {
    "pooler": lambda m, bb, x, s, p: bb.pooler(x) if bb.pooler is not None else x[:, 0],
    "class_token": lambda m, bb, x, s, p: m.classifier(x[:, 0]),
    "distilled": lambda m, bb, x, s, p: (m.cls_classifier(x[:, 0]) + m.distillation_classifier(x[:, 1])) / 2,
    "first_token": lambda m, bb, x, s, p: x[:, 0],
    "token_and_mean": lambda m, bb, x, s, p: m.classifier(torch.cat([x[:, 0], _weighted_mean(*_tail(x, s, p))], dim=1)),
    "clip_pooled": lambda m, bb, x, s, p: bb.post_layernorm(x[:, 0]),
    "clip_projected": lambda m, bb, x, s, p: m.visual_projection(bb.post_layernorm(x[:, 0])),
    "patch_mean": lambda m, bb, x, s, p: m.classifier(_weighted_mean(*_tail(x, s, p))),
    "attention_pool": lambda m, bb, x, s, p: _attention_pool(bb.head, x, s),
}


# head name -> the input of its classifier, for the heads that classify (the others return an embedding already)
_POOLED: Dict[str, Callable[..., torch.Tensor]] = {
    "class_token": lambda m, bb, x, s, p: x[:, 0],
    "distilled": lambda m, bb, x, s, p: (x[:, 0] + x[:, 1]) / 2,  # the class and distillation tokens, as timm's DeiT
    "token_and_mean": lambda m, bb, x, s, p: torch.cat([x[:, 0], _weighted_mean(*_tail(x, s, p))], dim=1),
    "patch_mean": lambda m, bb, x, s, p: _weighted_mean(*_tail(x, s, p)),
}


class ToMeTransformersMixin(ToMeModel):
    """Forward of a ToMe-patched transformers vision model (mixed in before the model's own class)."""

    tome: ToMeConfig

    def tome_features(
        self, x: torch.Tensor, trace_source: Track = False, blocks: Optional[int] = None, final_norm: bool = True
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Tokens as the backbone's last_hidden_state (``blocks``: as ``hidden_states[blocks]``, with the final norm
        where ``final_norm`` and the backbone has one), their sizes ``(B, T, 1)`` and optionally their sources."""
        arch = _arch(self)
        backbone, kind = _backbone(self, arch), KINDS[arch.kind]
        x = _embed(backbone, kind, x.to(next(backbone.embeddings.parameters()).dtype))  # as transformers casts
        layers = list(_layers(backbone, kind))[:blocks]
        x, size, source = run_blocks(layers, functools.partial(_layer, kind.layout), x, trace_source)
        if kind.final_norm and final_norm:
            x = getattr(backbone, kind.final_norm)(x)
        return x, size, source

    def tome_head(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        """The model's own head; means and attention pooling weigh each token by its size."""
        arch = _arch(self)
        backbone = _backbone(self, arch)
        return _HEADS[arch.head](self, backbone, x, size, _num_protected(backbone, arch))

    def tome_pooled(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        """The embedding: what a bare model's head returns (pooler, class token, CLIP's pooled or projected
        embedding, SigLIP's attention pool), or the input of a classifier head."""
        arch = _arch(self)
        backbone = _backbone(self, arch)
        pooled = _POOLED.get(arch.head, _HEADS[arch.head])
        return pooled(self, backbone, x, size, _num_protected(backbone, arch))


def patch(model: torch.nn.Module, cfg: ToMeConfig) -> torch.nn.Module:
    """Patch ``model`` in place (or re-configure an already patched one) and return it."""
    arch = _arch(model)
    backbone = _backbone(model, arch)
    return patch_model(model, ToMeTransformersMixin, _layers(backbone, KINDS[arch.kind]),
                       _num_protected(backbone, arch), cfg)


# --- registration -----------------------------------------------------------------------------------------------


def resolve_any(name: str) -> Optional[str]:
    """:func:`resolve`, and a directory named without a path separator (asked last: other families' names win)."""
    found = resolve(name)
    if found is None and Path(name).is_dir():
        found = resolve(str(Path(".") / name))
    return found


def load_checkpoint(name: str, path: Path, kwargs: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    raise UserError("--checkpoint takes timm and torchvision state_dicts; a transformers model loads its weights "
                    "from its directory: pass the save_pretrained directory as --model")


def example() -> torch.nn.Module:
    """A ViTForImageClassification of width 64, 2 layers, patch 16 at 64 px, 10 labels (random weights)."""
    transformers = quiet_transformers()
    config = transformers.ViTConfig(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=128, num_labels=10)
    model = transformers.ViTForImageClassification(config)
    model.tome_data_config = preprocessing(None, config)
    return model.eval()


FAMILY = Family(
    name=NAME, source=SOURCE, description=DESCRIPTION, resolve=resolve_any, create=build,
    load_checkpoint=load_checkpoint, claims=lambda model: isinstance(model, MODEL_CLASS),
    unsupported_reason=unsupported_reason, model_info=model_info,
    preprocessing=lambda model: Preprocessing.from_config(data_config(model)), patch=patch, verified=VERIFIED,
    libraries=("transformers",), manifest_fields=lambda name, model: dict(getattr(model, "tome_source", None) or {}),
    example=example, priority=200,
)
