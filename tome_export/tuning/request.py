"""What a tuning run is asked for, and every check that needs no model: the budget, the target and the precisions
that can run on this machine, the data, the output directory.

Imports no torch at module level; the checks import the target registry and the build's planning, never a model.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from ..bench.config import Timing, check_timing
from ..errors import UserError
from ..tasks import CLASSIFY, Task
from ..targets.base import CalibrationOptions
from ..ownership import survey
from ..resources import MAX_THREADS, check_seed

DIGITS_DATA = "digits"  # --data digits: the embedded case's held-out split
TUNE_SECTION = "tune"  # the manifest section a tuned artifact carries


@dataclass(frozen=True)
class Budget:
    """What a candidate must keep: an accuracy budget (``max_accuracy_drop`` points on labelled images), an
    agreement budget (``min_agreement``, top-1 agreement with fp32 r=0 in [0, 1]) or, for the encoder tasks, a
    cosine budget (``min_cosine``: the task's mean feature cosine with fp32 r=0, :mod:`tome_export.bench.tasks`);
    optionally a latency limit."""

    max_accuracy_drop: Optional[float] = None
    min_agreement: Optional[float] = None
    max_latency_ms: Optional[float] = None
    min_cosine: Optional[float] = None

    @property
    def kind(self) -> str:
        if self.max_accuracy_drop is not None:
            return "accuracy"
        return "cosine" if self.min_cosine is not None else "agreement"

    def describe(self) -> str:
        if self.kind == "accuracy":
            text = (f"at most {self.max_accuracy_drop:g} point(s) of top-1 accuracy lost against fp32 r=0 "
                    f"(images it classifies correctly and the candidate does not)")
        elif self.kind == "cosine":
            text = f"mean feature cosine with fp32 r=0 of at least {self.min_cosine:g}"
        else:
            text = f"top-1 agreement with fp32 r=0 of at least {self.min_agreement:g}"
        if self.max_latency_ms is not None:
            text += f"; median latency at most {self.max_latency_ms:g} ms per batch"
        return text

    def within_quality(self, figures: Mapping[str, Any]) -> bool:
        """Whether a candidate's quality figures (:func:`~.measure.quality_figures`) keep the budget. Accuracy
        counts the images lost: ones that fp32 r=0 classifies correctly and the candidate does not (images it
        happens to fix do not pay for them, so a zero budget means no image lost)."""
        if self.kind == "accuracy":
            return figures["lost_pts"] <= self.max_accuracy_drop + 1e-9
        if self.kind == "cosine":
            return figures["cosine"] >= self.min_cosine - 1e-12
        return figures["top1_agreement"] >= self.min_agreement - 1e-12

    def within_latency(self, median_ms: Optional[float]) -> bool:
        return self.max_latency_ms is None or (median_ms is not None and median_ms <= self.max_latency_ms)

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "max_accuracy_drop_pts": self.max_accuracy_drop,
                "min_top1_agreement": self.min_agreement, "min_cosine": self.min_cosine,
                "max_latency_ms": self.max_latency_ms, "description": self.describe()}


# How the finalists are timed side by side: the bench's interleaved-timing settings.
TimingSettings = Timing


@dataclass(frozen=True)
class TuneRequest:
    """A tuning run: the model, the target, the budget and the search's limits (CLI flags or Python)."""

    model: str
    target: str
    output: Path
    budget: Budget
    data: Optional[str] = None  # an ImageFolder, or "digits"; needed by an accuracy budget
    weights: str = "pretrained"
    checkpoint: Optional[Path] = None
    seed: int = 0
    batch: int = 1
    threads: Optional[int] = None  # None: every CPU of this machine
    precisions: Optional[Tuple[str, ...]] = None  # None: every precision the target can run here
    time_budget_min: float = 30.0
    eval_images: int = 64  # agreement budget: calibration-like images to compare on
    max_images: int = 1000  # accuracy budget: at most this many labelled images (evenly spaced)
    calib_data: Optional[Path] = None  # int8 calibration and agreement images (default: the bundled photos)
    cache: Optional[Path] = None  # built candidates (default: tome-export's cache directory)
    tie_tolerance: float = 0.03  # throughputs closer than this (relative) are a tie
    timing: TimingSettings = TimingSettings()
    force: bool = False
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # architecture arguments (e.g. depth)
    train: Optional[Mapping[str, Any]] = None  # the digits case: training settings (default: the bench's)
    task: Task = Task()  # what the artifact computes (tome_export.tasks); not classify: a --min-cosine budget

    @property
    def resolved_threads(self) -> int:
        import os

        return self.threads if self.threads is not None else (os.cpu_count() or 1)


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every cheap check: the precisions to search and those left out, with why."""

    request: TuneRequest
    precisions: Tuple[str, ...]
    left_out: Dict[str, str]  # precision -> why it is not searched


def _finite(name: str, value: Optional[float], low: float, high: float, unit: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise UserError(f"{name} {value:g} is out of range: give {unit}")


def check_budget(request: TuneRequest) -> None:
    """Exactly one quality budget that fits the task, in range, with the data it needs."""
    b = request.budget
    given = [v for v in (b.max_accuracy_drop, b.min_agreement, b.min_cosine) if v is not None]
    classify = request.task.name == CLASSIFY
    if len(given) != 1:
        raise UserError("give exactly one budget: --max-accuracy-drop PTS (with --data) or --min-agreement A"
                        if classify else f"give one budget: --min-cosine C (--task {request.task.name})")
    if classify and b.kind == "cosine":
        raise UserError("--min-cosine is the budget of --task embed, dense and tokens: a classifier takes "
                        "--min-agreement A or --max-accuracy-drop PTS")
    if not classify and b.kind != "cosine":
        raise UserError(f"--task {request.task.name} has no top-1 to agree on or lose: give --min-cosine C (its "
                        f"mean feature cosine with fp32 r=0, e.g. 0.99)")
    _finite("--max-accuracy-drop", b.max_accuracy_drop, 0.0, 100.0, "points of top-1 accuracy in [0, 100]")
    _finite("--min-agreement", b.min_agreement, 0.0, 1.0, "a top-1 agreement fraction in [0, 1], e.g. 0.99")
    _finite("--min-cosine", b.min_cosine, -1.0, 1.0, "a cosine in [-1, 1], e.g. 0.99")
    _finite("--max-latency-ms", b.max_latency_ms, 1e-6, math.inf, "milliseconds per batch, above 0")
    if b.kind == "accuracy" and request.data is None:
        raise UserError("--max-accuracy-drop needs labelled images: --data DIR (an ImageFolder) or --data digits")
    if b.kind != "accuracy" and request.data is not None:
        raise UserError(f"--data measures accuracy: use it with --max-accuracy-drop, or drop it for "
                        f"{'--min-cosine' if b.kind == 'cosine' else '--min-agreement'}")
    _finite("--time-budget", request.time_budget_min, 1e-3, 7 * 24 * 60.0, "minutes, above 0")
    _finite("--tie-tolerance", request.tie_tolerance, 0.0, 0.5, "a relative throughput difference in [0, 0.5]")


# Upper bounds of the sizes a tuning run takes: beyond them a run cannot finish (or fit) on any machine.
SIZE_LIMITS = {"--batch": 65536, "--threads": MAX_THREADS, "--eval-images": 4096, "--max-images": 1_000_000}


def _check_sizes(request: TuneRequest) -> None:
    for name, value in (("--batch", request.batch), ("--threads", request.threads),
                        ("--eval-images", request.eval_images), ("--max-images", request.max_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= SIZE_LIMITS[name]):
            raise UserError(f"{name} must be an integer from 1 to {SIZE_LIMITS[name]:,}, got {value!r}")
    check_seed(request.seed)
    check_timing(request.timing, "timing")


def _check_cache(request: TuneRequest) -> None:
    """The cache of built candidates: a directory, or a path where one can be made."""
    if request.cache is None:
        return
    cache = Path(request.cache)
    if cache.exists() and not cache.is_dir():
        raise UserError(f"--cache {str(cache)!r} exists and is not a directory: pass a directory for the built "
                        f"candidates")
    probe = cache
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--cache {str(cache)!r}: cannot write under {str(probe)!r}; pass a writable directory")


def _check_data(request: TuneRequest) -> None:
    from ..bench.config import DIGITS_ALIAS, DIGITS_MODEL

    digits_model = request.model in (DIGITS_ALIAS, DIGITS_MODEL)
    trains_digits = digits_model and request.checkpoint is None and request.weights != "random"
    if (trains_digits or request.data == DIGITS_DATA) and importlib.util.find_spec("sklearn") is None:
        raise UserError("the embedded digits case needs scikit-learn: pip install 'tome-export[bench]'")
    if request.data is None:
        return
    if request.data == DIGITS_DATA:
        if not digits_model:
            raise UserError(f"--data digits is the held-out split of the embedded digits model: use it with "
                            f"--model {DIGITS_ALIAS}, or pass an ImageFolder")
    elif not Path(request.data).is_dir():
        raise UserError(f"--data {request.data!r} is not a directory: pass an ImageFolder (DIR/<class>/<image>) "
                        f"or 'digits'")
    if request.weights == "random" and request.checkpoint is None:
        raise UserError("--max-accuracy-drop measures accuracy, which random weights do not have: pass "
                        "--weights pretrained or --checkpoint PATH")


def _runnable_precisions(request: TuneRequest) -> Tuple[Tuple[str, ...], Dict[str, str]]:
    """The precisions to search (every one the target can run here, or the requested ones) and why others are
    left out. A requested precision that cannot run here is an error."""
    from ..devices import gpu_available
    from ..pipeline import BuildRequest, plan_build
    from ..targets import get_target

    target = get_target(request.target)
    missing = target.missing_module()
    if missing is not None:
        raise UserError(f"--target {target.name} needs the Python package {missing!r}, which is not installed: "
                        f"{target.install_hint}")
    if target.device == "cuda" and not gpu_available():
        raise UserError(f"tune times candidates on this machine, and --target {target.name} runs on an NVIDIA GPU; "
                        f"none is available here: choose a CPU target (onnxruntime, openvino)")
    wanted = request.precisions or target.precisions
    unknown = [p for p in wanted if p not in target.precisions]
    if unknown:
        raise UserError(f"--precisions {','.join(unknown)} not offered by --target {target.name}; choose from "
                        f"{', '.join(target.precisions)}")
    runnable, left_out = [], {}
    calib = {"calib_data": str(request.calib_data)} if request.calib_data is not None else {}
    for precision in dict.fromkeys(wanted):
        try:
            plan_build(BuildRequest(model=request.model, target=target.name, precision=precision,
                                    batch=request.batch, target_options=calib, task=request.task))
            runnable.append(precision)
        except UserError as exc:
            if request.precisions:
                raise
            left_out[precision] = str(exc)
    if not runnable:
        raise UserError(f"--target {target.name} can run none of its precisions here: "
                        + "; ".join(f"{p}: {why}" for p, why in left_out.items()))
    return tuple(runnable), left_out


def check_output(out: Path, force: bool) -> None:
    """The output may be new, empty, or an earlier tuned artifact (``--force``: anything tome-export wrote)."""
    out = Path(out)
    probe = out.parent if str(out.parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write under {str(probe)!r}: choose another --output")
    found = survey(out)
    if found.manifest is None and found.foreign:
        raise UserError(f"--output {str(out)!r} holds {found.foreign_text()}, which tome-export did not write: "
                        f"choose another --output")
    tuned = found.manifest is not None and found.manifest.section(TUNE_SECTION) is not None
    if found.manifest is not None and not tuned and not force:
        raise UserError(f"--output {str(out)!r} holds a build that tune did not write: choose another --output or "
                        f"pass --force to replace it")
    if found.foreign and not force:
        raise UserError(f"--output {str(out)!r} holds {found.foreign_text()}, which tome-export did not write: move "
                        f"it away or choose another --output (--force replaces only tome-export's own files)")


def check_request(request: TuneRequest) -> CheckedRequest:
    """Every check that needs no model; the precisions to search."""
    check_budget(request)
    _check_sizes(request)
    _check_cache(request)
    if request.checkpoint is not None and not Path(request.checkpoint).is_file():
        raise UserError(f"checkpoint {str(request.checkpoint)!r} does not exist: pass the path of a .pth or "
                        f".safetensors file")
    CalibrationOptions(calib_data=str(request.calib_data) if request.calib_data is not None else None).check()
    _check_data(request)
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("the tuning report's plot needs matplotlib: pip install 'tome-export[bench]'")
    check_output(Path(request.output), request.force)
    precisions, left_out = _runnable_precisions(request)
    return CheckedRequest(request, precisions, left_out)


def parse_precisions(text: Optional[str]) -> Optional[Tuple[str, ...]]:
    """``fp32,int8`` -> ("fp32", "int8"); None stays None."""
    if text is None:
        return None
    values = tuple(p.strip() for p in text.split(",") if p.strip())
    if not values:
        raise UserError("--precisions needs at least one precision, e.g. --precisions fp32,int8")
    return values


def precision_order(precisions: Sequence[str]) -> Tuple[str, ...]:
    """fp32 first (the baseline and the search's bound), then the others as given."""
    return tuple(dict.fromkeys(["fp32", *precisions])) if "fp32" in precisions else tuple(precisions)
