"""torchvision ViT (SWAG) patching: r=0 identity, parity with the slow reference, ONNX, registry, weights."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torchvision.models import get_model_weights

from tome_export.errors import UserError
from tome_export.export import export_onnx, tome_nodes
from tome_export.images import sample_photos
from tome_export.models import create_model, model_info, patch, preprocessing, resolve, torchvision_vit
from tome_export.preprocess import Preprocessing
from tome_export.schedule import resolve_schedule

from tome_testing.models import nontrivial
from tome_testing.reference_tome import reference_forward_torchvision

# Small stand-ins for vit_b_16 (224 px, ImageNet weights) and the SWAG models (384 px): same classes, fewer
# and narrower layers.
SMALL = {
    "tv224": dict(image_size=224, patch_size=16, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768),
    "swag384": dict(image_size=384, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=768),
}


def make_tv(kind: str, seed: int = 0, **kwargs) -> torchvision.models.VisionTransformer:
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(num_classes=10, **SMALL[kind], **kwargs)
    return nontrivial(model, seed)


@pytest.fixture(scope="module")
def photos():
    cache = {}

    def get(model, n):
        pre = preprocessing(model)
        key = (pre.input_size, n)
        if key not in cache:
            cache[key] = torch.from_numpy(pre.batch(sample_photos(n)))
        return cache[key]

    return get


@pytest.mark.parametrize("kind", list(SMALL))
def test_r0_patched_equals_unpatched(kind, photos):
    model = make_tv(kind)
    x = photos(model, 2)
    with torch.no_grad():
        want = model(x)
        got = patch(copy.deepcopy(model), 0)(x)
    assert want.abs().max() > 0.5  # the classifier is not torchvision's all-zero init
    assert (got - want).abs().max().item() <= 1e-5


CASES = [
    ("tv224", 16, "gather", True),
    ("tv224", [3, 40, 0, 25], "onehot", False),  # irregular, capped late, no proportional attention
    ("swag384", 64, "gather", True),
]


@pytest.mark.parametrize("kind,r,impl,prop_attn", CASES)
def test_patched_matches_slow_reference(kind, r, impl, prop_attn, photos):
    model = make_tv(kind)
    info = model_info(model)
    sched = resolve_schedule(r, info.num_blocks, info.num_tokens, info.num_protected)
    assert sum(sched.r) > 0
    x = photos(model, 2)
    want, groups = reference_forward_torchvision(model, x, list(sched.requested), prop_attn=prop_attn)
    patched = patch(copy.deepcopy(model), r, merge_impl=impl, prop_attn=prop_attn)
    with torch.no_grad():
        got, source = patched.forward_with_source(x)
        assert torch.equal(got, patched(x))
    assert (got - want).abs().max().item() < 1e-4
    assert (got - model(x)).abs().max().item() > 1e-3  # merging changed something
    assert source.shape[1] == sched.tokens[-1]
    for i in range(len(x)):
        assert [torch.nonzero(row).flatten().tolist() for row in source[i]] == groups[i]
        assert source[i, 0].tolist() == [1.0] + [0.0] * (source.shape[2] - 1)  # the class token stays alone


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export: the lowerings are family-independent and compared with each other in test_export."""
    r = (16, -1.0)
    model = patch(make_tv("tv224"), r, merge_impl="gather")
    path = export_onnx(model, tmp_path_factory.mktemp("tv_onnx") / "tv.onnx", (3, 224, 224), dynamic_batch=True)
    return path, model, r


def test_onnxruntime_matches_pytorch_and_reference(exported, photos):
    path, model, r = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    info = model_info(model)
    sched = resolve_schedule(r, info.num_blocks, info.num_tokens, info.num_protected)
    x = photos(model, 3)
    got = session.run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        eager = model(x).numpy()
    ref, _ = reference_forward_torchvision(make_tv("tv224"), x, list(sched.requested))
    assert np.abs(got - eager).max() <= 1e-4
    assert np.abs(got - ref.numpy()).max() <= 1e-4


def test_tome_nodes_are_named_by_encoder_block(exported):
    path, _, _ = exported
    roles = tome_nodes(onnx.load(str(path)))
    blocks = {f"encoder.layers.encoder_layer_{i}" for i in range(3)}  # (16, -1) ends with r=0
    assert {name.split("/")[1] for name in roles["match"]} == blocks
    assert {name.split("/")[1] for name in roles["merge"]} == blocks


def test_names_resolve_to_torchvision_weights():
    assert resolve("tv_vit_b16")[:3] == ("tv_vit_b16", "torchvision", "vit_b_16.IMAGENET1K_SWAG_E2E_V1")
    assert resolve("tv_vit_b16").family == "torchvision-vit"
    assert resolve("tv_vit_l16").name == "vit_l_16.IMAGENET1K_SWAG_E2E_V1"
    assert resolve("tv_vit_h14").name == "vit_h_14.IMAGENET1K_SWAG_E2E_V1"
    assert resolve("vit_b_16").name == "vit_b_16.IMAGENET1K_V1"  # torchvision's DEFAULT
    assert resolve("vit_l_16.IMAGENET1K_SWAG_LINEAR_V1").source == "torchvision"
    assert resolve("vit_b16").source == "timm"
    with pytest.raises(UserError, match="unknown torchvision weights 'SWAG' for vit_b_16: choose one of"):
        resolve("vit_b_16.SWAG")


@pytest.mark.parametrize("builder", torchvision_vit.BUILDERS)
def test_preprocessing_matches_the_weights_transforms(builder):
    photos = sample_photos(2)
    for weights in get_model_weights(builder):
        size = weights.meta["min_size"][0]
        pre = Preprocessing.from_config(torchvision_vit.transforms_config(weights, size))
        transform = weights.transforms()
        for img in photos:
            want = transform(img).numpy()
            assert pre(img).shape == want.shape == (3, size, size)
            assert np.abs(pre(img) - want).max() < 1e-5, weights


def test_random_swag_model_from_the_registry():
    model, spec = create_model("tv_vit_b16", weights="random", seed=1)
    assert spec.source == "torchvision" and spec.name == "vit_b_16.IMAGENET1K_SWAG_E2E_V1"
    assert "timm_name" not in spec.manifest_entry("torchvision-vit")
    info = model_info(model)
    assert (info.num_tokens, info.num_blocks, info.embed_dim, info.num_classes) == (577, 12, 768, 1000)
    pre = preprocessing(model)
    assert pre.input_size == (3, 384, 384) and pre.interpolation == "bicubic" and pre.crop_pct == 1.0
    assert model.heads.head.weight.abs().max() > 0  # not torchvision's all-zero classifier
    small, _ = create_model("tv_vit_b16", weights="random", img_size=224)
    assert model_info(small).num_tokens == 197 and preprocessing(small).input_size == (3, 224, 224)
    # a torchvision model built without the registry gets the preprocessing of the weights made for it
    bare = torchvision.models.vit_b_16(image_size=384)
    assert torchvision_vit.data_config(bare) == torchvision_vit.data_config(model)


def test_checkpoint_roundtrip_infers_image_size_and_classes(tmp_path, photos):
    torch.manual_seed(0)
    model = nontrivial(torchvision.models.vit_b_32(image_size=96, num_classes=7))
    sd = model.state_dict()
    legacy = {k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v for k, v in sd.items()}
    path = tmp_path / "vit_b_32.pth"
    torch.save({"model": legacy}, path)  # pre-0.13 key names, wrapped as training scripts save them
    loaded, spec = create_model("vit_b_32", checkpoint=path)
    assert spec.weights == "checkpoint" and loaded.image_size == 96 and loaded.num_classes == 7
    x = photos(loaded, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    other = tmp_path / "small.pth"
    torch.save(make_tv("tv224").state_dict(), other)
    with pytest.raises(UserError, match="does not match vit_b_32"):
        create_model("vit_b_32", checkpoint=other)


def test_pretrained_offline_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision_vit, "url_reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="cannot load pretrained weights for tv_vit_b16.*--checkpoint.*--weights random"):
        create_model("tv_vit_b16", weights="pretrained")


def test_unsupported_torchvision_variant_gets_a_specific_error():
    model = make_tv("tv224")
    model.encoder.layers[1] = torch.nn.Identity()
    with pytest.raises(UserError, match="encoder layer 1 is a Identity; only torchvision's EncoderBlock"):
        patch(model, 8)


@pytest.mark.slow
def test_cli_builds_a_torchvision_model_and_guards_its_output(tmp_path, capsys):
    """The smallest real torchvision architecture (vit_b_32 at 64 px: 4 patches) through the whole CLI build."""
    import json

    from tome_export.cli import main
    from tome_export.manifest import read_manifest

    out = tmp_path / "b32"
    args = ["--model", "vit_b_32", "--img-size", "64", "--r", "2", "--weights", "random", "--output", str(out), "-q"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "torchvision vit_b_32.IMAGENET1K_V1" in stdout
    m = read_manifest(out)
    assert m["model"] == {"alias": "vit_b_32", "source": "torchvision", "name": "vit_b_32.IMAGENET1K_V1",
                          "family": "torchvision-vit", "weights": "random", "seed": 0, "checkpoint": None}
    assert m["tokens_per_block"][:2] == [3, 2] and m["input"]["shape"] == [1, 3, 64, 64]
    assert m["preprocessing"]["interpolation"] == "bilinear" and m["preprocessing"]["crop_pct"] == 0.875
    assert m["validation"]["passed"] and m["validation"]["max_abs_diff"] <= 1e-4
    assert "torchvision" in m["versions"]
    # a timm model may not overwrite it; the old manifest format (timm_name only) is still recognised
    assert main(["--model", "vit_t16", "--weights", "random", "--output", str(out)]) == 2
    assert "already holds artifacts of vit_b_32" in capsys.readouterr().err
    from tome_export.manifest import InputSpec, Manifest

    def identity(model):
        return Manifest("onnx", "fp32", InputSpec("images", (1, 3, 224, 224)), {}, model=model).identity

    assert identity({"alias": "vit_t16", "timm_name": "vit_tiny_patch16_224"}) == \
        identity({"alias": "vit_t16", "source": "timm", "name": "vit_tiny_patch16_224"})
    assert json.loads((out / "manifest.json").read_text())["model"]["alias"] == "vit_b_32"
