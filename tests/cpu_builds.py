"""CPU recipe builds (onnxruntime, openvino) shared by the backend and runtime tests.

Each recipe is built once per session by its target's own ``build`` on one cached export of a small ToMe ViT
(ViT-Tiny, 6 blocks, r=8), so a dozen recipes cost one export; ``tests/backends`` also runs a full pipeline
build through the CLI.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from tome_export.backends import TARGETS, BuildContext
from tome_export.backends.common import runner_manifest
from tome_export.manifest import write_manifest
from tome_export.models import ModelSpec, model_info
from tome_export.pipeline import BuildOptions
from tome_export.preprocess import Preprocessing
from tome_export.recipes import parse_recipe, recipe_for
from tome_export.schedule import resolve_schedule

CPU_MODEL, CPU_R = "vit_d6", 8


def recipe_with(target: str, precision: str, **sections: Dict[str, Any]):
    """The built-in recipe with some section keys replaced (the way a user edits a copy for --recipe)."""
    data = recipe_for(target, precision).to_dict()
    data.pop("file")
    for section, values in sections.items():
        data[section] = {**(data.get(section) or {}), **values}
    return parse_recipe({k: v for k, v in data.items() if v is not None})


@pytest.fixture(scope="session")
def cpu_build(onnx_cache, tmp_path_factory):
    """``cpu_build(target, precision, impl="gather", **recipe_sections) -> (directory, target result)``."""
    root = tmp_path_factory.mktemp("cpu")
    cache: Dict[tuple, Tuple[Path, Dict[str, Any]]] = {}

    def build(target: str, precision: str, impl: str = "gather", **sections: Dict[str, Any]):
        key = (target, precision, impl, repr(sorted(sections.items())))
        if key not in cache:
            onnx_path, model = onnx_cache(CPU_MODEL, CPU_R, impl)
            info = model_info(model)
            workdir = root / f"{len(cache)}-{target}-{precision}"
            workdir.mkdir()
            shutil.copyfile(onnx_path, workdir / "model.onnx")
            recipe = recipe_with(target, precision, **sections)
            ctx = BuildContext(
                workdir=workdir, onnx_path=workdir / "model.onnx", model=model,
                spec=ModelSpec(CPU_MODEL, "vit_tiny_patch16_224", "random", 0), info=info,
                schedule=resolve_schedule(CPU_R, info.num_blocks, info.num_tokens, info.num_protected),
                preprocessing=Preprocessing.from_model(model), precision=precision, batch=1, dynamic_batch=False,
                merge_impl=impl, recipe=recipe, options=BuildOptions(model=CPU_MODEL, target=target, precision=precision),
                log=lambda message: None,
            )
            result = TARGETS[target].build(ctx)
            write_manifest(workdir, {"target": target, "precision": precision, **runner_manifest(ctx, result["runtime"]),
                                     **result})
            cache[key] = (workdir, result)
        return cache[key]

    return build
