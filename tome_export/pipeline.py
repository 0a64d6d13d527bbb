"""The build behind ``tome-export``, as steps: :func:`prepare` (every check that needs no model) ->
:func:`prepare_model` (create, patch) -> :func:`export` (the fp32 ToMe ONNX, for targets that build from it) ->
:func:`build_target` -> :func:`manifest_for` and :func:`~tome_export.manifest.write_manifest`. :func:`build`
composes them; tests and the benchmark call the steps to build several targets from one model and one export.

Everything is written into a hidden, locked temporary directory beside the output and renamed into place at the
end, so an interrupted or failed build never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ._version import __version__
from .devices import gpu_available
from .errors import UserError, ValidationError
from .files import output_lock, remove_stale_workdirs, staged_output
from .export import MIN_OPSET, export_onnx, max_opset
from .flops import flops_summary
from .info import ModelInfo
from .manifest import Manifest, write_manifest
from .merge import MERGE_IMPLS
from .models import (ModelName, ModelSpec, create_model, estimated_info, family_libraries, model_info, patch,
                     preprocessing, resolve, set_task)
from .onnx_files import copy_onnx
from .ownership import OutputDir, survey
from .preprocess import Preprocessing
from .quality.selfcheck import Recorded, record_self_check
from .quality.validate import DEFAULT_IMAGES
from .recipe import load_recipe, recipe_for
from .resources import check_img_size, check_memory, check_seed
from .runtime import runner_class
from .runtime.base import ArtifactIO, Runner
from .schedule import RSpec, Schedule, cap_r, expand_schedule, r_label, r_text, resolve_schedule
from .tasks import CLASSIFY, Task, as_task
from .targets import BuildContext, BuildPlan, Target, TargetResult, get_target, recipe_settings
from .targets.base import RANGES

Log = Callable[[str], None]
WORKDIR_SUFFIX = ".tmp-12345678"  # the longest name beside the output: mkdtemp adds 8 characters
MAX_BATCH = 65536  # a static batch beyond this is a typo; the memory estimate refuses smaller ones that cannot fit
EXPORT_DIR = ".export"  # inside the work directory: the fp32 export a target builds from, removed before the manifest
KEPT_EXPORT = "exported-fp32"  # that export's folder in a failed build kept with --keep-failed


@dataclass(frozen=True)
class BuildRequest:
    """What a user asks for (CLI flags or Python). :func:`prepare` checks it once."""

    model: str
    r: RSpec = 16
    target: Optional[str] = None  # default: the recipe's, else onnx
    precision: Optional[str] = None  # default: the recipe's, else fp32
    batch: int = 1
    dynamic_batch: bool = False
    opset: Optional[int] = None  # default: the recipe's, else 18
    output: Optional[Path] = None
    weights: str = "pretrained"
    checkpoint: Optional[Path] = None
    seed: int = 0
    merge_impl: str = "auto"
    prop_attn: bool = True
    img_size: Optional[int] = None
    force: bool = False
    allow_large: bool = False  # skip the memory estimate's refusal
    trace_source: bool = False
    validation_images: int = DEFAULT_IMAGES  # when the recipe names none
    recipe: Optional[Path] = None  # a recipe file; default: the built-in <target>-<precision> recipe
    target_options: Mapping[str, Any] = field(default_factory=dict)  # the target's own flags (e.g. calib_data)
    thresholds: Mapping[str, float] = field(default_factory=dict)  # validation limits over the recipe's (by key)
    keep_failed: Optional[Path] = None  # where a build that fails validation is kept for inspection
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # architecture arguments (e.g. depth)
    task: Any = CLASSIFY  # a task name or a tome_export.tasks.Task with its options (e.g. Task("tokens", layer=-2))

    def default_output(self) -> Path:
        name = self.task.name if isinstance(self.task, Task) else self.task
        task = "" if name == CLASSIFY else f"-{name}"
        return Path("tome-out") / f"{_output_stem(self.model)}-{r_label(self.r)}{task}-{self.target}-{self.precision}"


def _output_stem(model: str) -> str:
    """A model name as one directory name: the last part of a repo id behind a prefix (``hf:<owner>/<name>``) or
    of a path."""
    prefix, colon, rest = model.partition(":")
    if colon and prefix.isalpha() and len(prefix) > 1:  # a family's prefix, not a Windows drive letter
        return rest.rsplit("/", 1)[-1]
    if "/" in model or "\\" in model or model.startswith((".", "~")):
        return Path(model).expanduser().resolve().name or "model"
    return model


BuildOptions = BuildRequest  # the name of earlier releases


@dataclass(frozen=True)
class PreparedBuild:
    """A checked request: the target, its plan (recipe settings, options), the model's name and the output."""

    request: BuildRequest
    target: Target
    plan: BuildPlan
    model: ModelName
    output: Path

    @property
    def identity(self) -> Tuple[Any, ...]:
        """What :attr:`Manifest.identity` of this build will be."""
        return (self.model.alias, self.model.source, self.model.name, self.target.name, self.plan.precision,
                self.plan.task.name)


@dataclass(frozen=True)
class PreparedModel:
    """The patched fp32 PyTorch model a build exports and validates against, and its facts."""

    model: Any
    spec: ModelSpec
    info: ModelInfo
    schedule: Schedule
    preprocessing: Preprocessing
    task: Task = Task()  # resolved against the model (what the manifest records)


@dataclass(frozen=True)
class BuildResult:
    path: Path
    manifest: Dict[str, Any]  # the JSON written
    kept: Tuple[str, ...] = ()  # entries of the output that were not tome-export's, left in place (--force)


# --- checks that need no model ----------------------------------------------------------------------------------


THRESHOLD_FLAGS = ("max_abs_diff", "min_cosine", "min_top1_agreement")  # recipe keys, and flags --max-abs-diff ...


def _check_thresholds(thresholds: Mapping[str, float]) -> None:
    for key, value in thresholds.items():
        flag = "--" + key.replace("_", "-")
        if key not in THRESHOLD_FLAGS:
            raise UserError(f"unknown validation threshold {key!r}: choose {', '.join(THRESHOLD_FLAGS)}")
        low, high = RANGES[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low or (
                high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise UserError(f"{flag} {value}: must be {bounds}")


def _recipe_and_target(request: BuildRequest):
    """The recipe (a --recipe file or the built-in one), its target and typed settings."""
    _check_thresholds(request.thresholds)
    if request.recipe is not None:
        recipe = load_recipe(Path(request.recipe))
        for key in ("target", "precision"):
            mine = getattr(request, key)
            if mine is not None and mine != getattr(recipe, key):
                raise UserError(
                    f"--{key} {mine} contradicts the recipe {str(request.recipe)!r} ({key}: {getattr(recipe, key)}); "
                    f"drop --{key} or edit the recipe")
    else:
        target = get_target(request.target if request.target is not None else "onnx")  # '' is no target
        precision = request.precision if request.precision is not None else target.default_precision
        if precision not in target.precisions:
            raise UserError(f"--precision {precision!r} is not available for --target {target.name}; "
                            f"choose one of {', '.join(target.precisions)}")
        recipe = recipe_for(target.name, precision)
    if request.thresholds:  # the command line's limits replace the recipe's (the manifest's notes say so)
        validation = {**recipe.section("validation"), **request.thresholds}
        recipe = replace(recipe, sections={**recipe.sections, "validation": validation})
    target, settings = recipe_settings(recipe)
    return recipe, target, settings


def _check_request(request: BuildRequest, target: Target) -> None:
    missing = target.missing_module()
    if missing is not None:
        raise UserError(f"--target {target.name} needs the Python package {missing!r}, which is not installed: "
                        f"{target.install_hint}")
    if request.merge_impl not in ("auto",) + MERGE_IMPLS:
        raise UserError(f"unknown --merge-impl {request.merge_impl!r}; choose auto, {', '.join(MERGE_IMPLS)}")
    if request.batch < 1 or request.batch > MAX_BATCH:
        raise UserError(f"--batch must be >= 1 and at most {MAX_BATCH:,} (a static batch), got {request.batch}")
    if request.opset < MIN_OPSET:
        raise UserError(
            f"--opset {request.opset} is too low: ToMe's scatter-add needs opset >= 16 (lower opsets silently drop "
            f"merges) and the exporter needs >= {MIN_OPSET}; use --opset {MIN_OPSET} or higher")
    if request.opset > max_opset():
        raise UserError(f"--opset {request.opset} is beyond what the installed exporter writes: use --opset "
                        f"{MIN_OPSET} to {max_opset()}")
    check_seed(request.seed)
    check_img_size(request.img_size)
    if request.checkpoint is not None and not Path(request.checkpoint).is_file():
        raise UserError(f"checkpoint {str(request.checkpoint)!r} does not exist: pass the path of a .pth or "
                        f".safetensors file")
    # The form of r (type, sign, inflect range) needs no model; only a list's length waits for the model.
    expand_schedule(request.r, len(request.r) if isinstance(request.r, list) else 2)


def _check_validation_images(plan: BuildPlan) -> None:
    from .images import MAX_VIEWS, SAMPLE_PHOTOS, VIEWS

    if not 1 <= plan.validation_images <= MAX_VIEWS:
        where = f"{plan.recipe.path}: validation.images" if plan.recipe.path else "validation.images"
        raise UserError(f"{where} is {plan.validation_images}: validation runs on 1 to {MAX_VIEWS} distinct images "
                        f"({len(SAMPLE_PHOTOS)} bundled photos x {len(VIEWS)} views); ask for at most {MAX_VIEWS}")


def plan_build(request: BuildRequest) -> Tuple[BuildRequest, Target, BuildPlan]:
    """The request with target, precision and opset filled in, its target, and the target's plan (checked)."""
    recipe, target, settings = _recipe_and_target(request)
    opset = request.opset if request.opset is not None else (recipe.opset or MIN_OPSET)
    request = replace(request, target=recipe.target, precision=recipe.precision, opset=opset)
    _check_request(request, target)
    merge_impl = request.merge_impl
    if merge_impl == "auto":
        merge_impl = recipe.merge_impl if recipe.merge_impl not in (None, "auto") else target.default_merge_impl
    plan = BuildPlan(
        target=target.name, precision=recipe.precision, recipe=recipe, settings=settings,
        options=target.options.from_values(request.target_options, target.name), batch=request.batch,
        dynamic_batch=request.dynamic_batch, opset=opset, merge_impl=merge_impl, trace_source=request.trace_source,
        validation_images=settings.validation.images or request.validation_images, task=as_task(request.task))
    _check_validation_images(plan)
    plan.options.check()
    if target.check is not None:
        target.check(plan)
    return request, target, plan


def prepare(request: BuildRequest) -> PreparedBuild:
    """Every check that needs no model: options, recipe, target, model name, output directory."""
    if isinstance(request, PreparedBuild):
        return request
    request, target, plan = plan_build(request)
    name = resolve(request.model)
    out = Path(request.output) if request.output is not None else request.default_output()
    prepared = PreparedBuild(request, target, plan, name, out)
    _check_output(out, prepared.identity, request.force)
    _check_keep_failed(request.keep_failed, out)
    return prepared


def _check_output(out: Path, identity: Tuple[Any, ...], force: bool) -> None:
    """Refuse to overwrite anything but an earlier build of the same model, target and precision."""
    parent = out.parent if str(out.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {str(parent)!r} (not a writable directory): choose another --output")
    _check_name_length(out, probe)
    check_replaceable(survey(out), identity, force)


def check_replaceable(found: OutputDir, identity: Tuple[Any, ...], force: bool) -> None:
    """Refuse an output that holds another build (unless ``force``) or anything tome-export did not write: only
    its own recorded files are ever replaced, and ``force`` keeps the others in place."""
    out, existing = str(found.path), found.manifest
    if existing is None and found.foreign:
        raise UserError(f"--output {out!r} holds {found.foreign_text()}, which tome-export did not write (it holds "
                        f"no build of tome-export's): choose another --output")
    if existing is not None and existing.identity != identity and not force:
        raise UserError(f"--output {out!r} already holds artifacts of {existing.model.get('alias', 'another model')} "
                        f"({existing.target}, {existing.precision}): choose another --output or pass --force to "
                        f"replace them")
    if found.foreign and not force:
        raise UserError(f"--output {out!r} holds {found.foreign_text()}, which tome-export did not write: move it "
                        f"away or choose another --output (--force replaces only tome-export's own files and keeps "
                        f"the others)")


def _check_name_length(out: Path, probe: Path) -> None:
    """The hidden work directory beside the output has the longest name a build writes: it must fit too."""
    try:
        limit = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    longest = len(f".{out.name}{WORKDIR_SUFFIX}".encode())
    if longest > limit:
        raise UserError(f"--output name {out.name[:40]!r}... is too long: its work directory beside it needs "
                        f"{longest} bytes, the file system allows {limit}; choose a name of at most "
                        f"{limit - longest + len(out.name.encode())} bytes")


# --- the steps --------------------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def prepare_model(prepared: PreparedBuild, log: Log = lambda msg: None, warn: Log = _warn) -> PreparedModel:
    """Create the model with its weights and patch it as the plan says."""
    request = prepared.request
    log("loading model")
    model, spec = create_model(request.model, weights=request.weights, checkpoint=request.checkpoint,
                               seed=request.seed, **_model_kwargs(request))
    info = model_info(model)
    schedule = resolve_schedule(request.r, info.num_blocks, info.num_tokens, info.num_protected)
    _check_useful_r(request, info, schedule)
    if schedule.capped_early:  # the last block alone trimmed is the reference's normal case: recorded, not warned
        warn(schedule.cap_message())
    guessed = (getattr(model, "tome_source", None) or {}).get("preprocessing_guessed")
    if guessed:  # recorded in the manifest's model entry too; inspect shows it
        warn(f"preprocessing guessed: {guessed}")
    patch(model, list(schedule.requested), merge_impl=prepared.plan.merge_impl, prop_attn=request.prop_attn)
    task = set_task(model, prepared.plan.task)
    return PreparedModel(model, spec, info, schedule, preprocessing(model), task)


def _model_kwargs(request: BuildRequest) -> Dict[str, Any]:
    """The architecture arguments of the requested model (``--img-size`` among them)."""
    return {**request.model_kwargs, **({"img_size": request.img_size} if request.img_size else {})}


def _check_useful_r(request: BuildRequest, info: ModelInfo, schedule: Schedule) -> None:
    """An r beyond what the first block can merge builds the same model as that largest value: refused."""
    largest = cap_r(max(schedule.requested, default=0), info.num_tokens, info.num_protected)
    if max(schedule.requested, default=0) > largest:
        raise UserError(f"--r {r_text(request.r)} is more than any block of {request.model} can merge: its first block "
                        f"holds {info.num_tokens} tokens ({info.num_protected} protected), so a block merges at most "
                        f"{largest} and any larger r builds the same model; use --r {largest} or less")


def export(prepared: PreparedBuild, model: PreparedModel, path: Path, log: Log = lambda msg: None) -> Path:
    """The fp32 static-shape ToMe ONNX a target builds from."""
    plan = prepared.plan
    log(f"exporting ONNX (opset {plan.opset}, merge {plan.merge_impl})")
    path.parent.mkdir(parents=True, exist_ok=True)
    return export_onnx(model.model, path, model.preprocessing.input_size, batch=plan.batch,
                       dynamic_batch=plan.dynamic_batch, opset=plan.opset, trace_source=plan.trace_source,
                       metadata=graph_metadata(model))


def graph_metadata(model: PreparedModel) -> List[Tuple[str, str]]:
    """What the ONNX carries for readers without the manifest: version, r schedule, preprocessing (JSON)."""
    return [("tome_export.version", __version__), ("tome_export.r_schedule", str(list(model.schedule.r))),
            ("tome_export.preprocessing", json.dumps(model.preprocessing.describe())),
            ("tome_export.task", json.dumps(model.task.to_dict()))]


def build_target(prepared: PreparedBuild, model: PreparedModel, workdir: Path, onnx_path: Optional[Path],
                 log: Log = lambda msg: None) -> TargetResult:
    """The target's artifacts in ``workdir`` from the model and (targets that need it) the export."""
    plan = prepared.plan
    log(f"building {plan.target} {plan.precision} and validating against PyTorch")
    ctx = BuildContext(plan=plan, workdir=workdir, model=model.model, spec=model.spec, info=model.info,
                       schedule=model.schedule, preprocessing=model.preprocessing, onnx_path=onnx_path,
                       log=getattr(log, "sub", log))  # a target's phases are parts of this step
    return prepared.target.build(ctx)


def _versions() -> Dict[str, str]:
    """Versions of torch, the ONNX tools and every family library in use (imported: a family imports its library
    when it builds a model)."""
    import onnx
    import onnxruntime
    import torch

    versions = {"tome_export": __version__, "torch": torch.__version__.split("+")[0]}
    for name in family_libraries():
        if name in sys.modules:
            versions[name] = sys.modules[name].__version__.split("+")[0]
    return {**versions, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _threshold_note(request: BuildRequest) -> Tuple[str, ...]:
    """What the command line changed in the recipe's validation thresholds."""
    if not request.thresholds:
        return ()
    recipe, _, _ = _recipe_and_target(replace(request, thresholds={}))
    was = recipe.section("validation")
    text = ", ".join(f"{k} {v:g} (recipe: {was.get(k, 'unset')})" for k, v in request.thresholds.items())
    return (f"validation thresholds set on the command line: {text}",)


def manifest_for(prepared: PreparedBuild, model: PreparedModel, result: TargetResult,
                 seconds: Optional[float] = None, checked: Optional[Recorded] = None) -> Manifest:
    """The manifest of a finished target build (``write_manifest`` adds the checksums)."""
    request, plan, schedule, info = prepared.request, prepared.plan, model.schedule, model.info
    notes = (tuple(result.notes) + _threshold_note(request) + ((checked.note,) if checked and checked.note else ())
             + tuple(unused_options(prepared, result)))
    entry = model.spec.manifest_entry(info.family)
    if request.model_kwargs:
        entry["model_kwargs"] = dict(request.model_kwargs)
    r = request.r if not isinstance(request.r, tuple) else {"r": request.r[0], "inflect": request.r[1]}
    return Manifest(
        target=plan.target, precision=plan.precision, input=plan.input_spec(model.preprocessing.input_size),
        preprocessing=model.preprocessing.to_dict(), model=entry, outputs=plan.outputs, task=model.task,
        output_shapes=output_shapes(model, plan),
        runtime=prepared.target.runtime_section(result.runtime), validation=dict(result.validation),
        validated_on=checked.validated_on if checked else {}, self_check=checked.self_check if checked else {},
        notes=notes, merge_decisions=result.merge_decisions, r=r, r_requested=schedule.requested,
        r_schedule=schedule.r, r_capped=schedule.capped, tokens_per_block=schedule.tokens,
        num_tokens=schedule.num_tokens, num_protected=schedule.num_protected, patch_size=tuple(info.patch_size),
        merge_impl=plan.merge_impl, prop_attn=request.prop_attn, opset=plan.opset, num_classes=info.num_classes,
        flops=flops_summary(info, schedule.r), recipe=plan.recipe.to_dict(), versions=_versions(),
        build_seconds=round(seconds, 1) if seconds is not None else None, sections=dict(result.sections))


def unused_options(prepared: PreparedBuild, result: TargetResult) -> List[str]:
    """Notes for the options the target's recipe did not use: ``--calib-data`` where nothing calibrated (every
    calibration records its source folder in the target's sections, so an unrecorded folder was never read)."""
    folder = getattr(prepared.plan.options, "calib_data", None)
    if folder is None or json.dumps(str(folder)) in json.dumps(result.sections, default=str):
        return []
    plan = prepared.plan
    return [f"--calib-data {folder} was not used: the {plan.target} {plan.precision} recipe does not calibrate "
            f"(e.g. dynamic int8 quantization, or no quantization), so no image of it was read"]


def output_shapes(model: PreparedModel, plan: BuildPlan) -> Dict[str, Tuple[Any, ...]]:
    """Each output's shape, read from one forward pass of the model (batch first: ``"batch"`` when dynamic)."""
    import torch

    batch: Any = "batch" if plan.dynamic_batch else plan.batch
    x = torch.zeros(1, *model.preprocessing.input_size)
    with torch.no_grad():
        values = model.model.tome_outputs(x, trace_source=plan.trace_source)
    return {name: (batch, *value.shape[1:]) for name, value in zip(plan.outputs, values)}


def build_into(prepared: PreparedBuild, model: PreparedModel, workdir: Path, log: Log = lambda msg: None,
               export_from: Optional[Path] = None, started: Optional[float] = None
               ) -> Tuple[TargetResult, Dict[str, Any]]:
    """Export (where the target needs it; ``export_from``: a copy of this export instead), build the target and
    write the manifest into ``workdir``; returns the target's result and the manifest written."""
    started = time.perf_counter() if started is None else started
    scratch = workdir / EXPORT_DIR
    onnx_path = None
    if prepared.target.needs_onnx:
        onnx_path = scratch / "model.onnx"
        if export_from is not None:
            scratch.mkdir(parents=True, exist_ok=True)
            copy_onnx(export_from, onnx_path)
        else:
            export(prepared, model, onnx_path, log)
    result = build_target(prepared, model, workdir, onnx_path, log)
    shutil.rmtree(scratch, ignore_errors=True)
    log("storing the self-check's views and outputs")
    checked = self_check(prepared, model, workdir, result)
    manifest = manifest_for(prepared, model, result, time.perf_counter() - started, checked)
    return result, write_manifest(workdir, manifest)


def self_check(prepared: PreparedBuild, model: PreparedModel, workdir: Path, result: TargetResult) -> Recorded:
    """Store what the artifact checks itself against where it runs (:mod:`tome_export.runtime.selfcheck`), with
    its outputs from the runner deployments use, when it runs on this machine."""
    plan = prepared.plan
    runtime = prepared.target.runtime_section(result.runtime)
    io = ArtifactIO(workdir, plan.input_spec(model.preprocessing.input_size), model.preprocessing, plan.outputs,
                    runtime, plan.target)

    def open_runner() -> Optional[Runner]:
        if prepared.target.device != "cpu" and not gpu_available():
            return None  # a GPU artifact built without a GPU: its check is established where it runs
        try:
            return runner_class(str(runtime["runner"]))(io)
        except (UserError, ImportError):  # runs elsewhere (an engine built on the GPU machine, a missing backend)
            return None

    thresholds = dict(plan.settings.validation.thresholds().applied())
    if model.task.name != CLASSIFY:  # features have no class to agree on: their cosine and difference are checked
        thresholds.pop("top1_agreement", None)
    return record_self_check(model.model, model.preprocessing, workdir, thresholds, open_runner, plan.outputs[0])


def build(request: BuildRequest, log: Log = lambda msg: None, warn: Log = _warn) -> BuildResult:
    """Run the whole build; returns the output directory and its manifest. ``request`` may be a
    :class:`PreparedBuild` (the checks already done by :func:`prepare`)."""
    started = time.perf_counter()
    prepared = prepare(request)
    out = prepared.output
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):  # checked again under the lock, held until the build is in place
        remove_stale_workdirs(out.parent, out.name)  # first: it puts back a previous build a killed swap left
        _check_output(out, prepared.identity, prepared.request.force)
        batch = max(prepared.plan.batch, 3 if prepared.plan.dynamic_batch else 1)  # validation runs 3 at once
        estimate = estimated_info(prepared.request.model, **_model_kwargs(prepared.request))
        if estimate is not None:  # before the model allocates anything
            check_memory(estimate, batch, "the build", prepared.request.allow_large)
        model = prepare_model(prepared, log, warn)
        check_memory(model.info, batch, "the build", prepared.request.allow_large)
        return _build_locked(prepared, model, log, warn, started)


def _build_locked(prepared: PreparedBuild, model: PreparedModel, log: Log, warn: Log, started: float) -> BuildResult:
    kept: List[str] = []

    def foreign(out: Path) -> Tuple[str, ...]:  # asked at the swap: files added during the build are kept too
        found = survey(out).foreign
        kept.extend(found)
        return found

    with staged_output(prepared.output, foreign) as tmp:
        try:
            result, manifest = build_into(prepared, model, tmp, log, started=started)
        except ValidationError as exc:
            if prepared.request.keep_failed is not None:
                exc.kept = str(keep_failed_build(prepared, model, tmp, exc, time.perf_counter() - started))
            raise
    for note in unused_options(prepared, result):
        warn(note)
    return BuildResult(prepared.output, manifest, tuple(kept))


def keep_failed_build(prepared: PreparedBuild, model: PreparedModel, workdir: Path, exc: ValidationError,
                      seconds: float) -> Path:
    """Move what a build that failed validation wrote to ``--keep-failed``, with its fp32 export and a manifest
    that records the failure (``failed``: loaders refuse the directory; ``inspect`` shows it)."""
    keep = Path(prepared.request.keep_failed)
    keep.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(keep), staged_output(keep) as kept:
        for item in workdir.iterdir():
            shutil.move(str(item), str(kept / (KEPT_EXPORT if item.name == EXPORT_DIR else item.name)))
        validation = {**exc.report, "passed": False}
        manifest = manifest_for(prepared, model, TargetResult(runtime={}, validation=validation), seconds)
        write_manifest(kept, replace(manifest, failed={"reason": str(exc), "output": str(prepared.output)}))
    return keep


def _check_keep_failed(keep: Optional[Path], out: Path) -> None:
    """``--keep-failed`` names a place apart from the output that is free or holds an earlier failed build."""
    if keep is None:
        return
    if Path(os.path.abspath(keep)) == Path(os.path.abspath(out)):
        raise UserError(f"--keep-failed {str(keep)!r} is the build's output: choose another directory")
    found = survey(Path(keep))  # replaced whole when the build fails: it may hold only an earlier failed build
    if found.foreign:
        raise UserError(f"--keep-failed {str(keep)!r} holds {found.foreign_text()}, which tome-export did not write: "
                        f"choose another directory")
    if found.manifest is not None and not found.manifest.failed:
        raise UserError(f"--keep-failed {str(keep)!r} already holds a build that did not fail: choose another "
                        f"directory")
