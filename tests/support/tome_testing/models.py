"""Seeded small timm/torchvision models with weights large enough that mistakes show in the logits."""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch
from timm.layers import LayerScale

from tome_export import create_model, patch
from tome_export.models import digits_vit

# name -> (timm name, extra kwargs). Small models only: the suite must stay fast on 2 cores.
TEST_MODELS: Dict[str, Tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "layerscale": ("deit3_small_patch16_224", {"depth": 6}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    "avgpool": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "avgpool_cls": ("vit_tiny_patch16_224", {"global_pool": "avg", "fc_norm": True}),
    "qknorm": ("vit_tiny_patch16_224", {"qk_norm": True, "depth": 6}),
    "vit_d6": ("vit_tiny_patch16_224", {"depth": 6}),
    "digits": (digits_vit.MODEL_NAME, {}),  # the suite's tiny build subject: 4 blocks, patch 4 at 32 px, 10 classes
}


def make_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random model whose LayerScale and prefix tokens are large enough to matter.

    ``overrides``: timm kwargs on top of the kind's (depth, embed_dim, patch_size, img_size, ...).
    """
    name, kwargs = TEST_MODELS[kind]
    return make_named(name, seed, **{**kwargs, **overrides})


def make_named(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``make_model`` for any registry name (timm or torchvision) and constructor kwargs."""
    model, _ = create_model(name, weights="random", seed=seed, **kwargs)
    return nontrivial(model, seed)


def nontrivial(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make LayerScale, prefix tokens and the classifier large enough that errors in them show in the logits."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerScale):
                module.gamma.copy_(0.5 + 0.1 * torch.randn(module.gamma.shape, generator=gen))
        for token in ("cls_token", "reg_token", "dist_token", "class_token"):
            param = getattr(model, token, None)
            if param is not None:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
        head = model.heads.head if hasattr(model, "heads") else getattr(model, "head", getattr(model, "classifier", None))
        if isinstance(head, torch.nn.Linear):
            if head.weight.abs().max() == 0:  # torchvision initialises its classifier to zero
                head.weight.copy_(0.02 * torch.randn(head.weight.shape, generator=gen))
            head.weight.mul_(20)  # logits of order 1, so tolerances mean something
    return model.eval()


def patched_copy(model: torch.nn.Module, r, impl: str = "gather") -> torch.nn.Module:
    return patch(copy.deepcopy(model), r, merge_impl=impl)
