"""The project's own small ViT: the architecture of the digits accuracy case (``tome-export tune`` trains it on
scikit-learn's digits, :mod:`tome_export.bench.digits`) and the tiny subject of the test suite's builds.

ViT-Tiny width (192, 3 heads), 4 blocks, patch 4 at 32 px: 64 patch tokens and a class token, 10 classes. It is a
plain timm ``VisionTransformer``, registered with timm as ``tome_digits_vit`` and named ``digits_vit`` by the timm
family, so every part of the toolchain (patch, export, every target) treats it like any other timm ViT; weights are
random (``--weights random``) or a trained checkpoint (``--checkpoint``).
"""

from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

ALIAS, MODEL_NAME = "digits_vit", "tome_digits_vit"
IMG_SIZE = 32
MEAN = STD = (0.5, 0.5, 0.5)


@register_model
def tome_digits_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny width, depth 4, patch 4 at 32 px, 10 classes (the digits case)."""
    args = dict(img_size=IMG_SIZE, patch_size=4, embed_dim=192, depth=4, num_heads=3, num_classes=10)
    # timm.create_model passes its own bookkeeping arguments; the model has no hub weights to use them for
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    model = VisionTransformer(**{**args, **kwargs})
    model.pretrained_cfg = {"input_size": (3, IMG_SIZE, IMG_SIZE), "mean": MEAN, "std": STD, "crop_pct": 1.0,
                            "crop_mode": "center", "interpolation": "bilinear", "num_classes": 10}
    return model
