"""AOTInductor builds (``aoti``, ``aoti-cuda``) of one tiny ViT, each made once per session through the pipeline.

Compiling a package runs a C++ compiler over the whole model: about a minute for this model (ViT-Tiny width,
2 blocks, 64 px, r=4) on 2 cores, so the session compiles one CPU package and every AOTInductor test shares it.
The ``aoti-cuda`` build made here, without a GPU, is the exported program only (seconds).
"""

from __future__ import annotations

from pathlib import Path
import pytest
import yaml

from .cpu_builds import recipe_data
from tome_export.pipeline import BuildRequest, build

TINY = {"depth": 2, "img_size": 64}  # model_kwargs of vit_t16: 16 patches + the class token
R = 4


def tiny_aoti_build(target: str, precision: str, out: Path, **request) -> Path:
    """A pipeline build of the tiny ViT for ``target`` with 4 validation images (the recipe otherwise as shipped)."""
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_data(target, precision, validation={"images": 4})))
    return build(BuildRequest(model="vit_t16", r=R, weights="random", output=out, recipe=recipe,
                              model_kwargs=TINY, **request)).path


@pytest.fixture(scope="session")
def aoti_cpu_build(tmp_path_factory) -> Path:
    """An ``aoti`` fp32 package: dynamic batch (validated at 1, 2 and 3), logits and the source map out."""
    out = tmp_path_factory.mktemp("aoti") / "cpu"
    return tiny_aoti_build("aoti", "fp32", out, dynamic_batch=True, batch=2, trace_source=True)


@pytest.fixture(scope="session")
def aoti_cuda_build(tmp_path_factory) -> Path:
    """An ``aoti-cuda`` fp16 build, static batch 2, made here without a GPU: the exported program, not compiled."""
    return tiny_aoti_build("aoti-cuda", "fp16", tmp_path_factory.mktemp("aoti") / "cuda", batch=2)
