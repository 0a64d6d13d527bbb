"""Every registered target and model family meets the same contract, so a new one is tested by registering it.

Targets, for each precision: build through the pipeline's steps (its own recipe, on a tiny model and few images),
load the artifact with ``runtime.load`` and validate what it computes against PyTorch with the recipe's thresholds,
then ``inspect`` it. Artifacts that run only on an NVIDIA GPU are built and inspected here, and their run is skipped
with the reason where there is none.

Tasks: every target builds each encoder task (embed, dense, tokens) at its default precision, and ``runtime.load``
returns the outputs the manifest names, with the recorded shapes, as PyTorch computes them.

Families: the example model each family registers, patched with r=0, equals the unpatched model; patched with r>0
it matches the independent reference of ``tests/support/tome_testing/reference_tome.py``; exported, ONNX Runtime matches PyTorch.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Dict, Tuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from tome_testing.models import nontrivial
from tome_testing.cpu_builds import recipe_data
from tome_testing.hf_models import unpatched_output
from tome_testing.reference_tome import REFERENCES
from tome_export.devices import gpu_available
from tome_export.errors import UserError
from tome_export.export import export_onnx
from tome_export.images import sample_photos
from tome_export.inspection import format_report, inspect_path
from tome_export.models import ModelName, ModelSpec, families, model_info, patch, preprocessing, set_task
from tome_export.pipeline import BuildRequest, PreparedBuild, PreparedModel, build_into, graph_metadata, plan_build
from tome_export.quality.validate import Thresholds, check_thresholds, compare_logits, compare_outputs
from tome_export.recipe import recipe_for
from tome_export.runtime import load
from tome_export.schedule import resolve_schedule
from tome_export.targets import targets

R = 4
CASES = [(t.name, p) for t in targets().values() for p in t.precisions]
TASK_CASES = [(t.name, t.default_precision, task) for t in targets().values() for task in ("embed", "dense", "tokens")]
FAMILIES = {f.name: f for f in families() if f.example is not None}
# Few images: the contract, not the thresholds' statistics, is what is tested here (tests/targets test those).
FEW = {"validation": {"images": 2, "compare_unprotected": False, "merge_agreement": False},
       "calibration": {"images": 4}}


def _tiny_model() -> torch.nn.Module:
    # timm initialises from torch's global generator: seeded here, or the weights depend on the tests run before
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nontrivial(FAMILIES["timm-vit"].example())


def _recipe(directory, target: str, precision: str):
    """The built-in recipe with fewer images (only keys the target takes), as a user's edited copy."""
    known = targets()[target].settings_for(recipe_for(target, precision))
    sections = {section: {k: v for k, v in values.items() if k in getattr(known, section).__dataclass_fields__}
                for section, values in FEW.items()}
    path = directory / f"{target}-{precision}.yaml"
    path.write_text(yaml.safe_dump(recipe_data(target, precision, **sections)))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(target, precision) -> (directory, patched model)``: one export per merge lowering, reused."""
    root = tmp_path_factory.mktemp("conformance")
    exports: Dict[str, Tuple[Any, PreparedModel]] = {}
    cache: Dict[Tuple[str, str], Tuple[Any, torch.nn.Module]] = {}

    def get(target: str, precision: str, task: str = "classify"):
        if (target, precision, task) not in cache:
            try:
                request, target_, plan = plan_build(BuildRequest(model="vit_t16", r=R, task=task,
                                                                 recipe=_recipe(root, target, precision)))
            except UserError as exc:  # the target's own check: this machine cannot build it (e.g. a CPU feature)
                pytest.skip(f"{target} {precision} is refused here before any work: {exc}")
            if (plan.merge_impl, task) not in exports:
                model = patch(_tiny_model(), R, merge_impl=plan.merge_impl)
                resolved = set_task(model, task)
                info = model_info(model)
                prepared_model = PreparedModel(
                    model, ModelSpec("tiny", "vit_tiny_patch16_224", "random", 0), info,
                    resolve_schedule(R, info.num_blocks, info.num_tokens, info.num_protected), preprocessing(model),
                    resolved)
                path = export_onnx(model, root / f"{plan.merge_impl}-{task}.onnx",
                                   prepared_model.preprocessing.input_size, metadata=graph_metadata(prepared_model))
                exports[(plan.merge_impl, task)] = (path, prepared_model)
            path, prepared_model = exports[(plan.merge_impl, task)]
            prepared = PreparedBuild(request, target_, plan, ModelName("tiny", "timm", "vit_tiny_patch16_224",
                                                                       "timm-vit"), root / "unused")
            workdir = root / f"{target}-{precision}-{task}"
            workdir.mkdir()
            build_into(prepared, prepared_model, workdir, export_from=path)
            cache[(target, precision, task)] = (workdir, prepared_model.model)
        return cache[(target, precision, task)]

    return get


@pytest.mark.parametrize("target,precision", CASES)
# an engine the build compiled was never run by it; tests/targets/test_tensorrt.py asserts that warning
@pytest.mark.filterwarnings("ignore::tome_export.errors.UnvalidatedEngineWarning")
def test_target_builds_loads_validates_and_inspects(built, target, precision):
    directory, model = built(target, precision)
    report = inspect_path(directory)
    manifest = report["manifest"]
    assert report["checksums"]["ok"] and manifest["validation"]["passed"]
    assert (manifest["target"], manifest["precision"]) == (target, precision)
    assert manifest["runtime"]["runner"] == targets()[target].runner
    assert f"target     {target} {precision}" in format_report(report)
    for graph in directory.glob("*.onnx"):  # what a reader without the manifest needs is in every shipped graph
        metadata = {p.key: p.value for p in onnx.load(str(graph), load_external_data=False).metadata_props}
        assert json.loads(metadata["tome_export.preprocessing"]).items() >= manifest["preprocessing"].items(), graph
    if targets()[target].device == "cuda" and not gpu_available():
        with pytest.raises(UserError):
            load(directory)
        pytest.skip(f"{target} artifacts run on an NVIDIA GPU; none here (built, inspected and refused to load)")
    with load(directory, threads=1) as runner:
        x = runner.preprocess_batch(sample_photos(1))
        logits = runner(x)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    thresholds = Thresholds(**manifest["validation"]["thresholds"])
    check_thresholds(compare_logits(reference, logits), thresholds, f"{target} {precision} through runtime.load")


@pytest.mark.parametrize("target,precision,task", TASK_CASES)
@pytest.mark.filterwarnings("ignore::tome_export.errors.UnvalidatedEngineWarning")
def test_target_builds_every_task_and_runs_it_through_runtime_load(built, target, precision, task):
    directory, model = built(target, precision, task)
    report = inspect_path(directory)
    manifest = report["manifest"]
    assert report["checksums"]["ok"] and manifest["validation"]["passed"]
    assert manifest["task"]["name"] == task and manifest["outputs"] == list(model.tome_task.outputs)
    assert f"task       {task}" in format_report(report)
    if targets()[target].device == "cuda" and not gpu_available():
        pytest.skip(f"{target} artifacts run on an NVIDIA GPU; none here (built, validated on the CPU, inspected)")
    with load(directory, threads=1) as runner:
        x = runner.preprocess_batch(sample_photos(1))
        got = runner.infer(x)
        assert runner(x).shape == got[manifest["outputs"][0]].shape
    assert {name: list(value.shape) for name, value in got.items()} == manifest["output_shapes"]
    with torch.no_grad():
        want = {name: v.numpy() for name, v in zip(manifest["outputs"], model.tome_outputs(torch.from_numpy(x)))}
    thresholds = Thresholds(**manifest["validation"]["thresholds"])
    check_thresholds(compare_outputs(want, got), thresholds, f"{target} {precision} {task} through runtime.load")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_r0_is_the_unpatched_model(family):
    model = nontrivial(FAMILIES[family].example())
    x = torch.from_numpy(preprocessing(model).batch(sample_photos(2)))
    with torch.no_grad():
        want = model(x)
        if not isinstance(want, torch.Tensor):  # a transformers model's output object: the tensor ToMe returns
            want = unpatched_output(model, x)
        got = patch(copy.deepcopy(model), 0)(x)
    assert want.abs().max() > 0.1 and (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("impl", ["gather", "onehot"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_the_reference(family, impl):
    if family not in REFERENCES:
        pytest.skip(f"no independent reference ToMe for {family} in tome_testing/reference_tome.py")
    model = nontrivial(FAMILIES[family].example())
    info = model_info(model)
    sched = resolve_schedule(R, info.num_blocks, info.num_tokens, info.num_protected)
    x = torch.from_numpy(preprocessing(model).batch(sample_photos(2)))
    want, groups = REFERENCES[family](model, x, list(sched.requested))
    patched = patch(copy.deepcopy(model), R, merge_impl=impl)
    with torch.no_grad():
        got, source = patched.forward_with_source(x)
    assert (got - want).abs().max().item() < 1e-4
    for i in range(len(x)):
        assert [torch.nonzero(row).flatten().tolist() for row in source[i]] == groups[i]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_exports_what_pytorch_computes(family, tmp_path):
    model = patch(nontrivial(FAMILIES[family].example()), R)
    pre = preprocessing(model)
    path = export_onnx(model, tmp_path / "model.onnx", pre.input_size, dynamic_batch=True)
    x = pre.batch(sample_photos(3))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() <= 1e-4
