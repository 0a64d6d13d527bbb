"""The embedded accuracy case trains for real and beats chance; the trained model exports like any ViT."""

import numpy as np

from tome_export.bench.digits import accuracy, load_digits_split, train_digits_vit
from tome_export.models import create_model, patch


def test_digits_split_is_real_and_seeded():
    a, b = load_digits_split(0), load_digits_split(0)
    assert a.train_x.shape[1:] == (3, 32, 32) and len(a.train_y) + len(a.test_y) == 1797
    assert np.array_equal(a.test_y, b.test_y) and set(a.test_y.tolist()) == set(range(10))
    assert -1.0 <= a.train_x.min() and a.train_x.max() <= 1.0


def test_small_digits_vit_trains_above_chance_and_tome_keeps_it(small_digits):
    path, metrics, kwargs = small_digits.path, small_digits.metrics, small_digits.model_kwargs
    assert metrics["test_accuracy"] > 0.5  # chance is 0.1
    again, metrics2 = train_digits_vit(cache=path.parent, **small_digits.training, **kwargs)  # cached: same file and number
    assert again == path and metrics2 == metrics
    model, spec = create_model("digits_vit", checkpoint=path, **kwargs)
    assert spec.name == spec.manifest_entry("timm-vit")["timm_name"] == "tome_digits_vit"
    split = load_digits_split(0)
    import torch

    run = lambda x: model(torch.from_numpy(x)).detach().numpy()
    assert accuracy(run, split) == metrics["test_accuracy"]
    patch(model, 8)  # 65 tokens -> 57 -> 49: accuracy stays well above chance
    assert accuracy(run, split) > 0.4
