"""A slow, obviously-correct ToMe for timm, torchvision and transformers ViTs, written for the tests only.

One image at a time, explicit softmax attention, Python sorting with the documented tie-break, and merges
done token by token. It shares no code with tome_export.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F


def _attention(attn, x: torch.Tensor, sizes: List[float], prop_attn: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    n, c = x.shape
    qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (heads, n, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * attn.head_dim ** -0.5
    if prop_attn:
        logits = logits + torch.log(torch.tensor(sizes))[None, None, :]
    out = torch.softmax(logits, dim=-1) @ v  # (heads, n, d)
    out = out.transpose(0, 1).reshape(n, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj(out), k.mean(dim=0)


def reference_merge(x: torch.Tensor, sizes: List[float], metric: torch.Tensor, r: int, protected: int):
    """Merge r tokens of x (n, c). Returns new x, new sizes, and for each new token the old positions it holds."""
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    groups = [[i] for i in range(n)]
    if r <= 0:
        return x, sizes, groups
    metric = F.normalize(metric, dim=-1)
    a_pos = [i for i in range(protected, n) if i % 2 == 0]
    b_pos = [i for i in range(protected, n) if i % 2 == 1]
    best = {}
    table = (metric[a_pos] @ metric[b_pos].T).tolist()  # table[i][j] = cosine of A token i and B token j
    for a, scores in zip(a_pos, table):
        top = max(scores)
        best[a] = (top, b_pos[scores.index(top)])  # first maximum: lowest B index
    ranked = sorted(a_pos, key=lambda a: (-best[a][0], a))  # equal scores: lower A index first
    merging, kept = ranked[:r], sorted(ranked[r:])
    into = {b: [b] for b in b_pos}
    for a in merging:
        into[best[a][1]].append(a)
    rows, new_sizes, new_groups = [], [], []
    for i in list(range(protected)) + kept:
        rows.append(x[i])
        new_sizes.append(sizes[i])
        new_groups.append([i])
    for b in b_pos:
        total = sum(sizes[i] for i in into[b])
        rows.append(sum(x[i] * sizes[i] for i in into[b]) / total)
        new_sizes.append(total)
        new_groups.append(sorted(into[b]))
    return torch.stack(rows), new_sizes, new_groups


@torch.no_grad()
def reference_tokens(model, img: torch.Tensor, r_schedule: List[int], prop_attn: bool = True, blocks=None,
                     norm: bool = True):
    """One image ``(C, H, W)`` through the first ``blocks`` blocks (None: all) of an unpatched timm VisionTransformer
    with ToMe, then its final norm (``norm``): the tokens, their sizes and each token's source positions."""
    protected = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
    sizes = [1.0] * x.shape[0]
    groups = [[i] for i in range(x.shape[0])]
    for block, r in list(zip(model.blocks, r_schedule))[:blocks]:
        out, metric = _attention(block.attn, block.norm1(x), sizes, prop_attn)
        x = x + block.ls1(out)
        x, sizes, merged = reference_merge(x, sizes, metric, r, protected)
        groups = [sorted(p for g in grp for p in groups[g]) for grp in merged]
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return (model.norm(x) if norm else x), sizes, groups


@torch.no_grad()
def reference_forward(model, images: torch.Tensor, r_schedule: List[int], prop_attn: bool = True):
    """Logits of an unpatched timm VisionTransformer with ToMe, plus each final token's source positions."""
    logits, sources = [], []
    protected = model.num_prefix_tokens
    for img in images:
        x, sizes, groups = reference_tokens(model, img, r_schedule, prop_attn)
        if hasattr(model, "head_dist") and getattr(model, "dist_token", None) is not None:
            out = (model.head(x[0]) + model.head_dist(x[1])) / 2
        elif model.global_pool == "token":
            out = model.head(model.fc_norm(x[0]))
        elif model.global_pool == "avg":
            s = torch.tensor(sizes)[:, None]
            start = 0 if model.pool_include_prefix else protected
            pooled = (x[start:] * s[start:]).sum(0) / s[start:].sum()
            out = model.head(model.fc_norm(pooled))
        elif model.global_pool == "map":
            start = 0 if model.pool_include_prefix else protected
            out = model.head(model.fc_norm(_attention_pool(model.attn_pool, x[start:], sizes[start:])))
        else:
            raise NotImplementedError(model.global_pool)
        logits.append(out)
        sources.append(groups)
    return torch.stack(logits), sources


def _attention_pool(pool, x: torch.Tensor, sizes: List[float]) -> torch.Tensor:
    """timm's AttentionPoolLatent on one image; a token of size s weighs as s copies of itself."""
    n, c = x.shape
    heads, d, latents = pool.num_heads, pool.head_dim, pool.latent_len
    q = pool.q(pool.latent[0]).reshape(latents, heads, d).transpose(0, 1)  # (heads, latents, d)
    kv = pool.kv(x).reshape(n, 2, heads, d)
    k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # (heads, n, d)
    q, k = pool.q_norm(q), pool.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * d ** -0.5 + torch.log(torch.tensor(sizes))[None, None, :]
    out = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(latents, c)
    out = pool.proj(out)
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    return out[0] if pool.pool == "token" else out.mean(dim=0)


def _mha_attention(mha, x: torch.Tensor, sizes: List[float], prop_attn: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.nn.MultiheadAttention self-attention from its packed in_proj weights; returns (output, key metric)."""
    n, c = x.shape
    heads = mha.num_heads
    d = c // heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q, k, v = ((x @ w.T + b).reshape(n, heads, d).transpose(0, 1) for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
    logits = (q @ k.transpose(-1, -2)) * d ** -0.5
    if prop_attn:
        logits = logits + torch.log(torch.tensor(sizes))[None, None, :]
    out = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(n, c)
    return mha.out_proj(out), k.mean(dim=0)


@torch.no_grad()
def reference_tokens_torchvision(model, img: torch.Tensor, r_schedule: List[int], prop_attn: bool = True,
                                 blocks=None, norm: bool = True):
    """:func:`reference_tokens` for an unpatched torchvision VisionTransformer."""
    patches = model.conv_proj(img[None])[0].flatten(1).T  # (patches, hidden), row-major over the grid
    x = torch.cat([model.class_token[0], patches]) + model.encoder.pos_embedding[0]
    sizes = [1.0] * x.shape[0]
    groups = [[i] for i in range(x.shape[0])]
    for block, r in list(zip(model.encoder.layers, r_schedule))[:blocks]:
        out, metric = _mha_attention(block.self_attention, block.ln_1(x), sizes, prop_attn)
        x = x + out
        x, sizes, merged = reference_merge(x, sizes, metric, r, 1)  # the class token is protected
        groups = [sorted(p for g in grp for p in groups[g]) for grp in merged]
        x = x + block.mlp(block.ln_2(x))
    return (model.encoder.ln(x) if norm else x), sizes, groups


@torch.no_grad()
def reference_forward_torchvision(model, images: torch.Tensor, r_schedule: List[int], prop_attn: bool = True):
    """Logits of an unpatched torchvision VisionTransformer with ToMe, plus each final token's source positions."""
    logits, sources = [], []
    for img in images:
        x, _, groups = reference_tokens_torchvision(model, img, r_schedule, prop_attn)
        logits.append(model.heads(x[0]))
        sources.append(groups)
    return torch.stack(logits), sources


# --- transformers layouts --------------------------------------------------------------------------------------
# The same slow ToMe for Hugging Face transformers vision models, walking their modules by name. The embeddings are
# transformers' own modules; everything after them (attention, merges, heads) is written out here.


def _hf_backbone(model):
    for name in ("vit", "deit", "dinov2_with_registers", "dinov2", "vision_model"):
        if hasattr(model, name):
            return getattr(model, name)
    return model


def _hf_parts(layer):
    """(norm1, attention, norm2, LayerScale 1, LayerScale 2) of a ViT/DeiT, DINOv2 or CLIP/SigLIP layer."""
    if hasattr(layer, "layernorm_before"):
        return layer.layernorm_before, layer.attention, layer.layernorm_after, None, None
    if hasattr(layer, "layer_scale1"):
        return layer.norm1, layer.attention, layer.norm2, layer.layer_scale1, layer.layer_scale2
    return layer.layer_norm1, layer.self_attn, layer.layer_norm2, None, None


def _hf_attention(attn, x: torch.Tensor, sizes: List[float], prop_attn: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    n, c = x.shape
    heads = attn.q_proj.out_features // attn.head_dim
    q, k, v = ((x @ p.weight.T + p.bias).reshape(n, heads, attn.head_dim).transpose(0, 1)
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = (q @ k.transpose(-1, -2)) * attn.head_dim ** -0.5
    if prop_attn:
        logits = logits + torch.log(torch.tensor(sizes))[None, None, :]
    out = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(n, heads * attn.head_dim)
    proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    return proj(out), k.mean(dim=0)


def _hf_protected(model, backbone) -> int:
    name = type(model).__name__
    if name.startswith("Siglip"):
        return 0
    if name.startswith("DeiT"):
        return 2
    return 1 + getattr(backbone.config, "num_register_tokens", 0)


def _hf_tokens(backbone, img: torch.Tensor) -> torch.Tensor:
    size = backbone.config.image_size
    other = tuple(img.shape[-2:]) != (size, size)
    if hasattr(backbone.embeddings, "register_tokens") or type(backbone).__name__.startswith("Dinov2"):
        x = backbone.embeddings(img[None])
    else:
        x = backbone.embeddings(img[None], interpolate_pos_encoding=other)
    if hasattr(backbone, "pre_layrnorm"):
        x = backbone.pre_layrnorm(x)
    return x[0]


def _hf_head(model, backbone, x: torch.Tensor, sizes: List[float], protected: int) -> torch.Tensor:
    name = type(model).__name__
    s = torch.tensor(sizes)[:, None]

    def mean(start: int) -> torch.Tensor:
        return (x[start:] * s[start:]).sum(0) / s[start:].sum()

    if name in ("ViTForImageClassification", "DeiTForImageClassification"):
        return model.classifier(x[0])
    if name == "DeiTForImageClassificationWithTeacher":
        return (model.cls_classifier(x[0]) + model.distillation_classifier(x[1])) / 2
    if name in ("ViTModel", "DeiTModel"):
        return backbone.pooler(x[None])[0] if backbone.pooler is not None else x[0]
    if name in ("Dinov2Model", "Dinov2WithRegistersModel"):
        return x[0]
    if name in ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"):
        return model.classifier(torch.cat([x[0], mean(protected)]))
    if name == "CLIPVisionModel":
        return backbone.post_layernorm(x[0])
    if name == "CLIPVisionModelWithProjection":
        return model.visual_projection(backbone.post_layernorm(x[0]))
    if name in ("CLIPForImageClassification", "SiglipForImageClassification"):
        return model.classifier(mean(protected))
    if name == "SiglipVisionModel":
        return _mha_pool(backbone.head, x, sizes)
    raise NotImplementedError(name)


def _mha_pool(head, x: torch.Tensor, sizes: List[float]) -> torch.Tensor:
    """SigLIP's attention-pooling head on one image; a token of size s weighs as s copies of itself."""
    mha = head.attention
    n, c = x.shape
    heads, d = mha.num_heads, c // mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q = (head.probe[0] @ w_q.T + b_q).reshape(-1, heads, d).transpose(0, 1)
    k = (x @ w_k.T + b_k).reshape(n, heads, d).transpose(0, 1)
    v = (x @ w_v.T + b_v).reshape(n, heads, d).transpose(0, 1)
    logits = (q @ k.transpose(-1, -2)) * d ** -0.5 + torch.log(torch.tensor(sizes))[None, None, :]
    out = mha.out_proj((torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(-1, c))
    out = out + head.mlp(head.layernorm(out))
    return out[0]


@torch.no_grad()
def reference_tokens_hf(model, img: torch.Tensor, r_schedule: List[int], prop_attn: bool = True, blocks=None,
                        norm: bool = True):
    """:func:`reference_tokens` for an unpatched transformers vision model (its last_hidden_state with ``norm``:
    CLIP has no per-token final norm)."""
    backbone = _hf_backbone(model)
    encoder = getattr(backbone, "encoder", backbone)
    layers = getattr(encoder, "layer", None) or getattr(encoder, "layers")
    protected = _hf_protected(model, backbone)
    x = _hf_tokens(backbone, img)
    sizes = [1.0] * x.shape[0]
    groups = [[i] for i in range(x.shape[0])]
    for layer, r in list(zip(layers, r_schedule))[:blocks]:
        norm1, attn, norm2, ls1, ls2 = _hf_parts(layer)
        out, metric = _hf_attention(attn, norm1(x), sizes, prop_attn)
        x = x + (ls1(out) if ls1 is not None else out)
        x, sizes, merged = reference_merge(x, sizes, metric, r, protected)
        groups = [sorted(p for g in grp for p in groups[g]) for grp in merged]
        out = layer.mlp(norm2(x))
        x = x + (ls2(out) if ls2 is not None else out)
    for final in ("layernorm", "post_layernorm"):
        if norm and hasattr(backbone, final) and not type(backbone).__name__.startswith("CLIP"):
            x = getattr(backbone, final)(x)
    return x, sizes, groups


@torch.no_grad()
def reference_forward_hf(model, images: torch.Tensor, r_schedule: List[int], prop_attn: bool = True):
    """Output of an unpatched transformers vision model with ToMe, plus each final token's source positions."""
    backbone = _hf_backbone(model)
    protected = _hf_protected(model, backbone)
    outputs, sources = [], []
    for img in images:
        x, sizes, groups = reference_tokens_hf(model, img, r_schedule, prop_attn)
        outputs.append(_hf_head(model, backbone, x, sizes, protected))
        sources.append(groups)
    return torch.stack(outputs), sources


# The reference of each model family, by the family's registered name (tests/test_conformance.py).
REFERENCES = {"timm-vit": reference_forward, "torchvision-vit": reference_forward_torchvision,
              "transformers-vit": reference_forward_hf}
# Its tokens, sizes and groups of one image (the encoder tasks: tests/models/test_tasks.py).
REFERENCE_TOKENS = {"timm-vit": reference_tokens, "torchvision-vit": reference_tokens_torchvision,
                    "transformers-vit": reference_tokens_hf}
