import numpy as np
import pytest
import timm
from timm.data import create_transform, resolve_data_config

from tome_export.errors import UserError
from tome_export.flops import flops_summary
from tome_export.images import sample_photos
from tome_export.models import model_info, preprocessing
from tome_export.preprocess import Preprocessing, open_image
from tome_export.schedule import resolve_schedule


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "deit_small_patch16_224", "vit_base_patch16_clip_224"])
def test_matches_timm_eval_transform(name):
    model = timm.create_model(name, pretrained=False, num_classes=0)
    pre = preprocessing(model)
    transform = create_transform(**resolve_data_config(model=model))
    for img in sample_photos(3):
        want = transform(img).numpy()
        assert pre(img).shape == want.shape
        assert np.abs(pre(img) - want).max() < 1e-5
    assert Preprocessing.from_dict(pre.to_dict()) == pre


def test_not_an_image(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_text("hello")
    with pytest.raises(UserError, match="not an image"):
        open_image(bad)
    with pytest.raises(UserError, match="does not exist"):
        open_image(tmp_path / "missing.png")


def test_vit_b16_flops_ratio():
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    info = model_info(model)
    r16 = flops_summary(info, resolve_schedule(16, 12, 197, 1).r)
    assert r16["gmacs_r0"] == pytest.approx(17.56, abs=0.01)  # 17.45 in the blocks + patch embed + head
    assert r16["ratio"] == pytest.approx(2.0, abs=0.01)
    assert flops_summary(info, resolve_schedule(8, 12, 197, 1).r)["ratio"] == pytest.approx(1.34, abs=0.01)


def test_preprocessing_follows_a_model_built_at_another_size():
    # timm keeps the pretrained config's 224 when a model is created with img_size=384; builds with
    # --img-size 384 used it and failed inside the exporter ("Input height (224) doesn't match model (384)").
    from tome_export.models import create_model

    model, _ = create_model("vit_t16", weights="random", img_size=384, depth=1)
    pre = preprocessing(model)
    assert pre.input_size == (3, 384, 384) and pre(sample_photos(1)[0]).shape == (3, 384, 384)
    assert model_info(model).num_tokens == 24 * 24 + 1
    assert model(__import__("torch").from_numpy(pre.batch(sample_photos(1)))).shape == (1, 1000)
