"""transformers models by name: save_pretrained directories and hf:<repo id> (through the hub cache), preprocessing
from the image processor config, bad directories, and CLI builds of each family member."""

import copy
import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers

from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.images import sample_photos
from tome_export.manifest import read_manifest
from tome_export.models import create_model, model_info, patch, preprocessing, resolve
from tome_export.models.hf_hub import processor_data_config
from tome_export.preprocess import Preprocessing
from tome_export.schedule import resolve_schedule


def data_config(model):
    """The model's preprocessing as a timm-style data config."""
    return dataclasses.asdict(preprocessing(model))

from tome_testing.hf_models import SMALL, TEXT, make_hf, save_model_dir, unpatched_output
from tome_testing.reference_tome import reference_forward_hf


def _one_line_exit_2(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.startswith("tome-export: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    model = make_hf("ViTForImageClassification")
    path = save_model_dir(model, tmp_path_factory.mktemp("hf") / "vit", "DeiTImageProcessor",
                          size={"height": 72, "width": 72}, crop_size={"height": 64, "width": 64},
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return path, model


def test_directory_loads_its_weights_and_preprocessing(vit_dir):
    path, saved = vit_dir
    model, spec = create_model(str(path))
    assert spec.source == "transformers" and spec.name == str(path.resolve()) and spec.weights == "pretrained"
    assert dict(spec.details) == {"architecture": "ViTForImageClassification",
                                  "preprocessing_from": str(path / "preprocessor_config.json")}
    for (k, a), b in zip(saved.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 64, 64) and cfg["crop_mode"] == "squash" and cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == pytest.approx(64 / 72) and cfg["mean"] == (0.485, 0.456, 0.406)
    assert model_info(model).num_tokens == 65


def test_random_weights_need_only_the_config(vit_dir, tmp_path):
    path, saved = vit_dir
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(path / "config.json", config_only)
    a, spec = create_model(str(config_only), weights="random", seed=3)
    b, _ = create_model(str(config_only), weights="random", seed=3)
    assert spec.weights == "random" and spec.seed == 3
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert data_config(a)["input_size"] == (3, 64, 64)  # no processor config: the model type's defaults at its size
    with pytest.raises(UserError, match="has no weights .* --weights random"):
        create_model(str(config_only))


def test_config_overrides_and_img_size(vit_dir, photo_cache):
    path, saved = vit_dir
    model, _ = create_model(str(path), weights="random", num_hidden_layers=2, img_size=96)
    info = model_info(model)
    assert info.num_blocks == 2 and info.num_patches == 144 and data_config(model)["input_size"] == (3, 96, 96)
    x = photo_cache(model, 1)
    with torch.no_grad():  # the position embeddings are interpolated, as transformers does on request
        want = model(pixel_values=x, interpolate_pos_encoding=True).logits
        assert (patch(copy.deepcopy(model), 0)(x) - want).abs().max() <= 1e-5
    with pytest.raises(UserError, match="has no attribute 'depth'"):
        create_model(str(path), weights="random", depth=2)


@pytest.mark.parametrize("processor,args", [
    ("ViTImageProcessor", {}),
    ("DeiTImageProcessor", {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}),
    ("CLIPImageProcessor", {}),
    ("BitImageProcessor", {"size": {"shortest_edge": 256}}),
    ("SiglipImageProcessor", {}),
    ("ViTImageProcessor", {"do_rescale": False, "image_mean": [127.5] * 3, "image_std": [127.5] * 3}),
])
def test_preprocessing_equals_the_image_processor(processor, args):
    """Our NumPy/PIL preprocessing gives the PIL image processor's pixels exactly, the torchvision one's closely."""
    photos = sample_photos(3)
    pil = getattr(transformers, processor + "Pil")(**args)
    pre = Preprocessing.from_config(processor_data_config(pil, processor))
    ours = pre.batch(photos)
    assert np.abs(ours - pil(images=photos, return_tensors="np")["pixel_values"]).max() <= 1e-5
    fast = getattr(transformers, processor)(**args)
    assert Preprocessing.from_config(processor_data_config(fast, processor)) == pre
    assert np.abs(ours - np.asarray(fast(images=photos, return_tensors="np")["pixel_values"])).mean() < 1e-3


def test_clip_and_siglip_checkpoints_load_their_vision_tower(tmp_path, photo_cache):
    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=SMALL, text_config=TEXT,
                                                          projection_dim=24)).eval()
    siglip = transformers.SiglipModel(transformers.SiglipConfig(vision_config=SMALL, text_config=TEXT)).eval()
    for full, processor in ((clip, "CLIPImageProcessor"), (siglip, "SiglipImageProcessor")):
        args = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}} if full is clip else \
            {"size": {"height": 64, "width": 64}}
        path = save_model_dir(full, tmp_path / type(full).__name__, processor, **args)
        model, spec = create_model(str(path))
        x = photo_cache(model, 2)
        with torch.no_grad():
            if full is clip:
                assert dict(spec.details)["architecture"] == "CLIPVisionModelWithProjection"
                want = full.visual_projection(full.vision_model(pixel_values=x).pooler_output)
            else:
                assert dict(spec.details)["architecture"] == "SiglipVisionModel"
                want = full.vision_model(pixel_values=x).pooler_output
            assert (patch(model, 0)(x) - want).abs().max() <= 1e-5


def test_dinov2_at_its_processor_size_interpolates_position_embeddings(tmp_path, photo_cache):
    """DINOv2 checkpoints say 518 px but their processor crops 224: the model runs (and merges) at 224."""
    model = make_hf("Dinov2WithRegistersForImageClassification", hidden_size=96, num_attention_heads=6,
                    intermediate_size=384, patch_size=14, image_size=518, num_hidden_layers=2)
    path = save_model_dir(model, tmp_path / "dinov2", "BitImageProcessor", size={"shortest_edge": 256},
                          crop_size={"height": 224, "width": 224}, image_mean=[0.485, 0.456, 0.406],
                          image_std=[0.229, 0.224, 0.225])
    loaded, _ = create_model(str(path))
    info = model_info(loaded)
    assert data_config(loaded)["input_size"] == (3, 224, 224) and info.num_patches == 256 and info.num_protected == 5
    x = photo_cache(loaded, 2)
    with torch.no_grad():
        assert (patch(copy.deepcopy(loaded), 0)(x) - unpatched_output(loaded, x)).abs().max() <= 1e-5
        got = patch(copy.deepcopy(loaded), 40)(x)
    want, _ = reference_forward_hf(loaded, x, list(resolve_schedule(40, 2, info.num_tokens, 5).requested))
    assert (got - want).abs().max() < 1e-4


# --- hf:<repo id> through the hub cache -----------------------------------------------------------------------


def _fake_hub_cache(root, repo, files):
    """The hub cache layout huggingface_hub reads offline: refs/main names the snapshot of a commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files:
        shutil.copy(f, snapshot)
    return commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_repo_loads_from_the_cache_offline(vit_dir, offline_hub):
    path, saved = vit_dir
    commit = _fake_hub_cache(offline_hub, "tome-test/tiny-vit", sorted(path.iterdir()))
    assert resolve("hf:tome-test/tiny-vit").name == "tome-test/tiny-vit"
    model, spec = create_model("hf:tome-test/tiny-vit")
    assert spec.name == "tome-test/tiny-vit" and dict(spec.details)["revision"] == commit
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))


def test_hub_repo_offline_and_not_cached_fails_loudly(offline_hub, capsys):
    with pytest.raises(UserError, match="Offline and not cached.*--weights random"):
        create_model("hf:google/vit-base-patch16-224")
    with pytest.raises(UserError, match="cannot load the config of hf:google/vit-base-patch16-224"):
        create_model("hf:google/vit-base-patch16-224", weights="random")
    err = _one_line_exit_2(["--model", "hf:google/vit-base-patch16-224", "-q"], capsys)
    assert "Offline and not cached" in err


def test_cached_config_without_weights_is_not_a_silent_random_model(vit_dir, offline_hub):
    path, _ = vit_dir
    _fake_hub_cache(offline_hub, "tome-test/config-only", [path / "config.json"])
    with pytest.raises(UserError, match="cannot load pretrained weights of hf:tome-test/config-only"):
        create_model("hf:tome-test/config-only")
    model, spec = create_model("hf:tome-test/config-only", weights="random")
    assert spec.weights == "random"


# --- bad directories ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory, vit_dir):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "junk").mkdir()
    (root / "junk" / "config.json").write_text("{not json")
    (root / "bert").mkdir()
    (root / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (root / "beit").mkdir()
    (root / "beit" / "config.json").write_text(json.dumps({"model_type": "beit",
                                                           "architectures": ["BeitForImageClassification"]}))
    (root / "no_weights").mkdir()
    shutil.copy(vit_dir[0] / "config.json", root / "no_weights")
    (root / "bad_processor").mkdir()
    for f in vit_dir[0].iterdir():
        shutil.copy(f, root / "bad_processor")
    (root / "bad_processor" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 64}, "do_center_crop": False}))
    return root


BAD_DIRS = {
    "missing directory": (["--model", "ROOT/nowhere"], "model directory .* does not exist"),
    "no config": (["--model", "ROOT/empty"], "has no config.json"),
    "config not JSON": (["--model", "ROOT/junk"], "is not valid JSON"),
    "not a vision model": (["--model", "ROOT/bert"], "holds a BertModel: ToMe cannot merge it"),
    "relative position bias": (["--model", "ROOT/beit"], "relative position bias"),
    "missing weights": (["--model", "ROOT/no_weights"], "has no weights"),
    "input shape depends on the image": (["--model", "ROOT/bad_processor"], "without a centre crop"),
    "checkpoint with a directory": (["--model", "VIT", "--checkpoint", "VIT/model.safetensors"],
                                    "pass the save_pretrained directory as --model"),
    "not a repo id": (["--model", "hf:bad repo id"], "is not a Hugging Face repo id"),
}


@pytest.mark.parametrize("case", list(BAD_DIRS))
def test_bad_directories_get_one_line_and_exit_2(case, bad_dirs, vit_dir, tmp_path, capsys):
    args, message = BAD_DIRS[case]
    args = [a.replace("ROOT", str(bad_dirs)).replace("VIT", str(vit_dir[0])) for a in args]
    err = _one_line_exit_2(args + ["-o", str(tmp_path / "out"), "-q"], capsys)
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


# --- CLI builds ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_builds_a_directory_to_onnx(vit_dir, tmp_path, capsys):
    path, _ = vit_dir
    out = tmp_path / "out"
    assert main(["--model", str(path), "--r", "8", "--trace-source", "-o", str(out), "-q"]) == 0
    m = read_manifest(out)
    assert m["model"] == {"alias": str(path), "source": "transformers", "name": str(path.resolve()),
                          "family": "transformers-vit", "weights": "pretrained", "seed": None, "checkpoint": None,
                          "architecture": "ViTForImageClassification",
                          "preprocessing_from": str(path.resolve() / "preprocessor_config.json")}
    assert m["r_schedule"] == [8, 8, 8] and m["tokens_per_block"] == [57, 49, 41] and m["num_classes"] == 10
    assert m["preprocessing"]["input_size"] == [3, 64, 64] and m["preprocessing"]["crop_mode"] == "squash"
    assert m["validation"]["passed"] and m["validation"]["max_abs_diff"] <= 1e-4
    assert m["versions"]["transformers"] == transformers.__version__


# The acceptance builds: each family member from a saved directory, ToMe r=8, OpenVINO int8, validated.
OPENVINO_INT8 = {
    "ViTForImageClassification": ("ViTImageProcessor", {"size": {"height": 64, "width": 64}}),
    "DeiTForImageClassificationWithTeacher": ("DeiTImageProcessor", {"size": {"height": 72, "width": 72},
                                                                     "crop_size": {"height": 64, "width": 64}}),
    "Dinov2WithRegistersModel": ("BitImageProcessor", {"size": {"shortest_edge": 72},
                                                       "crop_size": {"height": 64, "width": 64}}),
    "CLIPVisionModelWithProjection": ("CLIPImageProcessor", {"size": {"shortest_edge": 64},
                                                             "crop_size": {"height": 64, "width": 64}}),
    "SiglipVisionModel": ("SiglipImageProcessor", {"size": {"height": 64, "width": 64}}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPENVINO_INT8))
def test_openvino_int8_build_from_a_directory(name, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    processor, args = OPENVINO_INT8[name]
    path = save_model_dir(make_hf(name), tmp_path / name, processor, **args)
    out = tmp_path / "out"
    assert main(["--model", str(path), "--r", "8", "--target", "openvino", "--precision", "int8", "-o", str(out),
                 "-q"]) == 0
    m = read_manifest(out)
    assert m["model"]["architecture"] == name and m["r_schedule"] == [8, 8, 8]
    assert m["validation"]["passed"] and m["precision_step"]["tome_inputs_quantized"] == 0
