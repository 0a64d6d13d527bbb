"""Which accelerators this machine has, asked of torch where it is installed (deployments never ask)."""

from __future__ import annotations


def gpu_available() -> bool:
    """Whether a CUDA GPU is visible to torch (False without torch, or with a CUDA build but no driver)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a CUDA build of torch on a machine without a driver can raise instead
        return False
