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
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..info import ModelInfo
from ..preprocess import Preprocessing
from .base import SizeBias, State, ToMeConfig, ToMeModel, attention, patch_model, run_blocks
from .checkpoint import hub_reachable
from .family import Family

NAME = "transformers-vit"
SOURCE = "transformers"
PREFIX = "hf:"
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

CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class _Layout(NamedTuple):
    """Attribute names of one kind of transformers layer (same computation, different names)."""

    norm1: str
    attn: str
    out_proj: str
    attn_dropout: str  # the attention module's dropout probability
    norm2: str
    scale1: Optional[str]  # LayerScale of the attention branch
    scale2: Optional[str]  # LayerScale of the MLP branch
    drop: Optional[str]  # dropout or drop-path on both residual branches


_VIT_LAYOUT = _Layout("layernorm_before", "attention", "o_proj", "attention_dropout", "layernorm_after", None, None,
                      "dropout")
_DINO_LAYOUT = _Layout("norm1", "attention", "o_proj", "attention_dropout", "norm2", "layer_scale1", "layer_scale2",
                       "drop_path")
_CLIP_LAYOUT = _Layout("layer_norm1", "self_attn", "out_proj", "dropout", "layer_norm2", None, None, None)


class _Kind(NamedTuple):
    """A transformers vision backbone: where its layers are, their classes, its norms."""

    layers: str  # dotted path of the layer list in the backbone
    layout: _Layout
    layer_class: str
    attention_class: str
    pre_norm: Optional[str]  # applied to the embeddings
    final_norm: Optional[str]  # applied to every token after the last layer (last_hidden_state)
    interpolate_flag: bool  # whether the embeddings take ``interpolate_pos_encoding``


_KINDS: Dict[str, _Kind] = {
    "vit": _Kind("layers", _VIT_LAYOUT, "ViTLayer", "ViTAttention", None, "layernorm", True),
    "deit": _Kind("layers", _VIT_LAYOUT, "DeiTLayer", "DeiTAttention", None, "layernorm", True),
    "dinov2": _Kind("encoder.layer", _DINO_LAYOUT, "Dinov2Layer", "Dinov2Attention", None, "layernorm", False),
    "dinov2_with_registers": _Kind("encoder.layer", _DINO_LAYOUT, "Dinov2WithRegistersLayer",
                                   "Dinov2WithRegistersAttention", None, "layernorm", False),
    "clip": _Kind("encoder.layers", _CLIP_LAYOUT, "CLIPEncoderLayer", "CLIPAttention", "pre_layrnorm", None, True),
    "siglip": _Kind("encoder.layers", _CLIP_LAYOUT, "SiglipEncoderLayer", "SiglipAttention", None, "post_layernorm",
                    True),
}


class _Arch(NamedTuple):
    kind: str  # key of _KINDS
    backbone: str  # attribute holding the vision backbone; "" for the model itself
    head: str  # key of _HEADS


ARCHITECTURES: Dict[str, _Arch] = {
    "ViTModel": _Arch("vit", "", "pooler"),
    "ViTForImageClassification": _Arch("vit", "vit", "class_token"),
    "DeiTModel": _Arch("deit", "", "pooler"),
    "DeiTForImageClassification": _Arch("deit", "deit", "class_token"),
    "DeiTForImageClassificationWithTeacher": _Arch("deit", "deit", "distilled"),
    "Dinov2Model": _Arch("dinov2", "", "first_token"),
    "Dinov2ForImageClassification": _Arch("dinov2", "dinov2", "token_and_mean"),
    "Dinov2WithRegistersModel": _Arch("dinov2_with_registers", "", "first_token"),
    "Dinov2WithRegistersForImageClassification": _Arch("dinov2_with_registers", "dinov2_with_registers",
                                                       "token_and_mean"),
    "CLIPVisionModel": _Arch("clip", "", "clip_pooled"),
    "CLIPVisionModelWithProjection": _Arch("clip", "vision_model", "clip_projected"),
    "CLIPForImageClassification": _Arch("clip", "vision_model", "patch_mean"),
    "SiglipVisionModel": _Arch("siglip", "", "attention_pool"),
    "SiglipForImageClassification": _Arch("siglip", "vision_model", "patch_mean"),  # no class token: every token
}

# Checkpoints of two-tower models load as their vision tower.
_VISION_TOWERS = {"CLIPModel": "CLIPVisionModelWithProjection", "SiglipModel": "SiglipVisionModel"}
# The class a config without ``architectures`` is built as.
_DEFAULT_CLASS = {
    "vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
    "clip": "CLIPVisionModelWithProjection", "clip_vision_model": "CLIPVisionModel", "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}
# transformers' image processor of each model type (its defaults apply when a directory has no processor config).
_PROCESSORS = {
    "vit": "ViTImageProcessor", "deit": "DeiTImageProcessor", "dinov2": "BitImageProcessor",
    "dinov2_with_registers": "BitImageProcessor", "clip": "CLIPImageProcessor", "clip_vision_model": "CLIPImageProcessor",
    "siglip": "SiglipImageProcessor", "siglip_vision_model": "SiglipImageProcessor",
}

# transformers architectures ToMe cannot merge as defined (matched by class-name prefix).
_UNMERGEABLE: Dict[str, str] = {
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
_GRID_HEADS = ("Backbone", "ForMaskedImageModeling", "ForDepthEstimation", "ForSemanticSegmentation")

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class _AnyTransformersModel(type):
    def __instancecheck__(cls, obj: object) -> bool:
        transformers = sys.modules.get("transformers")  # a transformers model means transformers is imported
        return transformers is not None and isinstance(obj, transformers.PreTrainedModel)


class MODEL_CLASS(metaclass=_AnyTransformersModel):
    """Models of this family (unsupported architectures included): any transformers ``PreTrainedModel``."""


# --- names -----------------------------------------------------------------------------------------------------


def is_path_name(name: str) -> bool:
    """Whether ``name`` is written as a path (aliases and timm/torchvision names never contain a separator)."""
    return "/" in name or "\\" in name or name.startswith((".", "~"))


def resolve(name: str) -> Optional[str]:
    """The upstream name of an ``hf:<repo id>`` (the repo id) or a path (its absolute path); None if neither.

    A directory is checked here, before any slow work: it must hold a readable config of a supported architecture.
    """
    if name.startswith(PREFIX):
        repo = name[len(PREFIX):]
        _check_repo_id(repo)
        return repo
    if not is_path_name(name):
        return None
    directory = Path(name).expanduser()
    if not directory.is_dir():
        raise UserError(f"model directory {name!r} does not exist: pass a save_pretrained directory (config.json, "
                        "model.safetensors, preprocessor_config.json) or hf:<repo id>")
    read_config(directory)
    return str(directory.resolve())


def _check_repo_id(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UserError(f"{PREFIX}{repo!r} is not a Hugging Face repo id: use hf:<owner>/<name>, "
                        "e.g. hf:google/vit-base-patch16-224") from None


def read_config(directory: Path) -> Dict[str, Any]:
    """The ``config.json`` of a model directory, checked to be an architecture this family can merge."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{str(directory)!r} has no {CONFIG_FILE}: pass a directory written by save_pretrained "
                        "(config.json, model.safetensors, preprocessor_config.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{str(path)!r} is not valid JSON ({type(exc).__name__}): fix or re-save the model") from None
    if not isinstance(config, dict):
        raise UserError(f"{str(path)!r} is not a transformers config (a JSON object): re-save the model")
    architecture_class(config, str(directory))
    return config


def architecture_class(config: Dict[str, Any], where: str) -> str:
    """The transformers class a config is built as, or a one-line error saying why ToMe cannot take it."""
    model_type = config.get("model_type")
    names = config.get("architectures") or []
    name = names[0] if names else _DEFAULT_CLASS.get(model_type)
    name = _VISION_TOWERS.get(name, name)
    if name in ARCHITECTURES:
        return name
    shown = name or f"model_type {model_type!r}"
    why = _unmergeable_reason(name or "") or (
        f"it is not a vision transformer tome-export supports (supported: {', '.join(ARCHITECTURES)})")
    raise UserError(f"{where} holds a {shown}: ToMe cannot merge it: {why}")


def _unmergeable_reason(class_name: str) -> Optional[str]:
    for suffix in _GRID_HEADS:
        if class_name.endswith(suffix):
            return f"its {suffix} head needs every token of the grid"
    return next((why for key, why in _UNMERGEABLE.items() if class_name.startswith(key)), None)


def _pair(value: Any) -> Tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


# --- loading ---------------------------------------------------------------------------------------------------


def _quiet_transformers():
    """transformers, with its loading reports and progress bars off (this module reports problems itself)."""
    try:
        import transformers
    except ImportError:
        raise UserError("transformers models need the Python package 'transformers': "
                        "pip install 'tome-export[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def _weight_file(directory: Path) -> Optional[Path]:
    return next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)


def hub_snapshot(repo: str, weights: bool) -> Path:
    """The local snapshot of a hub repo (config and image processor config, and weights if asked for).

    Downloads what is missing when the hub is reachable and ``HF_HUB_OFFLINE`` is not set; otherwise reads the cache
    only. Never falls back to anything else: a repo that cannot be had is a one-line error.
    """
    from huggingface_hub import snapshot_download

    offline = not hub_reachable()
    wanted = [[CONFIG_FILE, PROCESSOR_FILE]]
    if weights:  # safetensors first; .bin only for repos that have no safetensors
        wanted = [[CONFIG_FILE, PROCESSOR_FILE, "model.safetensors", "model.safetensors.index.json",
                   "model-*.safetensors"], ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]]
    try:
        directory = Path(snapshot_download(repo, allow_patterns=wanted[0], local_files_only=offline))
        if weights and _weight_file(directory) is None:
            directory = Path(snapshot_download(repo, allow_patterns=wanted[1], local_files_only=offline))
    except Exception as exc:  # every hub failure (offline, not cached, no such repo, gated) is the same user problem
        raise UserError(_hub_error(repo, type(exc).__name__, offline, weights)) from None
    if not (directory / CONFIG_FILE).is_file() or (weights and _weight_file(directory) is None):
        raise UserError(_hub_error(repo, "incomplete snapshot", offline, weights))
    return directory


def _hub_error(repo: str, what: str, offline: bool, weights: bool) -> str:
    import huggingface_hub.constants as hub

    where = f"the cache {hub.HF_HUB_CACHE} (offline)" if offline else "the Hugging Face hub"
    need = "pretrained weights" if weights else "the config"
    fix = ("pass a local save_pretrained directory as --model, or --weights random for seeded random weights "
           "(its config must be cached)" if weights else "pass a local save_pretrained directory as --model")
    return f"cannot load {need} of {PREFIX}{repo} from {where}: {what}. Offline and not cached? Run once online or {fix}"


def source_directory(name: str, weights: bool) -> Path:
    """The directory a resolved name loads from: a local directory, or the hub snapshot of a repo id."""
    return Path(name) if Path(name).is_absolute() else hub_snapshot(name, weights)


def build(name: str, pretrained: bool, **kwargs: Any) -> torch.nn.Module:
    """The model of a resolved name (:func:`resolve`): random from its config (seed torch before) or pretrained.

    ``img_size`` sets the input resolution (position embeddings are interpolated as transformers does); other kwargs
    override config attributes (e.g. ``num_hidden_layers``, ``num_labels``). The model remembers its preprocessing
    (from ``preprocessor_config.json``, else the model type's image processor defaults) and where it came from.
    """
    transformers = _quiet_transformers()
    directory = source_directory(name, pretrained)
    img_size = kwargs.pop("img_size", None)
    class_name, config = _model_config(transformers, directory, kwargs)
    cls = getattr(transformers, class_name)
    if pretrained:
        model = _load_pretrained(cls, directory, config)
    else:
        model = cls._from_config(config)
    model.tome_data_config = preprocessing(directory, config, img_size)
    model.tome_source = {"architecture": class_name, **_revision(directory)}
    return model.eval()


def _model_config(transformers, directory: Path, overrides: Dict[str, Any]):
    """(class name, config object) of a directory; a two-tower config yields its vision tower's config."""
    raw = read_config(directory)
    class_name = architecture_class(raw, str(directory))
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise UserError(f"transformers cannot read {str(directory / CONFIG_FILE)!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}): re-save the model") from None
    if raw.get("model_type") in ("clip", "siglip") and class_name in ("CLIPVisionModelWithProjection",
                                                                      "CLIPVisionModel", "SiglipVisionModel"):
        vision = config.vision_config
        if hasattr(config, "projection_dim"):  # the two-tower config holds the projection size
            vision.projection_dim = config.projection_dim
        config = vision
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UserError(f"{type(config).__name__} has no attribute {key!r}: model arguments of a transformers "
                            "model are config attributes (e.g. num_hidden_layers, num_labels)")
        setattr(config, key, value)
    return class_name, config


def _load_pretrained(cls, directory: Path, config) -> torch.nn.Module:
    """Weights of a directory, strictly: a missing or mis-shaped tensor is an error, never a random init."""
    if _weight_file(directory) is None:
        raise UserError(f"{str(directory)!r} has no weights ({' or '.join(WEIGHT_FILES[::2])}): add them, or pass "
                        "--weights random for seeded random weights")
    try:
        model, info = cls.from_pretrained(str(directory), config=config, output_loading_info=True)
    except Exception as exc:
        raise UserError(f"cannot load the weights in {str(directory)!r} ({type(exc).__name__}): re-save the model "
                        "with save_pretrained") from None
    problems = {label: list(info.get(key) or []) for key, label in
                (("missing_keys", "missing"), ("mismatched_keys", "wrong shape"))}
    if any(problems.values()):
        parts = [f"{len(keys)} {label} ({', '.join(str(k) for k in keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for label, keys in problems.items() if keys]
        raise UserError(f"the weights in {str(directory)!r} do not match its config ({cls.__name__}): "
                        f"{'; '.join(parts)}. Re-save the model with save_pretrained")
    return model


def _revision(directory: Path) -> Dict[str, str]:
    """The commit of a hub cache snapshot (``.../snapshots/<commit>``); nothing for other directories."""
    if directory.parent.name == "snapshots" and len(directory.name) == 40:
        return {"revision": directory.name}
    return {}


# --- preprocessing ---------------------------------------------------------------------------------------------


def preprocessing(directory: Optional[Path], config, img_size: Optional[int] = None) -> Dict[str, Any]:
    """The eval preprocessing of a model (timm-style data config) from its image processor.

    The processor is read from the directory's ``preprocessor_config.json``; without one, the model type's
    transformers processor with its defaults is used at the config's image size. ``img_size`` changes the input
    side and keeps the processor's resize-to-crop ratio.
    """
    transformers = _quiet_transformers()
    path = directory / PROCESSOR_FILE if directory is not None else None
    if path is not None and path.is_file():
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(directory))
        except Exception as exc:
            raise UserError(f"transformers cannot read {str(path)!r} ({type(exc).__name__}): fix or re-save the "
                            "image processor") from None
        where = str(path)
    else:
        processor = getattr(transformers, _PROCESSORS.get(config.model_type, "ViTImageProcessor"))()
        where = f"{type(processor).__name__} defaults"
        img_size = img_size or _pair(config.image_size)[0]
    return processor_data_config(processor, where, img_size)


def _size_field(size: Any, key: str) -> Optional[int]:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def processor_data_config(processor: Any, where: str, img_size: Optional[int] = None) -> Dict[str, Any]:
    """A transformers image processor as a data config: input_size, mean, std, crop_pct, crop_mode, interpolation.

    Squash resizes (``size: {height, width}``) become ``crop_mode: squash``, shorter-edge resizes ``center``; the
    centre crop (if any) gives the input size. Rescaling and normalisation fold into mean and std.
    """
    size = getattr(processor, "size", None)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if not getattr(processor, "do_resize", True) or size is None:
        raise UserError(f"{where} does not resize images: the input shape would depend on each image; "
                        "set do_resize and size")
    short = _size_field(size, "shortest_edge")
    if short:
        if crop is None:
            raise UserError(f"{where} resizes the shorter edge to {short} without a centre crop: the input shape "
                            "would depend on each image; set do_center_crop and crop_size")
        resize, mode = (short, short), "center"
    elif _size_field(size, "height") and _size_field(size, "width"):
        resize, mode = (_size_field(size, "height"), _size_field(size, "width")), "squash"
    else:
        raise UserError(f"{where} has a resize rule tome-export cannot represent ({size}): use size "
                        "{height, width} or {shortest_edge} with a centre crop")
    out = (_size_field(crop, "height"), _size_field(crop, "width")) if crop is not None else resize
    crop_pct = _crop_pct(out, resize, where)
    if img_size:
        out = (int(img_size), int(img_size))
    return {"input_size": (3, *out), "crop_pct": crop_pct, "crop_mode": mode,
            "interpolation": _interpolation(processor, where), **_normalization(processor)}


def _crop_pct(out: Tuple[int, int], resize: Tuple[int, int], where: str) -> float:
    """The crop fraction for which Preprocessing's ``floor(out / crop_pct)`` gives back ``resize`` on both sides."""
    for pct in (out[0] / resize[0], out[0] / (resize[0] + 0.5)):
        if all(math.floor(o / pct) == r for o, r in zip(out, resize)):
            return pct
    raise UserError(f"{where} crops {out[0]}x{out[1]} from {resize[0]}x{resize[1]}: tome-export needs the same "
                    "crop fraction on both sides")


def _interpolation(processor: Any, where: str) -> str:
    resample = getattr(processor, "resample", 2)
    try:
        return _RESAMPLE[int(getattr(resample, "value", resample))]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where} uses resample={resample!r}; tome-export supports PIL's nearest, bilinear, bicubic, "
                        "lanczos, box and hamming") from None


def _normalization(processor: Any) -> Dict[str, Tuple[float, ...]]:
    """mean/std applied to pixels scaled to [0, 1] that reproduce the processor's rescale and normalize steps."""
    scale = float(processor.rescale_factor) * 255 if getattr(processor, "do_rescale", True) else 255.0
    if getattr(processor, "do_normalize", True):
        mean, std = processor.image_mean, processor.image_std
        mean = mean if isinstance(mean, (list, tuple)) else [mean] * 3
        std = std if isinstance(std, (list, tuple)) else [std] * 3
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    if abs(scale - 1.0) < 1e-9:  # the usual rescale by 1/255
        scale = 1.0
    # (p * rescale - mean) / std with p in [0, 255] equals (p / 255 - mean / s) / (std / s) with s = 255 * rescale
    return {"mean": tuple(float(m) / scale for m in mean), "std": tuple(float(s) / scale for s in std)}


# --- structure -------------------------------------------------------------------------------------------------


def _base_class(model: torch.nn.Module) -> type:
    cls = type(model)
    return cls.__bases__[1] if issubclass(cls, ToMeTransformersMixin) else cls


def _arch(model: torch.nn.Module) -> Optional[_Arch]:
    """The architecture entry of a transformers model of exactly a supported class, else None."""
    cls = _base_class(model)
    return ARCHITECTURES.get(cls.__name__) if cls.__module__.startswith("transformers.") else None


def _backbone(model: torch.nn.Module, arch: _Arch) -> torch.nn.Module:
    return getattr(model, arch.backbone) if arch.backbone else model


def _layers(backbone: torch.nn.Module, kind: _Kind) -> torch.nn.ModuleList:
    return functools.reduce(getattr, kind.layers.split("."), backbone)


def _num_protected(backbone: torch.nn.Module, arch: _Arch) -> int:
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
        if name in _VISION_TOWERS:
            return f"{name} is a two-tower model: patch its vision tower ({_VISION_TOWERS[name]}.from_pretrained)"
        return _unmergeable_reason(name) or (
            f"{name} is not a transformers vision model tome-export supports ({', '.join(ARCHITECTURES)})")
    kind = _KINDS[arch.kind]
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


def _output_dim(model: torch.nn.Module, backbone: torch.nn.Module, arch: _Arch, hidden: int) -> int:
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
    layers = _layers(backbone, _KINDS[arch.kind])
    attn = getattr(layers[0], _KINDS[arch.kind].layout.attn)
    mlp = layers[0].mlp
    # A SwiGLU MLP has three c x h' matrices; 1.5 h' makes the two-matrix MAC count of the FLOP model exact.
    mlp_hidden = mlp.fc1.out_features if hasattr(mlp, "fc1") else 3 * mlp.gate_proj.out_features // 2
    config = backbone.config
    h, w = data_config(model)["input_size"][1:]
    p = _pair(config.patch_size)
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
                    layout: _Layout) -> Tuple[torch.Tensor, torch.Tensor]:
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


def _layer(layout: _Layout, layer: torch.nn.Module, x: torch.Tensor, size, source, bias) -> State:
    """One layer: attention, then the merge, then the MLP (where the reference merges)."""
    out, keys = _self_attention(getattr(layer, layout.attn), getattr(layer, layout.norm1)(x), bias, layout)
    x = x + _branch(layer, layout.scale1, layout.drop, out)
    if layer.tome_merge.merges(x.shape[1]):
        x, size, source, bias = layer.tome_merge(x, keys, size, source)
    x = x + _branch(layer, layout.scale2, layout.drop, layer.mlp(getattr(layer, layout.norm2)(x)))
    return x, size, source, bias


def _embed(backbone: torch.nn.Module, kind: _Kind, pixels: torch.Tensor) -> torch.Tensor:
    if kind.interpolate_flag:  # position embeddings are interpolated when the input is not the config's size
        other = tuple(pixels.shape[-2:]) != _pair(backbone.config.image_size)
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


class ToMeTransformersMixin(ToMeModel):
    """Forward of a ToMe-patched transformers vision model (mixed in before the model's own class)."""

    tome: ToMeConfig

    def tome_features(
        self, x: torch.Tensor, trace_source: bool = False
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Tokens as the backbone's last_hidden_state, their sizes ``(B, T, 1)`` and optionally their sources."""
        arch = _arch(self)
        backbone, kind = _backbone(self, arch), _KINDS[arch.kind]
        x = _embed(backbone, kind, x.to(next(backbone.embeddings.parameters()).dtype))  # as transformers casts
        x, size, source = run_blocks(_layers(backbone, kind), functools.partial(_layer, kind.layout), x, trace_source)
        if kind.final_norm:
            x = getattr(backbone, kind.final_norm)(x)
        return x, size, source

    def tome_head(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
        """The model's own head; means and attention pooling weigh each token by its size."""
        arch = _arch(self)
        backbone = _backbone(self, arch)
        return _HEADS[arch.head](self, backbone, x, size, _num_protected(backbone, arch))


def patch(model: torch.nn.Module, cfg: ToMeConfig) -> torch.nn.Module:
    """Patch ``model`` in place (or re-configure an already patched one) and return it."""
    arch = _arch(model)
    backbone = _backbone(model, arch)
    return patch_model(model, ToMeTransformersMixin, _layers(backbone, _KINDS[arch.kind]),
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
    transformers = _quiet_transformers()
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
