"""The small digits ViT, trained once per test session and shared by every test that needs it."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from tome_export.bench.digits import train_digits_vit

# A quick variant of the embedded accuracy case: trains in seconds, well above chance (0.1).
SMALL_DIGITS = {"depth": 2, "embed_dim": 96, "num_heads": 3}
SMALL_TRAINING = {"epochs": 6, "lr": 1e-3, "seed": 0}


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory):
    """The trained checkpoint and its test accuracy. It lies where ``train_digits_vit`` looks by default when
    ``XDG_CACHE_HOME`` is ``xdg``, so the harness finds it there instead of training again."""
    xdg = tmp_path_factory.mktemp("xdg-cache")
    path, metrics = train_digits_vit(cache=xdg / "tome-export" / "digits", **SMALL_TRAINING, **SMALL_DIGITS)
    return SimpleNamespace(xdg=Path(xdg), path=path, metrics=metrics, model_kwargs=dict(SMALL_DIGITS),
                           training=dict(SMALL_TRAINING))
