"""Model registry: aliases, weights, and the per-family ToMe patch.

One module per model family (``timm_vit`` ...); each provides ``FAMILY``, ``DESCRIPTION``,
``unsupported_reason(model)``, ``model_info(model)`` and ``patch(model, cfg)``.
"""

from __future__ import annotations

import difflib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import UserError
from ..schedule import RSpec, expand_schedule
from . import timm_vit
from .base import ModelInfo, ToMeConfig

FAMILIES = (timm_vit,)

ALIASES: Dict[str, str] = {
    "vit_t16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_l16": "vit_large_patch16_224",
    "deit_t": "deit_tiny_patch16_224",
    "deit_s": "deit_small_patch16_224",
    "deit_b": "deit_base_patch16_224",
    "deit_t_distilled": "deit_tiny_distilled_patch16_224",
    "deit_s_distilled": "deit_small_distilled_patch16_224",
    "deit_b_distilled": "deit_base_distilled_patch16_224",
    "deit3_s": "deit3_small_patch16_224",
    "deit3_b": "deit3_base_patch16_224",
    "digits_vit": "tome_digits_vit",  # the benchmark's embedded accuracy case (tome_export.bench.digits)
}

# Architectures whose token positions are baked into the attention: merging would silently change them.
_UNMERGEABLE = {
    "Eva": "rotary position embeddings (RoPE) in every block tie each token to its grid position",
    "Beit": "relative position bias tables in every block are indexed by the token grid",
    "VisionTransformerRelPos": "relative position bias tables are indexed by the token grid",
    "SwinTransformer": "windowed attention needs the full token grid",
}

WEIGHTS = ("pretrained", "random")


@dataclass(frozen=True)
class ModelSpec:
    """Which model was built and from which weights (recorded in manifests)."""

    alias: str
    timm_name: str
    weights: str  # pretrained | random | checkpoint
    seed: Optional[int] = None
    checkpoint: Optional[str] = None


def resolve_name(name: str) -> Tuple[str, str]:
    """``(alias, timm name)`` for an alias or any timm model name."""
    import timm

    from ..bench import digits  # noqa: F401  (registers tome_digits_vit with timm)

    if name in ALIASES:
        return name, ALIASES[name]
    if timm.is_model(name) or timm.is_model(name.split(".")[0]):
        return name, name
    close = difflib.get_close_matches(name, list(ALIASES) + timm.list_models("*vit*") + timm.list_models("deit*"), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown model {name!r}.{hint} Use an alias ({', '.join(ALIASES)}) or a timm model name "
        "(see `tome-export --list-models`)."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist: pass the path of a .pth or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the same user problem
        raise UserError(
            f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}): "
            "pass a timm state_dict saved with torch.save or safetensors"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {str(path)!r} holds no state_dict of tensors: save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def create_model(
    name: str,
    weights: str = "pretrained",
    checkpoint: Optional[os.PathLike] = None,
    seed: int = 0,
    **kwargs,
) -> Tuple[torch.nn.Module, ModelSpec]:
    """Build a model by alias or timm name, in eval mode, with pretrained, checkpoint or seeded random weights.

    Offline without cached pretrained weights this raises a :class:`UserError` naming the flags that work
    offline; it never falls back to random weights.
    """
    import timm

    alias, timm_name = resolve_name(name)
    if checkpoint is not None:
        sd = _read_state_dict(Path(checkpoint))
        head = sd.get("head.weight")
        if head is not None and head.ndim == 2 and "num_classes" not in kwargs:
            kwargs["num_classes"] = head.shape[0]
        torch.manual_seed(seed)
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        own = model.state_dict()
        problems = {
            "missing": [k for k in own if k not in sd],
            "unexpected": [k for k in sd if k not in own],
            "wrong shape": [k for k, v in sd.items() if k in own and own[k].shape != v.shape],
        }
        if any(problems.values()):
            parts = [f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                     for label, keys in problems.items() if keys]
            raise UserError(
                f"checkpoint {str(checkpoint)!r} does not match {alias} ({timm_name}): {'; '.join(parts)}. "
                "Pass --model of the architecture the checkpoint was trained with"
            )
        model.load_state_dict(sd, strict=True)
        spec = ModelSpec(alias, timm_name, "checkpoint", seed=None, checkpoint=str(checkpoint))
    elif weights == "random":
        torch.manual_seed(seed)
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        spec = ModelSpec(alias, timm_name, "random", seed=seed)
    elif weights == "pretrained":
        model = _create_pretrained(alias, timm_name, **kwargs)
        spec = ModelSpec(alias, timm_name, "pretrained")
    else:
        raise UserError(f"unknown --weights {weights!r}: use pretrained or random (or --checkpoint PATH)")
    return model.eval(), spec


def _create_pretrained(alias: str, timm_name: str, **kwargs) -> torch.nn.Module:
    import huggingface_hub.constants as hub
    import timm

    offline_before = hub.HF_HUB_OFFLINE
    if not offline_before and not _hub_reachable():
        hub.HF_HUB_OFFLINE = True  # cache only: the hub client would otherwise retry for a minute
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except Exception as exc:
        raise UserError(
            f"cannot load pretrained weights for {alias} ({timm_name}): {type(exc).__name__}. Offline and not "
            "cached? Use --checkpoint PATH for a local timm state_dict or --weights random for seeded random weights"
        ) from None
    finally:
        hub.HF_HUB_OFFLINE = offline_before


def _family(model: torch.nn.Module):
    reasons = []
    for family in FAMILIES:
        reason = family.unsupported_reason(model)
        if reason is None:
            return family
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


def patch(
    model: torch.nn.Module,
    r: RSpec = 0,
    *,
    merge_impl: str = "gather",
    prop_attn: bool = True,
) -> torch.nn.Module:
    """Apply ToMe to ``model`` in place and return it.

    ``r``: an int, an ``(r, inflect)`` pair or a list with one r per block. ``merge_impl``: ``gather`` or
    ``onehot`` (identical results; see :mod:`tome_export.merge`). ``prop_attn``: proportional attention
    (the reference's default for off-the-shelf models). Calling ``patch`` again re-configures the model.
    The model stays trainable: gradients flow through the merge.
    """
    family = _family(model)
    info = family.model_info(model)
    if merge_impl == "auto":
        merge_impl = "gather"
    requested = expand_schedule(r, info.num_blocks)  # blocks cap r at run time, as the reference does
    return family.patch(model, ToMeConfig(r=tuple(requested), merge_impl=merge_impl, prop_attn=prop_attn))


def list_models() -> List[Tuple[str, str]]:
    """``(alias, timm name)`` pairs."""
    return list(ALIASES.items())
