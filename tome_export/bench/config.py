"""A benchmark matrix, read from YAML and checked completely before any slow work.

Shape of a config (every key but ``models`` is optional; unknown keys are an error)::

    name: vit_b16_cpu                 # default: the file name
    description: ...
    models:                           # one entry per model
      - model: vit_b16                # alias or timm name
        weights: random               # pretrained | random (seeded) ; or checkpoint: PATH
        seed: 0
        kwargs: {depth: 6}            # timm architecture arguments
        r: [13]                       # this model's schedules instead of the top-level r (r=0 is added)
        prop_attn: false              # proportional attention off (default on), e.g. MAE off the shelf
        task: dense                   # classify (default) | embed | dense | tokens, or {name: tokens, layer: -2}
        published: {top1: 82.60, baseline_top1: 84.57, r: 13, source: ...}   # numbers to compare with (recorded)
      - model: digits_vit             # the embedded accuracy case: trained (seeded, cached) by the harness
        train: {epochs: 40, lr: 3.0e-4, seed: 0}
    r: [0, 8, 13, 16, "16:-1"]        # ints, "r:inflect" or per-block lists; r=0 (the baseline) is always added
    precisions: [fp32, bf16, int8]    # fp32 (the baseline) is always added
    backends: [torch, onnxruntime, openvino]
    batches: [1, 8, 32]
    threads: [2]
    build: {dynamic_batch: true, merge_impl: auto}
    timing: {warmup: 2, rounds: 5, per_round: 5, pause_s: 0.2, per_batch: {32: {rounds: 3, per_round: 2}}}
    memory: true                      # peak RSS per cell, in a subprocess
    quality: {images: 8, max_images: 2000, decision_images: 16}
    budget: {top1_agreement: 0.99, accuracy_drop: 0.01, cosine: 0.99}   # cosine: the encoder tasks' mean cosine
"""

from __future__ import annotations

import math

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from ..errors import UserError
from ..files import sha256_file
from ..resources import MAX_THREADS
from ..schedule import RSpec, parse_r_text, r_label
from ..tasks import CLASSIFY, Task, as_task
from .matrix import backends, precisions

# The embedded accuracy case (:mod:`.digits`): the only model the harness trains itself.
DIGITS_ALIAS, DIGITS_MODEL = "digits_vit", "tome_digits_vit"  # tome_export.models.digits_vit (no torch here)

_TOP = ("name", "description", "models", "r", "precisions", "backends", "batches", "threads", "build", "timing",
        "memory", "quality", "budget")
_MODEL = ("model", "weights", "seed", "checkpoint", "kwargs", "train", "r", "prop_attn", "published", "task")
_TRAIN = {"epochs": int, "lr": float, "seed": int, "batch": int}
_BUILD = {"dynamic_batch": bool, "merge_impl": ("auto", "gather", "onehot")}
_TIMING = {"warmup": int, "rounds": int, "per_round": int, "pause_s": float, "per_batch": dict}
_PER_BATCH = {"warmup": int, "rounds": int, "per_round": int}
_QUALITY = {"images": int, "max_images": int, "decision_images": int}
_BUDGET = {"top1_agreement": float, "accuracy_drop": float, "cosine": float}
# Timing settings beyond these never finish in useful time (rounds x runs of a large model at batch 64 would
# take days).
TIMING_LIMITS = {"warmup": (0, 1000), "rounds": (1, 1000), "per_round": (1, 1000), "pause_s": (0.0, 60.0)}


@dataclass(frozen=True)
class ModelConfig:
    model: str
    weights: str = "random"  # pretrained | random | checkpoint | trained (digits_vit with ``train``)
    seed: int = 0
    checkpoint: Optional[str] = None
    kwargs: Tuple[Tuple[str, Any], ...] = ()  # timm architecture arguments, sorted
    train: Optional[Tuple[Tuple[str, Any], ...]] = None  # train_digits_vit arguments, sorted
    r: Optional[Tuple[RSpec, ...]] = None  # this model's schedules; None: the config's
    prop_attn: bool = True
    published: Tuple[Tuple[str, Any], ...] = ()  # published numbers to compare with, recorded in the results
    task: Task = Task()  # what is built, timed and compared (tome_export.tasks)

    @property
    def key(self) -> str:
        """A stable, readable id: the model name (and its task, if not classify) plus a short hash of everything
        that changes its outputs."""
        identity = {"weights": self.weights, "seed": self.seed, "checkpoint": _file_identity(self.checkpoint),
                    "kwargs": list(self.kwargs), "train": list(self.train or ())}
        if not self.prop_attn:  # only when off, so that keys (and resumable results) of earlier configs stay
            identity["prop_attn"] = False
        if self.task != Task():  # likewise
            identity["task"] = self.task.to_dict()
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
        task = "" if self.task.name == CLASSIFY else f"-{self.task.name}"
        return f"{self.model}{task}-{digest}"

    def describe(self) -> str:
        parts = [self.model]
        if self.kwargs:
            parts.append(", ".join(f"{k}={v}" for k, v in self.kwargs))
        if self.train is not None:
            parts.append("trained here: " + ", ".join(f"{k}={v}" for k, v in self.train))
        elif self.checkpoint:
            parts.append(f"checkpoint {self.checkpoint}")
        else:
            parts.append(f"{self.weights} weights" + (f" (seed {self.seed})" if self.weights == "random" else ""))
        if not self.prop_attn:
            parts.append("no proportional attention")
        if self.task.name != CLASSIFY:
            parts.append(f"task {self.task.describe()}")
        return "; ".join(parts)


def _file_identity(path: Optional[str]) -> Optional[str]:
    """A checkpoint is identified by its content, so replacing the file re-measures its cells."""
    if path is None or not Path(path).is_file():
        return path
    return sha256_file(path)


@dataclass(frozen=True)
class Timing:
    warmup: int = 2
    rounds: int = 5
    per_round: int = 5
    pause_s: float = 0.2
    per_batch: Tuple[Tuple[int, Tuple[Tuple[str, int], ...]], ...] = ()

    def for_batch(self, batch: int) -> Dict[str, Any]:
        settings = {"warmup": self.warmup, "rounds": self.rounds, "per_round": self.per_round, "pause_s": self.pause_s}
        settings.update(dict(dict(self.per_batch).get(batch, ())))
        return settings


def check_timing(timing: Timing, where: str) -> None:
    """Every timing setting (and each batch size's own) within :data:`TIMING_LIMITS`, as a one-line UserError."""
    settings = [("", timing.for_batch(-1))] + [(f".per_batch.{b}", dict(s)) for b, s in timing.per_batch]
    for suffix, values in settings:
        for key, value in values.items():
            low, high = TIMING_LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise UserError(f"{where}{suffix}.{key} = {value!r}: must be between {low:g} and {high:g}")


@dataclass(frozen=True)
class BenchConfig:
    name: str
    models: Tuple[ModelConfig, ...]
    r: Tuple[RSpec, ...] = (0,)
    precisions: Tuple[str, ...] = ("fp32",)
    backends: Tuple[str, ...] = ("torch",)
    batches: Tuple[int, ...] = (1,)
    threads: Tuple[int, ...] = (1,)
    description: str = ""
    dynamic_batch: bool = True  # one artifact serves every batch size
    merge_impl: str = "auto"
    timing: Timing = field(default_factory=Timing)
    memory: bool = True
    photos: int = 8  # bundled photos for fidelity when there is no labelled data
    max_images: int = 2000  # cap on --data images (0: all)
    decision_images: int = 16
    budget_top1_agreement: float = 0.99
    budget_accuracy_drop: float = 0.01
    budget_cosine: float = 0.99  # the encoder tasks' mean feature cosine with fp32 r=0 (tome_export.bench.tasks)
    path: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """The config as recorded in the results (plain JSON types)."""
        return {
            "name": self.name, "description": self.description, "path": self.path,
            "models": [{"model": m.model, "key": m.key, "weights": m.weights, "seed": m.seed, "checkpoint": m.checkpoint,
                        "kwargs": dict(m.kwargs), "train": dict(m.train) if m.train is not None else None,
                        **({"r": [r_label(r) for r in m.r]} if m.r is not None else {}),
                        **({"prop_attn": False} if not m.prop_attn else {}),
                        **({"task": m.task.to_dict()} if m.task != Task() else {}),
                        **({"published": dict(m.published)} if m.published else {})}
                       for m in self.models],
            # every schedule of the matrix (the top-level ones, then models' own), in the order reports use
            "r": list(dict.fromkeys(r_label(r) for r in self.r + tuple(r for m in self.models for r in m.r or ()))),
            "precisions": list(self.precisions), "backends": list(self.backends),
            "batches": list(self.batches), "threads": list(self.threads),
            "build": {"dynamic_batch": self.dynamic_batch, "merge_impl": self.merge_impl},
            "timing": {**self.timing.for_batch(-1), "per_batch": {b: dict(s) for b, s in self.timing.per_batch}},
            "memory": self.memory,
            "quality": {"images": self.photos, "max_images": self.max_images, "decision_images": self.decision_images},
            "budget": {"top1_agreement": self.budget_top1_agreement, "accuracy_drop": self.budget_accuracy_drop,
                       "cosine": self.budget_cosine},
        }

    def with_weights(self, weights: Optional[str] = None, checkpoint: Optional[Path] = None) -> "BenchConfig":
        """The CLI's ``--weights`` / ``--checkpoint`` replace the weights of every model the harness does not train."""
        if weights is None and checkpoint is None:
            return self
        if checkpoint is not None:
            if not Path(checkpoint).is_file():
                raise UserError(f"--checkpoint {str(checkpoint)!r} does not exist: pass the path of a .pth or .safetensors file")
            if len(self.models) != 1 or self.models[0].train is not None:
                raise UserError("--checkpoint needs a config with exactly one model that is not trained by the harness")
            return replace(self, models=(replace(self.models[0], weights="checkpoint", checkpoint=str(checkpoint)),))
        return replace(self, models=tuple(m if m.train is not None else replace(m, weights=weights, checkpoint=None)
                                          for m in self.models))


def _where(path: Optional[Path], key: str) -> str:
    return f"{path or 'config'}: {key}"


def _check_keys(where: str, data: Mapping[str, Any], allowed) -> None:
    for key in data:
        if key not in allowed:
            raise UserError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")


def _typed(where: str, values: Mapping[str, Any], schema: Mapping[str, Any]) -> Dict[str, Any]:
    _check_keys(where, values, tuple(schema))
    out = {}
    for key, value in values.items():
        expected = schema[key]
        if isinstance(expected, tuple):
            if value not in expected:
                raise UserError(f"{where}.{key} = {value!r}: choose one of {', '.join(expected)}")
        elif expected is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{where}.{key} = {value!r}: expected a number")
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"{where}.{key} = {value!r}: expected a finite number >= 0")
        elif isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
            raise UserError(f"{where}.{key} = {value!r}: expected {expected.__name__}")
        if expected is int and value < 0:
            raise UserError(f"{where}.{key} = {value!r}: expected a non-negative int")
        out[key] = value
    return out


def _int_list(where: str, values: Any, minimum: int = 1, maximum: Optional[int] = None) -> Tuple[int, ...]:
    values = values if isinstance(values, list) else [values]
    top = maximum if maximum is not None else math.inf
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= top for v in values):
        limits = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise UserError(f"{where} = {values!r}: expected a list of ints {limits}")
    return tuple(sorted(set(values)))


def _names(where: str, values: Any, known) -> Tuple[str, ...]:
    values = values if isinstance(values, list) else [values]
    if not values or not all(isinstance(v, str) for v in values):
        raise UserError(f"{where} = {values!r}: expected a list of names ({', '.join(known)})")
    for v in values:
        if v not in known:
            raise UserError(f"{where}: unknown {v!r}; choose from {', '.join(known)}")
    return tuple(dict.fromkeys(values))


def _r_values(where: str, values: Any) -> Tuple[RSpec, ...]:
    values = values if isinstance(values, list) else [values]  # a nested list is one per-block schedule
    out = []
    for v in values:
        if isinstance(v, bool):
            raise UserError(f"{where}: {v!r} is not a schedule: use an int, 'r:inflect' or a list of ints")
        if isinstance(v, int):
            spec: RSpec = parse_r_text(str(v))
        elif isinstance(v, str):
            spec = parse_r_text(v)
        elif isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            spec = parse_r_text(",".join(map(str, v)))
        else:
            raise UserError(f"{where}: {v!r} is not a schedule: use an int, 'r:inflect' or a list of ints")
        out.append(spec)
    labels = [r_label(s) for s in out]
    if "r0" not in labels:
        out.insert(0, 0)  # the baseline every speedup is measured against
    return tuple(dict(zip([r_label(s) for s in out], out)).values())


def _model(where: str, entry: Any) -> ModelConfig:
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or "model" not in entry:
        raise UserError(f"{where}: each model needs at least 'model: NAME'")
    _check_keys(where, entry, _MODEL)
    name = entry["model"]
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}.model = {name!r}: expected a model name (an alias such as vit_b16, or a timm name)")
    weights = entry.get("weights", "random")
    if weights not in ("pretrained", "random"):
        raise UserError(f"{where}.weights = {weights!r}: choose pretrained or random (or checkpoint: PATH)")
    kwargs = entry.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UserError(f"{where}.kwargs must be a mapping of timm arguments, e.g. {{depth: 6}}")
    train = entry.get("train")
    checkpoint = entry.get("checkpoint")
    if train is not None:
        if name not in (DIGITS_ALIAS, DIGITS_MODEL):
            raise UserError(f"{where}.train: only the embedded accuracy case (model: digits_vit) is trained by the harness")
        if checkpoint is not None:
            raise UserError(f"{where}: give either train or checkpoint, not both")
        train = _typed(f"{where}.train", train if isinstance(train, dict) else {}, _TRAIN)
        weights = "trained"
    elif checkpoint is not None:
        if not isinstance(checkpoint, str) or not Path(checkpoint).is_file():
            raise UserError(f"{where}.checkpoint {checkpoint!r} does not exist: give the path of a timm state_dict")
        weights = "checkpoint"
    seed = entry.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise UserError(f"{where}.seed = {seed!r}: expected an int between 0 and 2**64 - 1")
    prop_attn = entry.get("prop_attn", True)
    if not isinstance(prop_attn, bool):
        raise UserError(f"{where}.prop_attn = {prop_attn!r}: expected true or false")
    published = entry.get("published") or {}
    if not isinstance(published, dict):
        raise UserError(f"{where}.published must be a mapping, e.g. {{top1: 82.60, r: 13, source: ...}}")
    return ModelConfig(model=name, weights=weights, seed=seed, checkpoint=checkpoint,
                       kwargs=tuple(sorted(kwargs.items())),
                       train=tuple(sorted(train.items())) if train is not None else None,
                       r=_r_values(f"{where}.r", entry["r"]) if "r" in entry else None, prop_attn=prop_attn,
                       published=tuple(sorted(published.items())), task=_task(f"{where}.task", entry.get("task")))


def _task(where: str, value: Any) -> Task:
    """A model entry's ``task``: a name, or a mapping with ``name`` and the task's options."""
    if value is None:
        return Task()
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise UserError(f"{where} = {value!r}: give a task name (classify, embed, dense, tokens) or "
                        f"{{name: tokens, layer: -2}}")
    options = {k: v for k, v in value.items() if k != "name"}
    known = {f for f in Task.__dataclass_fields__ if f not in ("name", "blocks_run")}
    _check_keys(where, options, tuple(sorted(known)))
    try:
        return as_task(value["name"], **options)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def parse_config(data: Mapping[str, Any], path: Optional[Path] = None) -> BenchConfig:
    """Validate a config mapping; every problem is a one-line :class:`UserError`."""
    if not isinstance(data, dict):
        raise UserError(f"{path or 'config'} must be a YAML mapping (models: ..., r: ..., backends: ...)")
    _check_keys(str(path or "config"), data, _TOP)
    if "models" not in data:
        raise UserError(f"{path or 'config'}: missing 'models' (e.g. models: [{{model: vit_t16, weights: random}}])")
    models = data["models"] if isinstance(data["models"], list) else [data["models"]]
    if not models:
        raise UserError(f"{_where(path, 'models')} is empty")
    parsed = tuple(_model(_where(path, f"models[{i}]"), m) for i, m in enumerate(models))
    if len({m.key for m in parsed}) != len(parsed):
        raise UserError(f"{_where(path, 'models')}: the same model is listed twice")
    chosen = list(_names(_where(path, "precisions"), data.get("precisions", ["fp32"]), precisions()))
    if "fp32" not in chosen:
        chosen.insert(0, "fp32")  # the baseline every speedup is measured against
    timing = _typed(_where(path, "timing"), data.get("timing") or {}, _TIMING)
    per_batch = []
    for batch, settings in (timing.pop("per_batch", None) or {}).items():
        if not isinstance(batch, int) or not isinstance(settings, dict):
            raise UserError(f"{_where(path, 'timing.per_batch')}: expected {{BATCH: {{rounds: N, per_round: N}}}}")
        per_batch.append((batch, tuple(sorted(_typed(_where(path, f"timing.per_batch.{batch}"), settings, _PER_BATCH).items()))))
    timing_cfg = Timing(**timing, per_batch=tuple(sorted(per_batch)))
    check_timing(timing_cfg, _where(path, "timing"))
    build = _typed(_where(path, "build"), data.get("build") or {}, _BUILD)
    quality = _typed(_where(path, "quality"), data.get("quality") or {}, _QUALITY)
    budget = _typed(_where(path, "budget"), data.get("budget") or {}, _BUDGET)
    memory = data.get("memory", True)
    if not isinstance(memory, bool):
        raise UserError(f"{_where(path, 'memory')} = {memory!r}: expected true or false")
    name = data.get("name") or (Path(path).stem if path else "bench")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"{_where(path, 'name')} = {name!r}: use letters, digits, '-', '_' and '.' only")
    return BenchConfig(
        name=name, description=str(data.get("description", "")), models=parsed,
        r=_r_values(_where(path, "r"), data.get("r", [0])), precisions=tuple(chosen),
        backends=_names(_where(path, "backends"), data.get("backends", ["torch"]), tuple(backends())),
        batches=_int_list(_where(path, "batches"), data.get("batches", [1])),
        threads=_int_list(_where(path, "threads"), data.get("threads", [1]), maximum=MAX_THREADS),
        dynamic_batch=build.get("dynamic_batch", True), merge_impl=build.get("merge_impl", "auto"),
        timing=timing_cfg, memory=memory, photos=max(1, quality.get("images", 8)),
        max_images=quality.get("max_images", 2000), decision_images=max(1, quality.get("decision_images", 16)),
        budget_top1_agreement=budget.get("top1_agreement", 0.99), budget_accuracy_drop=budget.get("accuracy_drop", 0.01),
        budget_cosine=budget.get("cosine", 0.99),
        path=str(path) if path else None,
    )


def load_config(path: Path) -> BenchConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--config {str(path)!r} does not exist: pass a benchmark YAML (see benchmarks/)") from None
    except IsADirectoryError:
        raise UserError(f"--config {str(path)!r} is a directory: pass a benchmark YAML file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {str(path)!r} is not valid YAML ({type(exc).__name__}): fix the file") from None
    return parse_config(data, path)


# --- the matrix a config spans: variants (built once) and cells (timed) ----------------------------------------


@dataclass(frozen=True)
class Variant:
    """One model state: built (or patched) and loaded once, timed at every batch size and thread count."""

    model: ModelConfig
    backend: str
    precision: str
    r: RSpec

    @property
    def r_label(self) -> str:
        return r_label(self.r)

    @property
    def id(self) -> str:
        return f"{self.model.key}/{self.backend}/{self.precision}/{self.r_label}"

    @property
    def is_baseline(self) -> bool:
        return self.precision == "fp32" and self.r_label == "r0"


@dataclass(frozen=True)
class Cell:
    variant: Variant
    batch: int
    threads: int

    @property
    def id(self) -> str:
        return f"{self.variant.id}/b{self.batch}/t{self.threads}"

    @property
    def group(self) -> Tuple[str, str, int, int]:
        """Cells of one group are timed side by side (interleaved); speedups are taken within a group."""
        return (self.variant.model.key, self.variant.backend, self.batch, self.threads)


def variants(config: BenchConfig) -> List[Variant]:
    return [Variant(m, b, p, r) for m in config.models for b in config.backends for p in config.precisions
            for r in (m.r if m.r is not None else config.r)]


def cells(config: BenchConfig) -> List[Cell]:
    return [Cell(v, batch, t) for v in variants(config) for t in config.threads for batch in config.batches]
