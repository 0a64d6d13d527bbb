"""Estimates of what heavy work will need, checked before it starts: memory of a forward pass, bench cell counts.

The estimates are deliberately rough (upper-side) and torch-free; their job is to refuse requests that cannot fit
(an ``--img-size 4096`` attention matrix, a batch of 100,000) in a second instead of after minutes of work or an
out-of-memory kill. Every refusal names the flag that lifts it.
"""

from __future__ import annotations

import os
from typing import Optional

from .errors import UserError
from .info import ModelInfo

MEMORY_FRACTION = 0.5  # refuse work estimated to need more than this share of the machine's memory
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 16, 8192  # --img-size: one patch at least; beyond the max the model itself is huge
MAX_THREADS = 1024  # CPU threads beyond this are a typo
MAX_CELLS = 2000  # a benchmark matrix larger than this is refused unless asked for
LIFT_FLAG = "--allow-large"

GB = 1e9


def physical_memory() -> Optional[int]:
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def forward_bytes(info: ModelInfo, batch: int) -> int:
    """Peak bytes of one fp32 forward of ``batch`` images without ToMe (ToMe only shrinks it): the weights, the
    attention logits and probabilities of one block, and its MLP activations, doubled for the exporter's copies."""
    tokens = info.num_tokens
    weights = info.num_blocks * (4 * info.embed_dim * info.attn_dim + 2 * info.embed_dim * info.mlp_hidden)
    attention = 2 * info.num_heads * tokens * tokens
    activations = tokens * (3 * info.attn_dim + 2 * info.mlp_hidden + 4 * info.embed_dim)
    return 4 * (weights + 2 * batch * (attention + activations))


def check_memory(info: ModelInfo, batch: int, what: str, allow: bool = False) -> None:
    """Refuse ``what`` when a forward of ``batch`` images needs more than :data:`MEMORY_FRACTION` of memory."""
    total = physical_memory()
    need = forward_bytes(info, batch)
    if allow or total is None or need <= MEMORY_FRACTION * total:
        return
    raise UserError(f"{what} needs about {need / GB:.0f} GB of memory ({info.num_tokens} tokens x batch {batch}); "
                    f"this machine has {total / GB:.0f} GB: use a smaller --img-size or batch, or pass {LIFT_FLAG} "
                    f"to try anyway")


def check_img_size(img_size: Optional[int], flag: str = "--img-size") -> None:
    """An image side a model can be built for, before the model exists (its position embedding grows with it)."""
    if img_size is None:
        return
    if isinstance(img_size, bool) or not isinstance(img_size, int) or not MIN_IMAGE_SIDE <= img_size <= MAX_IMAGE_SIDE:
        raise UserError(f"{flag} must be an image side from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE} pixels, got "
                        f"{img_size!r}")


def check_threads(threads: Optional[int], flag: str = "threads") -> None:
    """A CPU thread count a backend takes: None (its default) or 1 to :data:`MAX_THREADS`."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise UserError(f"{flag} must be an integer from 1 to {MAX_THREADS} (or None: the backend's default), got "
                        f"{threads!r}")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed the random generators take (0 to 2**64 - 1)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise UserError(f"{flag} must be between 0 and 2**64 - 1, got {seed!r}")


def check_cells(cells: int, allow: bool = False) -> None:
    """Refuse a benchmark matrix of more than :data:`MAX_CELLS` cells unless asked for."""
    if cells > MAX_CELLS and not allow:
        raise UserError(f"the benchmark matrix has {cells:,} cells (more than {MAX_CELLS:,}): narrow the config's "
                        f"lists, or pass {LIFT_FLAG} to run them all")
