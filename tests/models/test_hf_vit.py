"""transformers ViTs: r=0 identity in eager and sdpa, reference parity with sources, ONNX parity, one semantics with
timm on converted weights, and the architectures ToMe cannot merge."""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import transformers

from tome_export.errors import UserError
from tome_export.export import export_onnx, tome_nodes
from tome_export.models import model_info, patch, preprocessing
from tome_export.schedule import resolve_schedule

from tome_testing.hf_models import HF_MODELS, make_config, make_hf, num_protected, unpatched_output
from tome_testing.reference_tome import reference_forward, reference_forward_hf

NAMES = list(HF_MODELS)


@pytest.fixture(scope="module")
def hf():
    cache = {}

    def get(name, attn="sdpa"):
        if (name, attn) not in cache:
            cache[(name, attn)] = make_hf(name, attn)
        return cache[(name, attn)]

    return get


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", NAMES)
def test_r0_patched_equals_unpatched(name, attn, hf, photo_cache):
    model = hf(name, attn)
    assert model.config._attn_implementation == attn
    x = photo_cache(model, 2)
    with torch.no_grad():
        want = unpatched_output(model, x)
        got = patch(copy.deepcopy(model), 0)(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5


def test_model_info_reads_the_token_layout(hf):
    for name in NAMES:
        info = model_info(hf(name))
        assert info.num_protected == num_protected(name), name
        assert (info.num_blocks, info.num_patches, info.embed_dim, info.num_heads) == (3, 64, 64, 4), name
        assert info.patch_size == (8, 8) and info.distilled == name.endswith("WithTeacher")
    assert model_info(hf("ViTForImageClassification")).num_classes == 10
    assert model_info(hf("CLIPVisionModelWithProjection")).num_classes == 32
    assert model_info(hf("Dinov2Model")).num_classes == 64


# (r, merge impl) per class: both lowerings, an r that the cap limits in the last layers
REFERENCE_CASES = [(name, 12, "gather") for name in NAMES] + [(name, [20, 8, 4], "onehot") for name in NAMES[::2]]


@pytest.mark.parametrize("name,r,impl", REFERENCE_CASES)
def test_patched_matches_slow_reference_and_protects_special_tokens(name, r, impl, hf, photo_cache):
    model = hf(name)
    info = model_info(model)
    sched = resolve_schedule(r, info.num_blocks, info.num_tokens, info.num_protected)
    x = photo_cache(model, 2)
    want, groups = reference_forward_hf(model, x, list(sched.requested))
    patched = patch(copy.deepcopy(model), r, merge_impl=impl)
    with torch.no_grad():
        got, source = patched.forward_with_source(x)
        plain = unpatched_output(model, x)
    assert (got - want).abs().max().item() < 1e-4
    assert (got - plain).abs().max().item() > 1e-3  # merging changed the output: the test can see errors
    assert source.shape[1] == sched.tokens[-1]
    for i in range(len(x)):
        assert [torch.nonzero(row).flatten().tolist() for row in source[i]] == groups[i]
        for p in range(info.num_protected):  # class, distillation and register tokens stay alone
            assert groups[i][p] == [p]
        assert source[i, info.num_protected:, :info.num_protected].sum() == 0


def test_without_proportional_attention(hf, photo_cache):
    model = hf("Dinov2WithRegistersForImageClassification")
    x = photo_cache(model, 2)
    want, _ = reference_forward_hf(model, x, [12, 12, 12], prop_attn=False)
    with torch.no_grad():
        got = patch(copy.deepcopy(model), 12, prop_attn=False)(x)
    assert (got - want).abs().max().item() < 1e-4


def test_pooling_heads_weigh_tokens_by_size(hf, photo_cache):
    """The mean and attention-pool heads see a merged token as the patches it holds, not as one token."""
    for name in ("SiglipVisionModel", "Dinov2ForImageClassification", "SiglipForImageClassification"):
        model = patch(copy.deepcopy(hf(name)), 12)
        x = photo_cache(model, 1)
        with torch.no_grad():
            tokens, size, _ = model.tome_features(x)
            sized = model.tome_head(tokens, size)
            unsized = model.tome_head(tokens, None)
        assert size.max() > 1 and (sized - unsized).abs().max() > 1e-3, name


# the layer list of each exported class: ToMe nodes are named after the layer they belong to
LAYERS = {"ViTForImageClassification": "vit.layers", "DeiTForImageClassificationWithTeacher": "deit.layers",
          "Dinov2WithRegistersForImageClassification": "dinov2_with_registers.encoder.layer",
          "CLIPVisionModelWithProjection": "vision_model.encoder.layers", "SiglipVisionModel": "encoder.layers"}


@pytest.mark.parametrize("name", list(LAYERS))
def test_onnx_runtime_matches_pytorch(name, hf, photo_cache, tmp_path):
    model = patch(copy.deepcopy(hf(name)), 12)
    pre = preprocessing(model)
    path = export_onnx(model, tmp_path / "m.onnx", pre.input_size, batch=2)
    import onnx

    proto = onnx.load(str(path))
    nodes = tome_nodes(proto)
    assert nodes["match"] and nodes["merge"]
    assert {n.split("/")[1] for n in nodes["match"]} == {f"{LAYERS[name]}.{i}" for i in range(3)}
    x = photo_cache(model, 2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_vit_model_without_pooler_returns_the_final_class_token(photo_cache):
    model = transformers.ViTModel(make_config("ViTModel"), add_pooling_layer=False).eval()
    x = photo_cache(model, 2)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state[:, 0]
        assert (patch(copy.deepcopy(model), 0)(x) - want).abs().max() <= 1e-5
        got = patch(copy.deepcopy(model), 12)(x)
    assert (got - reference_forward_hf(model, x, [12, 12, 12])[0]).abs().max() < 1e-4


def test_patch_keeps_state_dict_and_reconfigures(hf, photo_cache):
    model = hf("DeiTForImageClassificationWithTeacher")
    keys = list(model.state_dict())
    patched = patch(copy.deepcopy(model), 8)
    assert list(patched.state_dict()) == keys
    x = photo_cache(model, 1)
    patch(patched, 0)
    with torch.no_grad():
        assert (patched(x) - unpatched_output(model, x)).abs().max() <= 1e-5


def test_patched_model_trains(hf, photo_cache):
    model = patch(copy.deepcopy(hf("Dinov2ForImageClassification")), 8, trainable=True).train()
    x = photo_cache(model, 2)
    model(x).logsumexp(-1).mean().backward()
    assert model.dinov2.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


# --- one semantics, two families: the same ViT in timm's and transformers' layouts ---------------------------


def timm_to_transformers(sd, depth):
    """A timm ViT state_dict in ViTForImageClassification's (transformers 5.x) names: qkv split into q/k/v."""
    out = {
        "vit.embeddings.cls_token": sd["cls_token"],
        "vit.embeddings.position_embeddings": sd["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"],
        "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"],
    }
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        for kind in ("weight", "bias"):
            for src, dst in names.items():
                out[f"vit.layers.{i}.{dst}.{kind}"] = sd[f"blocks.{i}.{src}.{kind}"]
            q, k, v = sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)
            for proj, value in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"vit.layers.{i}.attention.{proj}.{kind}"] = value
    return out


@pytest.mark.parametrize("r,impl", [(16, "gather"), ((16, -1.0), "onehot")])
def test_timm_and_transformers_layouts_give_the_same_tome_output(r, impl, photo_cache):
    from tome_testing.models import nontrivial

    depth = 4
    tm = nontrivial(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=depth, num_classes=10))
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=depth, num_attention_heads=3,
                                    intermediate_size=768, image_size=224, patch_size=16, num_labels=10,
                                    layer_norm_eps=1e-6)  # timm's eps; transformers' ViT default is 1e-12
    hm = transformers.ViTForImageClassification._from_config(config).eval()
    hm.load_state_dict(timm_to_transformers(tm.state_dict(), depth), strict=True)
    x = photo_cache(tm, 2)
    with torch.no_grad():
        plain = tm(x)
        assert (unpatched_output(hm, x) - plain).abs().max() < 1e-4
        from_timm, timm_source = patch(tm, r, merge_impl=impl).forward_with_source(x)
        from_hf, hf_source = patch(hm, r, merge_impl=impl).forward_with_source(x)
    assert (from_timm - plain).abs().max() > 1e-3
    assert (from_hf - from_timm).abs().max() < 1e-4
    assert torch.equal(hf_source, timm_source)
    want, _ = reference_forward(tm, x, list(resolve_schedule(r, depth, 197, 1).requested))
    assert (from_hf - want).abs().max() < 1e-4


# --- what ToMe cannot merge --------------------------------------------------------------------------------


def _beit():
    return transformers.BeitForImageClassification(transformers.BeitConfig(**{**make_config("ViTModel").to_dict(),
                                                                              "use_relative_position_bias": True}))


@pytest.mark.parametrize("build,why", [
    (_beit, "relative position bias"),
    (lambda: transformers.Dinov2Backbone(make_config("Dinov2Model")), "Backbone head needs every token"),
    (lambda: transformers.CLIPModel(make_config("CLIPForImageClassification")), "two-tower model"),
    (lambda: transformers.SiglipVisionModel(make_config("SiglipVisionModel", vision_use_head=False)),
     "attention-pooling head"),
    (lambda: transformers.ViTForMaskedImageModeling(make_config("ViTModel")), "needs every token of the grid"),
])
def test_unsupported_architectures_get_a_clear_error(build, why):
    with pytest.raises(UserError, match=why) as err:
        patch(build(), 8)
    assert "Supported:" in str(err.value)


def test_modified_layers_are_refused(hf):
    model = copy.deepcopy(hf("ViTModel"))
    model.layers[1] = torch.nn.Identity()
    with pytest.raises(UserError, match="layer 1 is a Identity"):
        patch(model, 8)
