"""Shared fixtures: seeded small models with non-trivial weights, real photos, cached exports."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from timm.layers import LayerScale

from tome_export import create_model, patch
from tome_export.export import export_onnx
from tome_export.images import sample_photos
from tome_export.models import preprocessing
from tome_export.preprocess import Preprocessing

# name -> (timm name, extra kwargs). Small models only: the suite must stay fast on 2 cores.
TEST_MODELS: Dict[str, Tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "layerscale": ("deit3_small_patch16_224", {"depth": 6}),
    "registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    "avgpool": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "avgpool_cls": ("vit_tiny_patch16_224", {"global_pool": "avg", "fc_norm": True}),
    "qknorm": ("vit_tiny_patch16_224", {"qk_norm": True, "depth": 6}),
    "vit_d6": ("vit_tiny_patch16_224", {"depth": 6}),
}


def make_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random model whose LayerScale and prefix tokens are large enough to matter.

    ``overrides``: timm kwargs on top of the kind's (depth, embed_dim, patch_size, img_size, ...).
    """
    name, kwargs = TEST_MODELS[kind]
    return make_named(name, seed, **{**kwargs, **overrides})


def make_named(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``make_model`` for any registry name (timm or torchvision) and constructor kwargs."""
    model, _ = create_model(name, weights="random", seed=seed, **kwargs)
    return nontrivial(model, seed)


def nontrivial(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make LayerScale, prefix tokens and the classifier large enough that errors in them show in the logits."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerScale):
                module.gamma.copy_(0.5 + 0.1 * torch.randn(module.gamma.shape, generator=gen))
        for token in ("cls_token", "reg_token", "dist_token", "class_token"):
            param = getattr(model, token, None)
            if param is not None:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
        head = model.heads.head if hasattr(model, "heads") else getattr(model, "head", getattr(model, "classifier", None))
        if isinstance(head, torch.nn.Linear):
            if head.weight.abs().max() == 0:  # torchvision initialises its classifier to zero
                head.weight.copy_(0.02 * torch.randn(head.weight.shape, generator=gen))
            head.weight.mul_(20)  # logits of order 1, so tolerances mean something
    return model.eval()


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


def patched_copy(model: torch.nn.Module, r, impl: str = "gather") -> torch.nn.Module:
    return patch(copy.deepcopy(model), r, merge_impl=impl)


@pytest.fixture(scope="session")
def traced_artifact(tmp_path_factory):
    """One CLI build with --trace-source: vit_t16, random weights (seed 0), r=16 (capped in the last block).

    Returns (directory, stderr of the build).
    """
    import contextlib
    import io

    from tome_export.cli import main

    out = tmp_path_factory.mktemp("traced") / "vit_t16"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--model", "vit_t16", "--r", "16", "--weights", "random", "--trace-source", "-o", str(out), "-q"])
    assert code == 0, err.getvalue()
    return out, err.getvalue()


from cpu_builds import cpu_build  # noqa: E402,F401  (session fixture: CPU recipe builds on one shared export)
from serve_builds import vit_t16_build  # noqa: E402,F401  (session fixture: pipeline builds for tests/serve)


# --- the quick selection: `pytest -m "not slow"` -------------------------------------------------------------------
# Fixtures that build whole artifacts or train/export models (each costs tens of seconds to minutes on 2 cores).
HEAVY_FIXTURES = {"cpu_build", "traced_artifact", "artifact_variants", "vit_t16_build", "served", "rtx_fp16", "rtx_no_engine",
                  "built_t16", "built", "onnx_artifact", "small_artifact", "tiny_run", "small_digits", "zoo",
                  "exported", "onnx_cache"}
# Calls in a test's own body that run a whole build.
HEAVY_CALLS = ("main([\"--model\"", "_cli([\"--model\"", "_run([\"--model\"", "build(BuildOptions", "build(BuildRequest",
               "subprocess.run([str(EXE), \"--model\"")


def pytest_collection_modifyitems(config, items):
    """Mark what builds whole artifacts ``slow``, so ``pytest -m "not slow"`` is the day-to-day selection; CI and
    a plain ``pytest`` run everything."""
    import inspect

    for item in items:
        if item.get_closest_marker("slow"):
            continue
        fixtures = set(getattr(item, "fixturenames", ()))
        try:
            source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        except (OSError, TypeError):
            source = ""
        if fixtures & HEAVY_FIXTURES or any(call in source for call in HEAVY_CALLS):
            item.add_marker(pytest.mark.slow)
