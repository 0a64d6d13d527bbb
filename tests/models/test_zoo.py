"""The timm families the ToMe paper and users bring, by their timm names (reduced depth; real widths and sizes).

For each: r=0 patched == unpatched, parity with the slow reference, and (one config each) ONNX Runtime parity.
"""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from tome_export import patch
from tome_export.errors import UserError
from tome_export.export import export_onnx
from tome_export.models import model_info, preprocessing
from tome_export.schedule import resolve_schedule

from tome_testing.models import make_named
from tome_testing.reference_tome import reference_forward

# family -> (timm name, kwargs, r, prop_attn). Depth is reduced; widths, patch and image sizes, norms,
# activations, tokens and heads are those of the named model.
ZOO = {
    "augreg_s384": ("vit_small_patch16_384.augreg_in21k_ft_in1k", {"depth": 2}, 64, True),
    "augreg_b224": ("vit_base_patch16_224.augreg2_in21k_ft_in1k", {"depth": 2}, 16, True),
    "augreg_l384": ("vit_large_patch16_384.augreg_in21k_ft_in1k", {"depth": 2}, 100, True),
    "deit_s": ("deit_small_patch16_224", {"depth": 3}, 16, True),
    "deit_b_distilled_384": ("deit_base_distilled_patch16_384", {"depth": 2}, 64, True),
    "deit3_b384": ("deit3_base_patch16_384", {"depth": 2}, 64, True),  # LayerScale, no pos-embed on the class token
    "mae_b": ("vit_base_patch16_224.mae", {"depth": 3, "global_pool": "avg", "num_classes": 10}, 16, False),
    "clip_b16": ("vit_base_patch16_clip_224.openai", {"depth": 2}, 16, True),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", {"depth": 2}, 16, True),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {"depth": 2, "num_classes": 10}, 200, True),  # 518 px
    "siglip_map": ("vit_base_patch16_siglip_224", {"depth": 2, "num_classes": 10}, 16, True),
}
ONNX = ["augreg_s384", "deit3_b384", "mae_b", "clip_quickgelu", "dinov2_reg4", "siglip_map"]


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(family):
        if family not in cache:
            name, kwargs, _, _ = ZOO[family]
            cache[family] = make_named(name, **kwargs)
        return cache[family]

    return get


def test_the_zoo_has_the_named_architectures(zoo):
    """The stand-ins keep what makes each family special."""
    from timm.layers import LayerScale, QuickGELU
    from timm.layers.attention_pool import AttentionPoolLatent

    assert zoo("augreg_s384").patch_embed.grid_size == (24, 24)
    assert zoo("augreg_l384").embed_dim == 1024
    assert model_info(zoo("deit_b_distilled_384")).num_protected == 2
    assert isinstance(zoo("deit3_b384").blocks[0].ls1, LayerScale) and zoo("deit3_b384").no_embed_class
    mae = zoo("mae_b")
    assert mae.global_pool == "avg" and isinstance(mae.fc_norm, torch.nn.LayerNorm) and isinstance(mae.norm, torch.nn.Identity)
    assert isinstance(zoo("clip_b16").norm_pre, torch.nn.LayerNorm)
    assert isinstance(zoo("clip_quickgelu").blocks[0].mlp.act, QuickGELU)
    dino = zoo("dinov2_reg4")
    assert dino.patch_embed.patch_size == (14, 14) and dino.patch_embed.grid_size == (37, 37)
    assert model_info(dino).num_protected == 5 and isinstance(dino.blocks[0].ls1, LayerScale)
    assert isinstance(zoo("siglip_map").attn_pool, AttentionPoolLatent) and model_info(zoo("siglip_map")).num_protected == 0


@pytest.mark.parametrize("family", list(ZOO))
def test_r0_patched_equals_unpatched(family, zoo, photo_cache):
    model = zoo(family)
    x = photo_cache(model, 2)
    with torch.no_grad():
        want = model(x)
        got = patch(copy.deepcopy(model), 0)(x)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", list(ZOO))
def test_patched_matches_slow_reference(family, zoo, photo_cache):
    model = zoo(family)
    _, _, r, prop_attn = ZOO[family]
    info = model_info(model)
    sched = resolve_schedule(r, info.num_blocks, info.num_tokens, info.num_protected)
    x = photo_cache(model, 2)
    want, groups = reference_forward(model, x, list(sched.requested), prop_attn=prop_attn)
    impl = "onehot" if family in ("deit3_b384", "dinov2_reg4", "siglip_map") else "gather"
    patched = patch(copy.deepcopy(model), r, merge_impl=impl, prop_attn=prop_attn)
    with torch.no_grad():
        got, source = patched.forward_with_source(x)
        plain = model(x)
    assert (got - want).abs().max().item() < 1e-4
    assert (got - plain).abs().max().item() > 1e-3  # merging changed the output: the test can see errors
    for i in range(len(x)):
        assert [torch.nonzero(row).flatten().tolist() for row in source[i]] == groups[i]
        for p in range(info.num_protected):  # class, distillation and register tokens stay alone
            assert groups[i][p] == [p]


@pytest.fixture(scope="module")
def exported(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_onnx")
    cache = {}

    def get(family):
        if family not in cache:
            _, _, r, prop_attn = ZOO[family]
            model = patch(copy.deepcopy(zoo(family)), r, prop_attn=prop_attn)
            size = preprocessing(model).input_size
            cache[family] = (export_onnx(model, root / f"{family}.onnx", size, batch=2), model)
        return cache[family]

    return get


@pytest.mark.parametrize("family", ONNX)
def test_onnxruntime_matches_pytorch_and_reference(family, zoo, exported, photo_cache):
    path, model = exported(family)
    _, _, r, prop_attn = ZOO[family]
    info = model_info(model)
    sched = resolve_schedule(r, info.num_blocks, info.num_tokens, info.num_protected)
    x = photo_cache(model, 2)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        eager = model(x).numpy()
    ref, _ = reference_forward(zoo(family), x, list(sched.requested), prop_attn=prop_attn)
    assert np.abs(got - eager).max() <= 1e-4
    assert np.abs(got - ref.numpy()).max() <= 1e-4


def test_attention_pool_weighs_a_merged_token_as_its_copies(zoo, photo_cache):
    """SigLIP's MAP head: a token of size s pools like s identical tokens (what log(s) on its logits means)."""
    model = zoo("siglip_map")
    tokens = torch.randn(1, 6, model.embed_dim, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0, 1.0, 1.0]])[..., None]
    copies = torch.cat([tokens[:, i:i + 1].expand(1, int(s), -1) for i, s in enumerate(sizes[0, :, 0])], dim=1)
    patched = patch(copy.deepcopy(model), 0)
    with torch.no_grad():
        got = patched.tome_head(tokens, sizes)
        want = model.forward_head(copies)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("name,kwargs,why", [
    ("vit_base_patch16_xp_224", {"depth": 1}, "ParallelScalingBlock: attention and MLP run in parallel"),
    ("vit_small_patch16_18x2_224", {"depth": 1}, "ParallelThingsBlock: parallel attention branches"),
    ("vit_base_patch16_rpn_224", {"depth": 1}, "post-norm residual blocks"),
    ("vit_dwee_patch16_reg1_gap_256", {"depth": 1}, "DiffAttention: differential attention"),
    ("vit_tiny_patch16_224", {"depth": 1, "global_pool": "prr"}, "global_pool='prr' is not supported"),
    ("cait_xxs24_224", {"depth": 1}, "talking-heads attention"),
    ("xcit_nano_12_p16_224", {"depth": 1}, "cross-covariance attention"),
    ("vit_relpos_small_patch16_224", {"depth": 1}, "relative position bias"),
    ("pit_ti_224", {}, "pooling layers between stages"),
])
def test_variants_that_cannot_merge_get_a_specific_error(name, kwargs, why):
    model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(UserError, match=why):
        patch(model, 8)


def test_mae_finetuned_checkpoint_loads_with_average_pooling(tmp_path, photo_cache):
    """MAE fine-tuning saves fc_norm and no final norm: the registry builds the avg-pool model for it."""
    from tome_export.models import create_model

    mae = make_named("vit_tiny_patch16_224", depth=2, global_pool="avg", num_classes=10)
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": mae.state_dict()}, path)
    loaded, _ = create_model("vit_t16", checkpoint=path, depth=2)
    assert loaded.global_pool == "avg" and loaded.num_classes == 10
    x = photo_cache(mae, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), mae(x))
