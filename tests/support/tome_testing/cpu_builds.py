"""CPU recipe builds (onnxruntime, openvino) shared by the target and runtime tests.

Each recipe is built once per session through the pipeline's own steps (:func:`tome_export.pipeline.plan_build`,
:func:`~tome_export.pipeline.build_into`) on one cached export of the suite's tiny subject (``digits_vit``: 4 blocks,
32 px, 10 classes, r=8 merging in every block), so a dozen recipes cost one export and every calibration and
validation runs on 32 px images; ``tests/targets`` also runs full pipeline builds through the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import yaml

from tome_export.models import ModelName, ModelSpec, model_info, preprocessing
from tome_export.pipeline import BuildRequest, PreparedBuild, PreparedModel, build_into, plan_build
from tome_export.recipe import parse_recipe, recipe_for
from tome_export.schedule import resolve_schedule
from tome_export.targets import TargetResult

from .tiny_builds import TINY_MODEL as CPU_MODEL, TINY_R as CPU_R  # digits_vit, r=8: 65 tokens -> 57, 49, 41, 33
from tome_export.models.digits_vit import MODEL_NAME as TIMM_NAME

CPU_KIND = "digits"  # its TEST_MODELS entry (for onnx_cache)


def recipe_data(target: str, precision: str, **sections: Dict[str, Any]) -> Dict[str, Any]:
    """The built-in recipe with some section keys replaced (the way a user edits a copy for --recipe)."""
    data = recipe_for(target, precision).to_dict()
    data.pop("file")
    for section, values in sections.items():
        data[section] = {**(data.get(section) or {}), **values}
    return {k: v for k, v in data.items() if v is not None}


def trimmed_recipe(target: str, precision: str, directory: Path) -> Path:
    """The built-in recipe with its validation trimmed to 2 photos (its other settings unchanged), for builds whose
    validation is not what a test checks."""
    validation: Dict[str, Any] = {"images": 2}
    if target.startswith("tensorrt"):
        validation["merge_agreement"] = False
    path = directory / f"{target}-{precision}.yaml"
    path.write_text(yaml.safe_dump(recipe_data(target, precision, validation=validation)))
    return path


def recipe_with(target: str, precision: str, **sections: Dict[str, Any]):
    return parse_recipe(recipe_data(target, precision, **sections))


def plan_with(directory: Path, target: str, precision: str, options: Dict[str, Any] = {}, merge_impl: str = "auto",
              **sections: Dict[str, Any]) -> Tuple[BuildRequest, Any, Any]:
    """``plan_build`` of an edited copy of the built-in recipe, written to ``directory`` as a user would."""
    path = directory / f"{target}-{precision}-{abs(hash(repr(sorted(sections.items()))))}.yaml"
    path.write_text(yaml.safe_dump(recipe_data(target, precision, **sections), sort_keys=False))
    return plan_build(BuildRequest(model=CPU_MODEL, recipe=path, target_options=options, merge_impl=merge_impl))


def flat(result: TargetResult) -> Dict[str, Any]:
    """A target's result as the manifest lays it out (its sections at the top level)."""
    return {"runtime": result.runtime, "validation": result.validation, "notes": list(result.notes),
            "merge_decisions": result.merge_decisions, **result.sections}


@pytest.fixture(scope="session")
def cpu_build(onnx_cache, tmp_path_factory):
    """``cpu_build(target, precision, impl="gather", **recipe_sections) -> (directory, target result)``."""
    root = tmp_path_factory.mktemp("cpu")
    cache: Dict[tuple, Tuple[Path, Dict[str, Any]]] = {}

    def build(target: str, precision: str, impl: str = "gather", **sections: Dict[str, Any]):
        key = (target, precision, impl, repr(sorted(sections.items())))
        if key not in cache:
            onnx_path, model = onnx_cache(CPU_KIND, CPU_R, impl)
            info = model_info(model)
            request, target_, plan = plan_with(root, target, precision, merge_impl=impl, **sections)
            name = ModelName(CPU_MODEL, "timm", TIMM_NAME, "timm-vit")
            prepared = PreparedBuild(request, target_, plan, name, root / "unused")
            prepared_model = PreparedModel(
                model, ModelSpec(CPU_MODEL, TIMM_NAME, "random", 0), info,
                resolve_schedule(CPU_R, info.num_blocks, info.num_tokens, info.num_protected), preprocessing(model))
            workdir = root / f"{len(cache)}-{target}-{precision}"
            workdir.mkdir()
            result, _ = build_into(prepared, prepared_model, workdir, export_from=onnx_path)
            cache[key] = (workdir, flat(result))
        return cache[key]

    return build
