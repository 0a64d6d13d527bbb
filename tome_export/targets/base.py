"""The contract of a build target, and the typed data a build hands it.

A :class:`Target` is one registration: its precisions, its typed recipe settings (a frozen dataclass per recipe
section, with the defaults in it), its command-line options, its runner (``"module:Class"``, torch-free), what it
needs installed, whether it builds from the exported ONNX at all, and the step that finishes its artifacts on the
machine that runs them (where there is one). A build checks the request once into a
:class:`BuildPlan`, gives the target a :class:`BuildContext` and gets back a :class:`TargetResult`.

Target modules are imported to list the targets (CLI, bench, recipes), so they import nothing heavy at module
level: torch, onnx's tools and the backends are imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from ..errors import UserError
from ..graph_names import INPUT_NAME, SOURCE_NAME
from ..info import ModelInfo
from ..manifest import InputSpec
from ..preprocess import Preprocessing
from ..quality.calibration import image_files
from ..quality.validate import DEFAULT_IMAGES, Thresholds, validation_batches
from ..recipe import Recipe
from ..runtime.base import ArtifactIO
from ..schedule import Schedule
from ..tasks import Task

if TYPE_CHECKING:  # the build's model objects; this module stays importable without torch
    import numpy as np

# --- recipe sections as typed settings ------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Union:
        return "/".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) in (tuple, Tuple):
        return "list"
    return getattr(annotation, "__name__", str(annotation))


def _checked(where: str, value: Any, annotation: Any) -> Any:
    """``value`` if it fits ``annotation`` (bool, int, float, str, Optional, Literal, Tuple[X, ...]), converted
    to the field's type (an int for a float, a list for a tuple); else a one-line UserError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        return _checked(where, value, next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{where} = {value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} = {value!r}: expected list")
        return tuple(_checked(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, annotation) or (isinstance(value, bool) and annotation in (int, float)):
        raise UserError(f"{where} = {value!r}: expected {_type_name(annotation)}")
    return value


# The range of a recipe key wherever it appears (counts, fractions, seeds), checked before any work.
RANGES: Dict[str, Tuple[Optional[float], Optional[float]]] = {
    "images": (1, 4096), "batch": (1, 4096), "seed": (0, 2**64 - 1), "max_abs_diff": (0, None),
    "min_cosine": (-1, 1), "min_top1_agreement": (0, 1), "min_token_group_agreement": (0, 1),
}


def _in_range(where: str, key: str, value: Any) -> Any:
    """``value`` if it is a finite number within ``RANGES[key]`` (lists: each item), or not a number at all."""
    if isinstance(value, tuple):
        return tuple(_in_range(f"{where}[{i}]", key, v) for i, v in enumerate(value))
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    low, high = RANGES.get(key, (None, None))
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low:g} and {high:g}" if low is not None and high is not None else (
            f"at least {low:g}" if low is not None else "a finite number")
        raise UserError(f"{where} = {value!r}: must be {bounds}")
    return value


def parse_section(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """An instance of the section dataclass ``cls`` from a recipe's mapping: unknown keys, wrong types and numbers
    out of range (:data:`RANGES`, NaN, infinity) are one-line UserErrors; missing keys take the defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(fields)) or 'none'})")
    return cls(**{key: _in_range(f"{where}.{key}", key, _checked(f"{where}.{key}", value, hints[key]))
                  for key, value in values.items()})


@dataclass(frozen=True)
class NoSection:
    """A recipe section the target takes no keys in."""


@dataclass(frozen=True)
class Validation:
    """A recipe's ``validation`` section: how many photos, and the thresholds the artifact must meet."""

    images: Optional[int] = None  # None: the build's default (32 views of the bundled photos)
    max_abs_diff: Optional[float] = None
    min_cosine: Optional[float] = None
    min_top1_agreement: Optional[float] = None

    def thresholds(self) -> Thresholds:
        limits = {f.name: getattr(self, f.name) for f in dataclasses.fields(Thresholds) if hasattr(self, f.name)}
        return Thresholds(**limits)


SECTIONS = ("build", "quantization", "calibration", "validation")


@dataclass(frozen=True)
class Settings:
    """A target's recipe sections, typed. Each target subclasses it with its own section dataclasses."""

    build: NoSection = NoSection()
    quantization: NoSection = NoSection()
    calibration: NoSection = NoSection()
    validation: Validation = Validation()

    @classmethod
    def from_recipe(cls, recipe: Recipe, defaults: Mapping[str, Mapping[str, Any]] = {}) -> "Settings":
        """The recipe's sections parsed into this class's section types, over ``defaults`` (per section)."""
        hints = typing.get_type_hints(cls)
        where = str(recipe.path) if recipe.path else "recipe"
        sections = {name: parse_section(hints[name], {**defaults.get(name, {}), **recipe.sections.get(name, {})},
                                        f"{where}.{name}") for name in SECTIONS}
        return cls(**sections)


# --- target options (command line) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetOptions:
    """Options of one target that are not recipe settings (folders, flags). Each field is a command-line flag
    ``--field-name``; its metadata holds ``help`` (and ``metavar``), or ``core=True`` for a value a core flag
    carries (``--dynamic-batch MIN:OPT:MAX``)."""

    @classmethod
    def from_values(cls, values: Mapping[str, Any], target: str) -> "TargetOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in names:
                shown = f" {value}" if isinstance(value, str) else ""
                raise UserError(f"--{key.replace('_', '-')}{shown} does not apply to --target {target}")
        return cls(**values)

    def check(self) -> None:
        """One-line UserError for a value no build could use (run before any model is loaded)."""


@dataclass(frozen=True)
class CalibrationOptions(TargetOptions):
    calib_data: Optional[str] = field(default=None, metadata={
        "help": "folder of representative images for int8/fp8 calibration (default: the bundled photos)",
        "metavar": "DIR"})

    def check(self) -> None:
        """``--calib-data``, when given, is a folder holding at least one image."""
        if self.calib_data is not None:
            image_files(self.calib_data)


# --- a build's data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildPlan:
    """What a target is asked to build, checked before any model is loaded."""

    target: str
    precision: str
    recipe: Recipe
    settings: Settings
    options: TargetOptions
    batch: int = 1
    dynamic_batch: bool = False
    opset: int = 18
    merge_impl: str = "gather"  # resolved: option, else the recipe's, else the target's default
    trace_source: bool = False
    validation_images: int = DEFAULT_IMAGES
    task: Task = Task()  # what the artifact outputs (checked; resolved against the model in the manifest)

    @property
    def outputs(self) -> Tuple[str, ...]:
        """The artifact's outputs: the task's, then ``source`` where traced."""
        return self.task.outputs + ((SOURCE_NAME,) if self.trace_source else ())

    def input_spec(self, image_shape: Sequence[int]) -> InputSpec:
        """The artifact's input for images of ``image_shape`` (C, H, W)."""
        batch: Any = "batch" if self.dynamic_batch else self.batch
        return InputSpec(INPUT_NAME, (batch, *image_shape), "float32", self.dynamic_batch)


@dataclass
class BuildContext:
    """Everything a target builds from; ``workdir`` becomes the output directory when the build succeeds."""

    plan: BuildPlan
    workdir: Path
    model: Any  # the patched fp32 PyTorch model in eval mode: the reference every artifact is validated against
    spec: Any  # tome_export.models.ModelSpec: which model and weights
    info: ModelInfo
    schedule: Schedule
    preprocessing: Preprocessing
    onnx_path: Optional[Path] = None  # the fp32 ToMe export (None when the target needs no ONNX)
    log: Callable[[str], None] = print

    @property
    def precision(self) -> str:
        return self.plan.precision

    @property
    def settings(self) -> Any:  # the target's own Settings subclass
        return self.plan.settings

    @property
    def options(self) -> Any:  # the target's own TargetOptions subclass
        return self.plan.options

    def artifact_io(self, runtime: Mapping[str, Any], directory: Optional[Path] = None,
                    outputs: Optional[Sequence[str]] = None) -> ArtifactIO:
        """How a runner runs what the target wrote (in ``directory``, default the work directory; ``outputs``,
        default the build's)."""
        spec = self.plan.input_spec(self.preprocessing.input_size)
        return ArtifactIO(directory or self.workdir, spec, self.preprocessing, tuple(outputs or self.plan.outputs),
                          dict(runtime), self.plan.target)

    def validation_batches(self, dynamic: Optional[bool] = None) -> List["np.ndarray"]:
        """Distinct views of the bundled photos in the artifact's batch sizes (``dynamic=False``: the static
        batch only)."""
        dynamic = self.plan.dynamic_batch if dynamic is None else dynamic
        return validation_batches(self.preprocessing, self.plan.batch, dynamic, self.plan.validation_images)


@dataclass(frozen=True)
class TargetResult:
    """What a target built, for the manifest."""

    runtime: Dict[str, Any]  # the runner's settings (file, compile properties, ...)
    validation: Dict[str, Any]  # measured against PyTorch, with the thresholds applied
    notes: Tuple[str, ...] = ()
    merge_decisions: Optional[Dict[str, Any]] = None
    sections: Dict[str, Any] = field(default_factory=dict)  # target-specific manifest sections


@dataclass(frozen=True)
class Finished:
    """What a target's finishing step did on the machine that runs the artifact (``tome-export engine DIR``)."""

    directory: Path
    file: str  # the artifact file it built or compiled, in ``directory``
    summary: str  # how: library and version, size, time, checksum
    validation: Dict[str, Any]  # as recorded: ``passed`` and the metrics, or ``run: False``, ``reason`` and ``how``
    device: Optional[str] = None  # the GPU it was validated on

    @property
    def validated(self) -> bool:
        return bool(self.validation.get("passed"))


# (directory, force=False, validate_only=False, log=print) -> Finished; a UserError leaves the directory as it was
Finish = Callable[..., Finished]


# --- the registration -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One build target."""

    name: str
    description: str
    precisions: Tuple[str, ...]
    default_merge_impl: str
    runner: str  # "module:Class" of the runner (imported only when an artifact is loaded)
    build: Callable[[BuildContext], TargetResult]
    runtime_extra: str  # the tome-export extra(s) a machine that only runs the artifact installs, e.g. "openvino"
    settings: Type[Settings] = Settings
    options: Type[TargetOptions] = TargetOptions
    # precision -> section -> defaults that depend on the precision (the section dataclasses hold the rest)
    precision_defaults: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    check: Optional[Callable[[BuildPlan], None]] = None  # cheap checks before any model is loaded
    requires: Tuple[str, ...] = ()  # importable modules a build needs
    install_hint: str = "pip install tome-export"  # how to get them (and the runtime)
    needs_onnx: bool = True  # False: the pipeline exports no ONNX and the target builds from ctx.model
    device: str = "cpu"  # where its artifacts run: cpu | cuda
    default_precision: str = "fp32"  # without --precision
    version_modules: Tuple[str, ...] = ()  # libraries whose versions benchmark results record
    # the step on the machine that runs the artifact (`tome-export engine DIR`): build, compile or validate there
    finish: Optional[Finish] = None
    graph_file: str = "model.onnx"  # the graph a server loads, or whose tensor names a compiled engine keeps
    runtime_elsewhere: str = ""  # what the runtime needs beyond the extra, from outside PyPI (said in READMEs)

    def settings_for(self, recipe: Recipe) -> Settings:
        return self.settings.from_recipe(recipe, self.precision_defaults.get(recipe.precision, {}))

    def missing_module(self) -> Optional[str]:
        """The first required module that is not installed, or None."""
        return next((m for m in self.requires if importlib.util.find_spec(m) is None), None)

    def runtime_section(self, runtime: Mapping[str, Any]) -> Dict[str, Any]:
        """The manifest's ``runtime``: which runner loads the artifact, how to install it, and its settings."""
        return {"runner": self.runner, "install": self.install_hint, **runtime}


def option_flags(targets: Sequence[Target]) -> Dict[str, Tuple[dataclasses.Field, List[str]]]:
    """Every target option's field and the targets that take it, by option name (for the command line)."""
    flags: Dict[str, Tuple[dataclasses.Field, List[str]]] = {}
    for target in targets:
        for f in dataclasses.fields(target.options):
            flags.setdefault(f.name, (f, []))[1].append(target.name)
    return flags
