"""Session fixtures: real photos in a model's preprocessing, cached ONNX exports, one traced CLI build."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch

from tome_export import patch
from tome_export.export import export_onnx
from tome_export.images import sample_photos
from tome_export.models import preprocessing
from tome_export.preprocess import Preprocessing

from .models import make_model


@pytest.fixture(scope="session")
def photo_cache():
    cache: Dict[Tuple[int, Preprocessing], np.ndarray] = {}

    def get(model: torch.nn.Module, n: int) -> torch.Tensor:
        pre = preprocessing(model)
        key = (n, pre)  # size and normalisation
        if key not in cache:
            cache[key] = pre.batch(sample_photos(n))
        return torch.from_numpy(cache[key])

    return get


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """Export each (model kind, r, impl, batch mode) once per session."""
    root = tmp_path_factory.mktemp("onnx")
    cache: Dict[tuple, Tuple[Path, torch.nn.Module]] = {}

    def get(kind: str, r, impl: str, batch: int = 1, dynamic_batch: bool = False):
        key = (kind, repr(r), impl, batch, dynamic_batch)
        if key not in cache:
            model = patch(make_model(kind), r, merge_impl=impl)
            pre = preprocessing(model)
            path = root / f"{len(cache)}.onnx"
            export_onnx(model, path, pre.input_size, batch=batch, dynamic_batch=dynamic_batch)
            cache[key] = (path, model)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def traced_artifact(tmp_path_factory):
    """One CLI build with --trace-source: digits_vit (4 blocks, 32 px, 65 tokens), random weights (seed 0), r=16,
    which the last block caps at 8 (17 tokens left): tokens 49, 33, 17, 9.

    Returns (directory, stderr of the build).
    """
    import contextlib
    import io

    from tome_export.cli import main

    out = tmp_path_factory.mktemp("traced") / "digits_vit"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--model", "digits_vit", "--r", "16", "--weights", "random", "--trace-source", "-o", str(out), "-q"])
    assert code == 0, err.getvalue()
    return out, err.getvalue()
