"""The exact checkpoints the ToMe paper and its README report ImageNet-1k top-1 on, with the published numbers.

``benchmarks/paper_imagenet.yaml`` runs these (a test keeps the two in step); ``tome-export --list-models`` prints
them. Numbers: facebookresearch/ToMe README (off-the-shelf timm AugReg at timm 0.4.12, SWAG through torch hub, MAE
ViT-L off the shelf, DeiT trained with ToMe), measured there on a V100.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

SOURCE = "facebookresearch/ToMe README.md (https://github.com/facebookresearch/ToMe)"


class PaperCheckpoint(NamedTuple):
    label: str
    model: str  # what to pass as --model (an alias pinning the exact weights, or a timm name)
    weights: str  # the exact upstream checkpoint
    r: int
    prop_attn: bool
    baseline_top1: float  # published, without ToMe
    tome_top1: float  # published, with ToMe at r
    checkpoint_url: Optional[str] = None  # weights not on the hub: download, then pass --checkpoint FILE
    note: str = ""


PAPER_CHECKPOINTS: Tuple[PaperCheckpoint, ...] = (
    PaperCheckpoint("AugReg ViT-S/16", "vit_s16", "timm vit_small_patch16_224.augreg_in21k_ft_in1k", 13, True,
                    81.41, 79.30),
    PaperCheckpoint("AugReg ViT-B/16", "vit_b16", "timm vit_base_patch16_224.augreg_in21k_ft_in1k", 13, True,
                    84.57, 82.60),
    PaperCheckpoint("AugReg ViT-L/16", "vit_l16", "timm vit_large_patch16_224.augreg_in21k_ft_in1k", 7, True,
                    85.82, 84.26),
    PaperCheckpoint("AugReg ViT-L/16 @ 384", "vit_l16_384", "timm vit_large_patch16_384.augreg_in21k_ft_in1k", 23,
                    True, 86.92, 86.14),
    PaperCheckpoint("SWAG ViT-B/16 @ 384", "tv_vit_b16", "torchvision vit_b_16.IMAGENET1K_SWAG_E2E_V1", 45, True,
                    85.30, 84.59),
    PaperCheckpoint("SWAG ViT-L/16 @ 512", "tv_vit_l16", "torchvision vit_l_16.IMAGENET1K_SWAG_E2E_V1", 40, True,
                    88.06, 87.80),
    PaperCheckpoint("SWAG ViT-H/14 @ 518", "tv_vit_h14", "torchvision vit_h_14.IMAGENET1K_SWAG_E2E_V1", 40, True,
                    88.55, 88.25),
    PaperCheckpoint("MAE ViT-L/16 (fine-tuned, off the shelf)", "vit_large_patch16_224.mae",
                    "facebookresearch/mae mae_finetuned_vit_large.pth", 8, False, 85.96, 84.22,
                    "https://dl.fbaipublicfiles.com/mae/finetune/mae_finetuned_vit_large.pth",
                    "average pool + fc_norm are read from the checkpoint; MAE's eval used ImageNet mean/std"),
    PaperCheckpoint("DeiT-S/16 (trained with ToMe r=13)", "deit_s", "facebookresearch/ToMe f367470145_deit_S_r13.pth",
                    13, True, 79.8, 79.36, "https://dl.fbaipublicfiles.com/tome/f367470145_deit_S_r13.pth",
                    "the baseline is deit_s's own weights (timm fb_in1k) at r=0"),
    PaperCheckpoint("DeiT-Ti/16 (trained with ToMe r=13)", "deit_t", "facebookresearch/ToMe f367470145_deit_T_r13.pth",
                    13, True, 71.8, 71.27, "https://dl.fbaipublicfiles.com/tome/f367470145_deit_T_r13.pth",
                    "the baseline is deit_t's own weights (timm fb_in1k) at r=0"),
)


def describe(entry: PaperCheckpoint) -> str:
    """One --list-models line: what to run and what the README reports."""
    flags = f"--model {entry.model} --r {entry.r}" + ("" if entry.prop_attn else " --no-prop-attn")
    if entry.checkpoint_url:
        flags += f" --checkpoint {entry.checkpoint_url.rsplit('/', 1)[1]} (from {entry.checkpoint_url})"
    return (f"{entry.label}: {flags}  [{entry.weights}]  top-1 {entry.baseline_top1:.2f} -> {entry.tome_top1:.2f}"
            + (f"  ({entry.note})" if entry.note else ""))
