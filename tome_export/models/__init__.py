"""Model registry: aliases, weights, and the per-family ToMe patch.

One module per model family (``timm_vit``, ``torchvision_vit``, ``hf_vit``); each provides ``FAMILY``, ``SOURCE``,
``DESCRIPTION``, ``VERIFIED``, ``unsupported_reason(model)``, ``model_info(model)``, ``data_config(model)``
and ``patch(model, cfg)``.

The AugReg aliases pin ``augreg_in21k_ft_in1k``, the weights the ToMe paper reports on (``vit_b16``: 84.57 top-1 off
the shelf); a bare timm name such as ``vit_base_patch16_224`` follows timm's default tag (``augreg2_in21k_ft_in1k``
today). Manifests record the timm tag that was used (``model.pretrained_tag``).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

from ..errors import UserError
from ..schedule import RSpec, expand_schedule
from . import hf_vit, timm_vit, torchvision_vit
from .base import ModelInfo, ToMeConfig
from .checkpoint import host_reachable, load_checked, read_state_dict

FAMILIES = (timm_vit, torchvision_vit, hf_vit)

ALIASES: Dict[str, str] = {
    # AugReg: the ToMe paper's weights, pinned (timm's default tag for ViT-S/B is augreg2 today)
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
    "digits_vit": "tome_digits_vit",  # the benchmark's embedded accuracy case (tome_export.bench.digits)
}

# Architectures ToMe cannot merge as defined (matched by class-name prefix), mostly because token positions
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

WEIGHTS = ("pretrained", "random")


class ModelName(NamedTuple):
    """A resolved model name: what the user typed (alias), where it comes from and its upstream name."""

    alias: str
    source: str  # timm | torchvision | transformers
    name: str  # timm model name, torchvision ``builder.WEIGHTS``, or a transformers repo id / directory


@dataclass(frozen=True)
class ModelSpec:
    """Which model was built and from which weights (recorded in manifests)."""

    alias: str
    name: str  # the upstream name (see ModelName)
    weights: str  # pretrained | random | checkpoint
    seed: Optional[int] = None
    checkpoint: Optional[str] = None
    source: str = "timm"
    details: Tuple[Tuple[str, Any], ...] = ()  # family facts for the manifest (timm tag, transformers revision)

    @property
    def timm_name(self) -> Optional[str]:
        return self.name if self.source == "timm" else None

    def manifest_entry(self, family: str) -> Dict[str, object]:
        entry = {"alias": self.alias, "source": self.source, "name": self.name}
        if self.source == "timm":
            entry["timm_name"] = self.name  # manifests before torchvision support had only this
        return {**entry, "family": family, "weights": self.weights, "seed": self.seed, "checkpoint": self.checkpoint,
                **dict(self.details)}


def all_aliases() -> Dict[str, str]:
    """Every alias and the upstream name it stands for (timm first, then torchvision)."""
    return {**ALIASES, **torchvision_vit.ALIASES}


def resolve(name: str) -> ModelName:
    """The source and upstream name of an alias, a timm or torchvision ViT name, ``hf:<repo id>`` or a directory."""
    import timm

    from ..bench import digits  # noqa: F401  (registers tome_digits_vit with timm)

    hf_name = hf_vit.resolve(name)
    if hf_name is not None:
        return ModelName(name, hf_vit.SOURCE, hf_name)
    if name in ALIASES:
        return ModelName(name, "timm", ALIASES[name])
    tv_name = torchvision_vit.canonical_name(name)
    if tv_name is not None:
        return ModelName(name, "torchvision", tv_name)
    if timm.is_model(name) or timm.is_model(name.split(".")[0]):
        return ModelName(name, "timm", name)
    if Path(name).is_dir():  # a directory named without a path separator
        return ModelName(name, hf_vit.SOURCE, hf_vit.resolve(os.path.join(".", name)))
    names = list(all_aliases()) + list(torchvision_vit.BUILDERS) + timm.list_models("*vit*") + timm.list_models("deit*")
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown model {name!r}.{hint} Use an alias ({', '.join(all_aliases())}), a timm model name, a "
        "torchvision ViT name, hf:<repo id> or a save_pretrained directory (see `tome-export --list-models`)."
    )


def resolve_name(name: str) -> Tuple[str, str]:
    """``(alias, upstream name)`` for an alias, a timm or a torchvision model name."""
    ref = resolve(name)
    return ref.alias, ref.name


def _hub_reachable(timeout: float = 3.0) -> bool:
    return host_reachable("huggingface.co", timeout)


def create_model(
    name: str,
    weights: str = "pretrained",
    checkpoint: Optional[os.PathLike] = None,
    seed: int = 0,
    **kwargs,
) -> Tuple[torch.nn.Module, ModelSpec]:
    """Build a model by alias, timm or torchvision name, in eval mode, with pretrained, checkpoint or seeded
    random weights. ``kwargs`` go to the model's constructor (``img_size`` works for both sources).

    Offline without cached pretrained weights this raises a :class:`UserError` naming the flags that work
    offline; it never falls back to random weights.
    """
    ref = resolve(name)
    if checkpoint is not None and ref.source == hf_vit.SOURCE:
        raise UserError("--checkpoint takes timm and torchvision state_dicts; a transformers model loads its weights "
                        "from its directory: pass the save_pretrained directory as --model")
    if checkpoint is not None:
        sd = read_state_dict(Path(checkpoint))
        if ref.source == "torchvision":
            sd = torchvision_vit.upgrade_state_dict(sd)
            inferred = torchvision_vit.kwargs_from_state_dict(ref.name, sd)
            if "img_size" in kwargs:
                inferred.pop("image_size", None)
            kwargs = {**inferred, **kwargs}
        else:
            head = sd.get("head.weight")
            if head is not None and head.ndim == 2 and "num_classes" not in kwargs:
                kwargs["num_classes"] = head.shape[0]
            if "fc_norm.weight" in sd and "norm.weight" not in sd and "global_pool" not in kwargs:
                kwargs["global_pool"] = "avg"  # MAE fine-tuned checkpoints: average pool, then fc_norm
        torch.manual_seed(seed)
        model = _build(ref, pretrained=False, **kwargs)
        load_checked(model, sd, str(checkpoint), f"{ref.alias} ({ref.name})")
        spec = ModelSpec(ref.alias, ref.name, "checkpoint", seed=None, checkpoint=str(checkpoint), source=ref.source)
    elif weights == "random":
        torch.manual_seed(seed)
        model = _build(ref, pretrained=False, **kwargs)
        spec = ModelSpec(ref.alias, ref.name, "random", seed=seed, source=ref.source)
    elif weights == "pretrained":
        model = _create_pretrained(ref, **kwargs)
        spec = ModelSpec(ref.alias, ref.name, "pretrained", source=ref.source)
    else:
        raise UserError(f"unknown --weights {weights!r}: use pretrained or random (or --checkpoint PATH)")
    return model.eval(), replace(spec, details=tuple(_spec_details(model).items()))


def _spec_details(model: torch.nn.Module) -> Dict[str, Any]:
    """What the manifest records beside the name: timm's pretrained tag, a transformers model's class and revision."""
    details = dict(getattr(model, "tome_source", None) or {})
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
    if tag:
        details["pretrained_tag"] = tag
    return details


def _build(ref: ModelName, pretrained: bool, **kwargs) -> torch.nn.Module:
    if ref.source == "torchvision":
        return torchvision_vit.build(ref.name, pretrained, **kwargs)
    if ref.source == hf_vit.SOURCE:
        return hf_vit.build(ref.name, pretrained, **kwargs)
    import timm

    return timm.create_model(ref.name, pretrained=pretrained, **kwargs)


def _create_pretrained(ref: ModelName, **kwargs) -> torch.nn.Module:
    import huggingface_hub.constants as hub

    offline_before = hub.HF_HUB_OFFLINE
    if ref.source == "timm" and not offline_before and not _hub_reachable():
        hub.HF_HUB_OFFLINE = True  # cache only: the hub client would otherwise retry for a minute
    try:
        return _build(ref, pretrained=True, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"cannot load pretrained weights for {ref.alias} ({ref.name}): {type(exc).__name__}. Offline and not "
            f"cached? Use --checkpoint PATH for a local {ref.source} state_dict or --weights random for seeded "
            "random weights"
        ) from None
    finally:
        hub.HF_HUB_OFFLINE = offline_before


def _family(model: torch.nn.Module):
    reasons = []
    for family in FAMILIES:
        reason = family.unsupported_reason(model)
        if reason is None:
            return family
        if isinstance(model, family.MODEL_CLASS):
            reasons.insert(0, reason)  # the family the model belongs to knows best why
        else:
            reasons.append(reason)
    cls = type(model).__name__
    specific = next((why for key, why in _UNMERGEABLE.items() if cls.startswith(key)), None)
    supported = "; ".join(f.DESCRIPTION for f in FAMILIES)
    raise UserError(
        f"cannot apply ToMe to {cls}: {specific or reasons[0]}. Supported: {supported}"
    )


def model_info(model: torch.nn.Module) -> ModelInfo:
    """Static shape facts of a supported model."""
    return _family(model).model_info(model)


def data_config(model: torch.nn.Module) -> Dict[str, object]:
    """The model's eval preprocessing (input_size, mean, std, crop_pct, crop_mode, interpolation)."""
    return _family(model).data_config(model)


def patch(
    model: torch.nn.Module,
    r: RSpec = 0,
    *,
    merge_impl: str = "gather",
    prop_attn: Optional[bool] = None,
    trainable: bool = False,
    fused: bool = True,
) -> torch.nn.Module:
    """Apply ToMe to ``model`` in place and return it.

    ``r``: an int, an ``(r, inflect)`` pair or a list with one r per block. ``merge_impl``: ``gather`` or
    ``onehot`` (identical results; see :mod:`tome_export.merge`). Calling ``patch`` again re-configures
    the model.

    Every patched model is differentiable, in train and eval mode: which tokens merge is decided under
    ``no_grad`` (as in the reference), gradients flow through the size-weighted merge into the merged
    tokens, and dropout, attention dropout and drop-path run as in the unpatched model in train mode.

    ``prop_attn``: proportional attention (log of the token size added to the attention logits). Default:
    on for inference on off-the-shelf models, off with ``trainable=True`` — the reference's advice for
    fine-tuning with ToMe (and for MAE models off the shelf). Deploy a model with the ``prop_attn`` it
    was trained with (CLI: ``--no-prop-attn``).

    ``fused``: on CUDA tensors, run each block's matching and merge as one Triton kernel and one batched
    matmul (same decisions as ``merge_impl``; see :mod:`tome_export.kernels.fused_merge`). Exports and CPU runs
    always use ``merge_impl``.
    """
    family = _family(model)
    info = family.model_info(model)
    if merge_impl == "auto":
        merge_impl = "gather"
    if prop_attn is None:
        prop_attn = not trainable
    requested = expand_schedule(r, info.num_blocks)  # blocks cap r at run time, as the reference does
    return family.patch(model, ToMeConfig(r=tuple(requested), merge_impl=merge_impl, prop_attn=prop_attn,
                                               fused=fused))


class ListedModel(NamedTuple):
    alias: str
    source: str
    name: str


def list_models() -> List[ListedModel]:
    """Every alias with its source and upstream name."""
    return [ListedModel(alias, resolve(alias).source, name) for alias, name in all_aliases().items()]


def verified_families() -> List[Tuple[str, str, str, str]]:
    """``(source, family, names, what was checked)`` of every family the tests verify."""
    return [(family.SOURCE, *row) for family in FAMILIES for row in family.VERIFIED]
