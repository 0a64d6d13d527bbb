"""Reading checkpoints and checking them against a model, shared by every family."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from ..errors import UserError


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, as its client would reach it: ``HF_HUB_OFFLINE`` means no, the
    endpoint is ``HF_ENDPOINT`` (a mirror) where set, and proxies come from the environment. Offline, the hub
    client would otherwise retry each download for about a minute before it reads its cache."""
    import huggingface_hub.constants as hub
    from huggingface_hub.utils import get_session

    if hub.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(hub.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # any failure to connect (DNS, refused, proxy, TLS, timeout) is "not reachable"
        return False


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s server answers a HEAD request (through the environment's proxies, as downloads go)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:  # the server answered, if only with an error status
        return True
    except (OSError, ValueError):
        return False


def read_state_dict(path: Path, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """A state_dict from a ``.pth`` or ``.safetensors`` file, read by timm's ``load_state_dict`` (tensors only,
    wrappers such as ``{"state_dict": ...}`` and ``module.`` prefixes removed); ``prefer_ema``: EMA weights
    where the file holds them, as timm evaluates its own checkpoints."""
    from timm.models import load_state_dict

    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist: pass the path of a .pth or .safetensors file")
    no_state_dict = UserError(f"checkpoint {str(path)!r} holds no state_dict of tensors: save model.state_dict()")
    try:
        sd = load_state_dict(str(path), use_ema=prefer_ema, weights_only=True)
    except (AttributeError, TypeError):  # it read, but what it holds is not a mapping (a list, a tensor)
        raise no_state_dict from None
    except Exception as exc:  # any unreadable file is the same user problem
        raise UserError(
            f"cannot read checkpoint {str(path)!r} ({type(exc).__name__}): "
            "pass a state_dict saved with torch.save or safetensors"
        ) from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise no_state_dict
    return sd


def load_checked(model: torch.nn.Module, sd: Dict[str, torch.Tensor], checkpoint: str, what: str) -> None:
    """Load ``sd`` strictly, or raise one UserError listing missing, unexpected and mis-shaped keys."""
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
            f"checkpoint {checkpoint!r} does not match {what}: {'; '.join(parts)}. "
            "Pass --model of the architecture the checkpoint was trained with"
        )
    check_values(sd, own, checkpoint)
    model.load_state_dict(sd, strict=True)


def check_values(sd: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor], checkpoint: str) -> None:
    """Refuse, naming the tensor, a checkpoint no export can be right with: integer, boolean or quantized values
    where the model holds floats (loading would cast them without a word), or NaN and infinities (the export would
    run to the end, then fail validation with meaningless numbers)."""
    for key, value in sd.items():
        if own[key].is_floating_point() and not value.is_floating_point():
            raise UserError(f"checkpoint {checkpoint!r}: {key} holds {str(value.dtype).replace('torch.', '')} values "
                            f"where the model has {str(own[key].dtype).replace('torch.', '')} weights: pass the "
                            f"floating-point state_dict the model was trained with")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f"checkpoint {checkpoint!r}: {key} holds {bad:,} NaN or infinite value(s) of "
                            f"{value.numel():,}: the checkpoint is damaged (or saved from a diverged run); pass one "
                            f"with finite weights")
