"""Analytic multiply-accumulate counts of a (ToMe) ViT from its per-block token counts."""

from __future__ import annotations

from typing import Dict, Sequence

from .info import ModelInfo


def vit_macs(info: ModelInfo, r_schedule: Sequence[int]) -> int:
    """MACs of one image: patch embedding, blocks (attention, matching, MLP after the merge) and head.

    Norms, softmax and element-wise ops are left out (a few percent, the same with and without ToMe).
    """
    c, a, h = info.embed_dim, info.attn_dim, info.mlp_hidden
    p0, p1 = info.patch_size
    total = info.num_patches * c * info.in_chans * p0 * p1
    n = info.num_tokens
    head_dim = a // info.num_heads
    for r in r_schedule:
        total += n * c * 3 * a + 2 * n * n * a + n * a * c  # qkv, scores + weighted values, projection
        if r > 0:
            rest = n - info.num_protected
            total += (rest - rest // 2) * (rest // 2) * head_dim  # cosine scores between A and B
        n -= r
        total += 2 * n * c * h  # MLP runs on the merged tokens
    return total + c * max(info.num_classes, 0) * (2 if info.distilled else 1)


def flops_summary(info: ModelInfo, r_schedule: Sequence[int]) -> Dict[str, float]:
    macs = vit_macs(info, r_schedule)
    base = vit_macs(info, [0] * info.num_blocks)
    return {"gmacs": round(macs / 1e9, 4), "gmacs_r0": round(base / 1e9, 4), "ratio": round(base / macs, 4)}
