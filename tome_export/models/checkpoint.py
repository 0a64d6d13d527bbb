"""Reading checkpoints and checking them against a model, shared by every family."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Dict

import torch

from ..errors import UserError


def host_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host:443`` accepts a connection (downloads would otherwise retry for a long time offline)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A state_dict from a ``.pth`` (possibly wrapped in ``{"model": ...}`` etc.) or ``.safetensors`` file."""
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
            "pass a state_dict saved with torch.save or safetensors"
        ) from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {str(path)!r} holds no state_dict of tensors: save model.state_dict()")
    return {k.removeprefix("module."): v for k, v in sd.items()}


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
    model.load_state_dict(sd, strict=True)
