"""Small transformers vision models built from configs (no hub), with weights that make mistakes visible.

Each supported class at ViT-Tiny-like width (64, 4 heads), 3 layers, 64 px with 8 px patches (64 patches), the
head and token layout of the real class. ``save_model_dir`` writes one the way ``save_pretrained`` users do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch
import transformers

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=64,
             patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=99,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)

# class -> (config class, config arguments beyond SMALL; "two_tower" ones nest SMALL as vision_config)
HF_MODELS: Dict[str, Tuple[str, dict]] = {
    "ViTModel": ("ViTConfig", {}),
    "ViTForImageClassification": ("ViTConfig", {"num_labels": 10}),
    "DeiTModel": ("DeiTConfig", {}),
    "DeiTForImageClassification": ("DeiTConfig", {"num_labels": 10}),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", {"num_labels": 10}),
    "Dinov2Model": ("Dinov2Config", {}),
    "Dinov2ForImageClassification": ("Dinov2Config", {"num_labels": 10}),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", {"num_register_tokens": 4}),
    "Dinov2WithRegistersForImageClassification": ("Dinov2WithRegistersConfig", {"num_register_tokens": 4,
                                                                                "num_labels": 10}),
    "CLIPVisionModel": ("CLIPVisionConfig", {}),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", {"projection_dim": 32}),
    "CLIPForImageClassification": ("CLIPConfig", {"two_tower": True, "num_labels": 10}),
    "SiglipVisionModel": ("SiglipVisionConfig", {}),
    "SiglipForImageClassification": ("SiglipConfig", {"two_tower": True, "num_labels": 10}),
}

PROTECTED = {"DeiT": 2, "Dinov2WithRegisters": 5, "Siglip": 0}


def num_protected(name: str) -> int:
    return next((n for prefix, n in PROTECTED.items() if name.startswith(prefix)), 1)


def make_config(name: str, **overrides):
    config_class, extra = HF_MODELS[name]
    extra = dict(extra)
    cls = getattr(transformers, config_class)
    if extra.pop("two_tower", False):
        return cls(vision_config={**SMALL, **overrides}, text_config=TEXT, **extra)
    return cls(**{**SMALL, **extra, **overrides})


def make_hf(name: str, attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random model of class ``name`` whose special tokens, LayerScale and classifier matter."""
    torch.manual_seed(seed)
    model = getattr(transformers, name)._from_config(make_config(name, **overrides), attn_implementation=attn)
    return nontrivial_hf(model, seed)


def nontrivial_hf(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """DeiT starts its tokens and position embeddings at zero, DINOv2 its LayerScale at one: make them count."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("cls_token", "distillation_token", "register_tokens", "class_embedding", "probe"):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
            elif leaf == "position_embeddings" or name.endswith("position_embedding.weight"):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
            elif leaf == "lambda1":
                param.copy_(0.5 + 0.1 * torch.randn(param.shape, generator=gen))
            elif "classifier" in name and leaf == "weight":
                param.mul_(20)  # logits of order 1, so tolerances mean something
    return model.eval()


def unpatched_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a patched model returns, read from transformers' own forward."""
    out = model(pixel_values=x)
    for key in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out.last_hidden_state[:, 0]


def save_model_dir(model: torch.nn.Module, directory: Path, processor: str = "ViTImageProcessor",
                   **processor_args) -> Path:
    """``save_pretrained`` of the model and of an image processor, as a user's fine-tuned model directory."""
    model.save_pretrained(str(directory))
    getattr(transformers, processor)(**processor_args).save_pretrained(str(directory))
    return directory
