"""The encoder tasks on every family: dense features at r=0 are the model's own patch features, at r>0 each patch gets
its final token's features (the independent reference's groups); tokens from a chosen layer match transformers'
``hidden_states`` and timm's intermediates at r=0 and the reference's tokens and sizes at r>0; embeddings are the
family's pooled output; tasks that do not apply are refused."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from tome_export.errors import UserError
from tome_export.images import sample_photos
from tome_export.models import families, model_info, patch, preprocessing, set_task
from tome_export.schedule import resolve_schedule
from tome_export.tasks import Task

from tome_testing.hf_models import make_hf
from tome_testing.models import nontrivial
from tome_testing.reference_tome import REFERENCE_TOKENS

R = 4
FAMILIES = {f.name: f for f in families() if f.example is not None}


def _example(family: str) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nontrivial(FAMILIES[family].example())


def _photos(model: torch.nn.Module, n: int = 2) -> torch.Tensor:
    return torch.from_numpy(preprocessing(model).batch(sample_photos(n)))


def _tasked(model: torch.nn.Module, r, task: str, **options) -> torch.nn.Module:
    patched = patch(copy.deepcopy(model), r)
    set_task(patched, task, **options)
    return patched


def _own_tokens(model: torch.nn.Module, x: torch.Tensor, layer: int = -1, norm: bool = True) -> torch.Tensor:
    """The unpatched model's own tokens after a layer (all tokens, prefix first), from each library's API."""
    with torch.no_grad():
        if isinstance(model, timm.models.VisionTransformer):
            blocks = len(model.blocks) + 1 + layer if layer < 0 else layer
            out = model.forward_intermediates(x, indices=[blocks - 1], norm=norm, output_fmt="NLC",
                                              intermediates_only=True, return_prefix_tokens=True)
            patches, prefix = out[0]
            return torch.cat([prefix, patches], dim=1)
        if hasattr(model, "encoder") and hasattr(model, "conv_proj"):  # torchvision: hook the chosen layer
            seen = []
            index = len(model.encoder.layers) + layer if layer < 0 else layer - 1
            handle = model.encoder.layers[index].register_forward_hook(lambda m, i, o: seen.append(o))
            model(x)
            handle.remove()
            return model.encoder.ln(seen[0]) if norm else seen[0]
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[layer]
        return model.vit.layernorm(hidden) if norm else hidden  # the family's example: ViTForImageClassification


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_at_r0_is_the_models_own_patch_features(family):
    model = _example(family)
    x = _photos(model)
    prefix = model_info(model).num_protected
    want = _own_tokens(model, x)[:, prefix:]
    with torch.no_grad():
        got = _tasked(model, 0, "dense")(x)
    assert got.shape == want.shape and want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("impl", ["gather", "onehot"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_gives_each_patch_its_final_tokens_features(family, impl):
    model = _example(family)
    info = model_info(model)
    schedule = list(resolve_schedule(R, info.num_blocks, info.num_tokens, info.num_protected).requested)
    x = _photos(model)
    patched = patch(copy.deepcopy(model), R, merge_impl=impl)
    set_task(patched, "dense")
    with torch.no_grad():
        got = patched(x)
    merged = 0
    for image, features in zip(x, got):
        tokens, _, groups = REFERENCE_TOKENS[family](model, image, schedule)
        owner = {p: t for t, group in enumerate(groups) for p in group}
        want = torch.stack([tokens[owner[p]] for p in range(info.num_protected, info.num_tokens)])
        assert (features - want).abs().max().item() < 1e-4
        merged += sum(len(g) > 1 for g in groups)
    assert merged > 0  # the schedule really merged


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokens_are_the_references_merged_tokens_with_sizes_and_owners(family):
    model = _example(family)
    info = model_info(model)
    schedule = list(resolve_schedule(R, info.num_blocks, info.num_tokens, info.num_protected).requested)
    x = _photos(model)
    with torch.no_grad():
        tokens, sizes, owners = _tasked(model, R, "tokens")(x)
    p = info.num_protected
    for i, image in enumerate(x):
        want, want_sizes, groups = REFERENCE_TOKENS[family](model, image, schedule)
        assert (tokens[i] - want[p:]).abs().max().item() < 1e-4
        assert sizes[i].tolist() == [int(s) for s in want_sizes[p:]] == [len(g) for g in groups[p:]]
        assert owners[i].tolist() == [next(t - p for t, g in enumerate(groups) if q in g) for q in range(p, info.num_tokens)]
    assert sizes.dtype == owners.dtype == torch.int64 and (sizes.sum(1) == info.num_patches).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokens_from_the_second_to_last_layer_without_norm(family):
    model = _example(family)
    x = _photos(model)
    prefix = model_info(model).num_protected
    want = _own_tokens(model, x, layer=-2, norm=False)
    with torch.no_grad():
        tokens, sizes, _ = _tasked(model, 0, "tokens", layer=-2, keep_prefix=True)(x)
    assert tokens.shape == want.shape and (tokens - want).abs().max().item() <= 1e-5
    assert sizes.tolist() == [[1] * want.shape[1]] * len(x) and prefix >= 0


@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipVisionModel"])
def test_transformers_vision_towers_give_llava_style_tokens(name):
    """hidden_states[-2] without the class token at r=0; at r>0 the reference's tokens, and fewer of them."""
    model = make_hf(name)
    x = _photos(model)
    info = model_info(model)
    with torch.no_grad():
        want = model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, info.num_protected:]
        tokens, _, _ = _tasked(model, 0, "tokens", layer=-2)(x)
        merged, sizes, _ = _tasked(model, 12, "tokens", layer=-2)(x)
    assert (tokens - want).abs().max().item() <= 1e-5 and tokens.shape[1] == info.num_patches == 64
    schedule = list(resolve_schedule(12, info.num_blocks, info.num_tokens, info.num_protected).requested)
    reference, ref_sizes, _ = REFERENCE_TOKENS["transformers-vit"](model, x[0], schedule, blocks=2, norm=False)
    assert merged.shape[1] == 64 - 24 and (merged[0] - reference[info.num_protected:]).abs().max().item() < 1e-4
    assert sizes[0].tolist() == [int(s) for s in ref_sizes[info.num_protected:]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_embed_is_the_pooled_output_before_the_classifier(family):
    model = _example(family)
    x = _photos(model)
    with torch.no_grad():
        embedding = _tasked(model, 0, "embed")(x)
        unit = _tasked(model, R, "embed", normalize=True)(x)
        if isinstance(model, timm.models.VisionTransformer):
            want = model.forward_head(model.forward_features(x), pre_logits=True)
        elif hasattr(model, "conv_proj"):
            want = model.encoder(torch.cat([model.class_token.expand(len(x), -1, -1),
                                            model._process_input(x)], dim=1))[:, 0]
        else:  # ViTForImageClassification: the class token its classifier reads
            want = _own_tokens(model, x)[:, 0]
    assert (embedding - want).abs().max().item() <= 1e-5
    assert torch.allclose(unit.norm(dim=-1), torch.ones(len(x)), atol=1e-6)


def test_clip_embed_is_the_projected_image_embedding():
    model = make_hf("CLIPVisionModelWithProjection")
    x = _photos(model)
    with torch.no_grad():
        want = F.normalize(model(pixel_values=x).image_embeds, dim=-1)
        got = _tasked(model, 0, "embed", normalize=True)(x)
    assert got.shape == (2, 32) and (got - want).abs().max().item() <= 1e-5


def test_dense_nchw_is_the_patch_grid():
    model = _example("timm-vit")
    x = _photos(model)
    with torch.no_grad():
        flat = _tasked(model, R, "dense")(x)
        grid = _tasked(model, R, "dense", nchw=True)(x)
    assert grid.shape == (2, flat.shape[2], 4, 4)
    assert torch.equal(grid[:, :, 1, 2], flat[:, 1 * 4 + 2])


def test_tasks_that_do_not_apply_are_refused():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, global_pool="",
                              num_classes=0)
    with pytest.raises(UserError, match="no pooling"):
        set_task(model, "embed")
    example = _example("timm-vit")
    with pytest.raises(UserError, match="outside this model's 2 blocks"):
        set_task(example, "tokens", layer=-3)
    with pytest.raises(UserError, match="applies to --task embed"):
        set_task(example, "dense", normalize=True)
    resolved = set_task(example, Task("tokens", layer=-2))
    assert (resolved.blocks_run, resolved.final_norm) == (1, False)
