"""What the search's probes measure: the model and its fp32 r=0 reference, the evaluation images, eager fp32
screens, candidates built (once, cached) and evaluated through their own runners, and the final side-by-side
timing of every built candidate. The time budget is enforced here: a probe that would not leave room for the
final timing and the output raises :class:`~.search.OutOfTime`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from ..errors import UserError, ValidationError
from ..manifest import MANIFEST, read_manifest
from ..pipeline import BuildRequest, build
from ..bench import quality as bench_quality
from ..bench.tasks import task_fidelity
from ..bench.config import DIGITS_ALIAS, DIGITS_MODEL, ModelConfig
from ..bench.subjects import ArtifactSubject, LoadedModel, TorchSubject, load_model
from ..bench.timing import measure_interleaved
from ..quality.calibration import BUNDLED, calibration_batches
from ..tasks import Task
from .request import DIGITS_DATA, CheckedRequest, TuneRequest
from .search import Candidate, OutOfTime, Schedule, Shape

Log = Callable[[str], None]
# The embedded digits case's training when no checkpoint is given (the benchmark's settings).
DIGITS_TRAINING: Dict[str, Any] = {"epochs": 40, "lr": 3e-4, "seed": 0}
OUTPUT_SECONDS = 5.0  # reserved for copying the winner, the report and its plot
LOAD_SECONDS = 3.0  # reserved per candidate for opening its runner again for the final timing


@dataclass
class Evaluation:
    """One candidate (or eager screen) and what was measured of it."""

    candidate: Candidate
    quality: Dict[str, Any]
    within: bool  # within the quality budget
    order: int  # the search's probe number (1 = first)
    seconds: float  # build (unless cached) and quality pass
    status: str = "evaluated"  # evaluated | failed
    reason: Optional[str] = None
    directory: Optional[Path] = None
    cached: bool = False
    batch_ms_hint: float = 0.0  # from the quality pass: sizes the time reserve, never reported as a measurement
    timing: Dict[str, Any] = field(default_factory=dict)


def model_config(request: TuneRequest) -> ModelConfig:
    """The bench's model entry for the request (the digits model is trained, seeded and cached, unless a
    checkpoint or random weights are asked for)."""
    digits = request.model in (DIGITS_ALIAS, DIGITS_MODEL)
    train = None
    if digits and request.checkpoint is None and request.weights != "random":
        train = tuple(sorted({**DIGITS_TRAINING, **(request.train or {})}.items()))
    weights = "trained" if train else "checkpoint" if request.checkpoint is not None else request.weights
    return ModelConfig(model=request.model, weights=weights, seed=request.seed,
                       checkpoint=str(request.checkpoint) if request.checkpoint is not None else None,
                       kwargs=tuple(sorted(request.model_kwargs.items())), train=train)


def default_cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "tome-export" / "tune"


def eval_set(request: TuneRequest, loaded: LoadedModel, digits_seed: int) -> bench_quality.EvalSet:
    """Labelled images for an accuracy budget; calibration-style images for an agreement budget (augmented with
    another seed than int8 calibration uses, so they are not the very images a quantizer saw)."""
    if request.data == DIGITS_DATA:
        return bench_quality.digits_set(digits_seed)
    if request.data is not None:
        return bench_quality.imagefolder_set(Path(request.data), loaded.preprocessing, loaded.info.num_classes,
                                             request.max_images)
    batches = calibration_batches(loaded.preprocessing, request.eval_images, 1, data_dir=request.calib_data,
                                  augment=True, seed=request.seed + 1)
    source = str(request.calib_data) if request.calib_data is not None else BUNDLED
    return bench_quality.EvalSet(f"{request.eval_images} calibration-style images from {source} (augmented, "
                                 f"seed {request.seed + 1}; unlabelled)", np.concatenate(batches))


def task_figures(task: str, reference: Dict[str, np.ndarray], outputs: Dict[str, np.ndarray],
                 labels: Optional[np.ndarray]) -> Dict[str, Any]:
    """A candidate's quality figures for its task: :func:`quality_figures` of a classifier's logits, else the
    task's fidelity (:func:`~tome_export.bench.tasks.task_fidelity`, its ``cosine`` is what the budget limits)."""
    if task == "classify":
        return quality_figures(reference["logits"], outputs["logits"], labels)
    return task_fidelity(task, reference, outputs)


def quality_figures(reference: np.ndarray, logits: np.ndarray, labels: Optional[np.ndarray]) -> Dict[str, Any]:
    """Fidelity to fp32 r=0 (top-1 agreement, logit cosine) and, with labels, accuracy: the net drop in points
    and the images fp32 r=0 classifies correctly that the candidate does not (``lost``)."""
    fid = bench_quality.fidelity(reference, logits)
    figures: Dict[str, Any] = {k: fid[k] for k in ("top1_agreement", "top1_interval_95", "mean_cosine", "min_cosine",
                                                   "images")}
    if labels is not None:
        ref_ok, ok = reference.argmax(1) == labels, logits.argmax(1) == labels
        lost = int((ref_ok & ~ok).sum())
        figures.update(accuracy=float(ok.mean()), accuracy_drop_pts=100.0 * float(ref_ok.mean() - ok.mean()),
                       lost_images=lost, lost_pts=100.0 * lost / len(labels))
    return figures


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return f"validation failed: {exc}"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return first if isinstance(exc, UserError) else f"{type(exc).__name__}: {first}".rstrip(": ")


class Workbench:
    """The model, its reference and every measurement of one tuning run."""

    def __init__(self, checked: CheckedRequest, log: Log, clock: Callable[[], float] = time.perf_counter,
                 started: Optional[float] = None) -> None:
        """``started``: when the run began on ``clock`` (the time budget counts from there; default now)."""
        self.request, self.clock, self.log = checked.request, clock, log
        self.started = clock() if started is None else started
        self.deadline = self.started + 60.0 * self.request.time_budget_min
        self.config = model_config(self.request)
        self.say("loading the model" + (" (training the digits model the first time)" if self.config.train else ""))
        self.loaded = load_model(self.config, log=self.say)
        info = self.loaded.info
        self.shape = Shape(info.num_blocks, info.num_tokens, info.num_protected)
        self.eval = eval_set(self.request, self.loaded, dict(self.config.train or ()).get("seed", 0))
        self.say(f"reference: fp32 r=0 PyTorch on {self.eval.name}")
        self.task = self.request.task
        self.reference = self._eager(0).predict_outputs(self.eval.images)
        self.cache = Path(self.request.cache) if self.request.cache is not None else default_cache()
        self.screens: Dict[Tuple[int, ...], Evaluation] = {}
        self.evaluations: Dict[Tuple[str, Tuple[int, ...]], Evaluation] = {}
        self.probes = 0

    # --- time -----------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return self.clock() - self.started

    def say(self, message: str) -> None:
        minutes, seconds = divmod(int(self.clock() - self.started), 60)
        self.log(f"[{minutes:02d}:{seconds:02d}] {message}")

    def _timing_seconds(self, batch_ms: float) -> float:
        t = self.request.timing
        return batch_ms / 1000.0 * (t.warmup + t.rounds * (t.per_round + 1)) + t.rounds * t.pause_s + LOAD_SECONDS

    def reserve(self, extra_candidates: int = 0) -> float:
        """Seconds kept for timing every built candidate (and ``extra_candidates`` more) and writing the output."""
        built = [e for e in self.evaluations.values() if e.status == "evaluated"]
        hint = max((e.batch_ms_hint for e in built), default=0.0)
        return (sum(self._timing_seconds(e.batch_ms_hint) for e in built)
                + extra_candidates * self._timing_seconds(hint) + OUTPUT_SECONDS)

    def _make_room(self, estimate: float, what: str) -> None:
        left = self.deadline - self.clock()
        if estimate + self.reserve(extra_candidates=1) > left:
            raise OutOfTime(f"time budget: {what} (about {estimate:.0f} s) would not leave room for the final timing "
                            f"({left:.0f} s left)")

    def _estimate(self, precision: str) -> float:
        fresh = [e.seconds for e in self.evaluations.values() if not e.cached]
        same = [e.seconds for e in self.evaluations.values() if not e.cached and e.candidate.precision == precision]
        return sum(same) / len(same) if same else max(fresh, default=0.0)

    # --- probes ---------------------------------------------------------------------------------------------

    def _eager(self, r: Any) -> TorchSubject:
        return TorchSubject(self.loaded.model, r, "fp32", task=self.task)

    def _figures(self, outputs: Dict[str, np.ndarray]) -> Tuple[Dict[str, Any], bool]:
        figures = task_figures(self.task.name, self.reference, outputs, self.eval.labels)
        return figures, self.request.budget.within_quality(figures)

    def screen(self, schedule: Schedule) -> bool:
        """Eager fp32 PyTorch at ``schedule``: within the quality budget? (No build; bounds the search.)"""
        if schedule.blocks not in self.screens:
            last = max((e.seconds for e in self.screens.values()), default=0.0)
            self._make_room(last, f"screening {schedule.label}")
            started = self.clock()
            outputs = self._eager(list(schedule.blocks)).predict_outputs(self.eval.images)
            figures, within = self._figures(outputs)
            self.probes += 1
            self.screens[schedule.blocks] = Evaluation(Candidate("fp32", schedule), figures, within, self.probes,
                                                       self.clock() - started)
            self.say(f"screen fp32 eager {schedule.label}: {self.describe(figures)} -> "
                     f"{'within' if within else 'outside'} the budget")
        return self.screens[schedule.blocks].within

    def probe(self, candidate: Candidate, force: bool = False) -> bool:
        """Build ``candidate`` (or take it from the cache) and measure its quality through its runner."""
        key = (candidate.precision, candidate.schedule.blocks)
        if key not in self.evaluations:
            if not force:
                self._make_room(self._estimate(candidate.precision), f"building {candidate.key}")
            self.evaluations[key] = self._evaluate(candidate)
        return self.evaluations[key].within

    def _evaluate(self, candidate: Candidate) -> Evaluation:
        started = self.clock()
        self.probes += 1
        try:
            directory, cached = self._build(candidate)
            subject = ArtifactSubject(directory, self.request.resolved_threads, cached=cached)
            try:
                predicted = self.clock()
                outputs = subject.predict_outputs(self.eval.images)
                batches = math.ceil(len(self.eval.images) / (subject.static_batch or 64))
                batch_ms = 1000.0 * (self.clock() - predicted) / batches
            finally:
                subject.close()
        except Exception as exc:  # a candidate that cannot be built or run loses; the search goes on
            reason = _failure_reason(exc)
            self.say(f"{candidate.key}: failed ({reason})")
            return Evaluation(candidate, {}, False, self.probes, self.clock() - started, "failed", reason)
        figures, within = self._figures(outputs)
        self.say(f"{candidate.key}{' (cached)' if cached else ''}: {self.describe(figures)} -> "
                 f"{'within' if within else 'outside'} the budget")
        return Evaluation(candidate, figures, within, self.probes, self.clock() - started, directory=directory,
                          cached=cached, batch_ms_hint=batch_ms)

    def describe(self, figures: Dict[str, Any]) -> str:
        if "top1_agreement" not in figures and "cosine" in figures:
            return f"mean {self.task.name} cosine {figures['cosine']:.4f}"
        if "lost_images" in figures:
            return (f"accuracy {100 * figures['accuracy']:.2f}% (lost {figures['lost_images']} images = "
                    f"{figures['lost_pts']:.2f} pts, net drop {figures['accuracy_drop_pts']:+.2f})")
        return f"top-1 agreement {figures['top1_agreement']:.3f}, mean cosine {figures['mean_cosine']:.4f}"

    def artifact_dir(self, candidate: Candidate) -> Path:
        r = request_r_label(candidate.schedule)
        task = "" if self.task == Task() else f"-{self.task.name}-{_task_digest(self.task)}"
        return self.cache / (f"{self.config.key}{task}-{self.request.target}-{candidate.precision}-{r}"
                             f"-b{self.request.batch}")

    def _build(self, candidate: Candidate) -> Tuple[Path, bool]:
        """The candidate's artifact directory in the cache, built through the normal pipeline when missing."""
        out = self.artifact_dir(candidate)
        if (out / MANIFEST).is_file():
            try:
                read_manifest(out, verify=True)
                return out, True
            except UserError:  # an edited or damaged cache entry is built again
                shutil.rmtree(out, ignore_errors=True)
        args, request = self.loaded.create_args, self.request
        self.say(f"building {candidate.key}")
        options = {"calib_data": str(request.calib_data)} if request.calib_data is not None else {}
        build(BuildRequest(
            model=args["name"], r=candidate.schedule.r, target=request.target, precision=candidate.precision,
            batch=request.batch, output=out, weights="random" if args["checkpoint"] else args["weights"],
            checkpoint=args["checkpoint"], seed=args["seed"], model_kwargs=dict(args["kwargs"]),
            target_options=options, force=True, task=self.task),
            log=lambda msg: None, warn=lambda msg: self.say(f"{candidate.key}: warning: {msg}"))
        return out, False

    # --- timing ---------------------------------------------------------------------------------------------

    def time_built(self) -> Dict[str, Any]:
        """Every built candidate timed side by side, interleaved (fills each evaluation's ``timing``); returns
        what the measurement shares (settings, load averages, how many ran)."""
        built = [e for e in self.evaluations.values() if e.status == "evaluated"]
        request = self.request
        x = np.ascontiguousarray(self.eval.images[np.arange(request.batch) % len(self.eval.images)])
        subjects: Dict[str, ArtifactSubject] = {}
        runs = {}
        try:
            for e in built:
                try:
                    subject = ArtifactSubject(e.directory, request.resolved_threads, cached=True)
                    subjects[e.candidate.key] = subject
                    runs[e.candidate.key] = subject.timed(x)
                    runs[e.candidate.key]()  # one that cannot run this batch fails alone, before the clock starts
                except Exception as exc:
                    runs.pop(e.candidate.key, None)
                    e.timing = {"error": _failure_reason(exc)}
            self.say(f"timing {len(runs)} candidates side by side at batch {request.batch}, "
                     f"{request.resolved_threads} thread(s)")
            load_before = list(os.getloadavg())
            timings = measure_interleaved(runs, **request.timing.for_batch(request.batch))
            load_after = list(os.getloadavg())
        finally:
            for subject in subjects.values():
                subject.close()
        for e in built:
            if e.candidate.key in timings:
                e.timing = timings[e.candidate.key].summary(request.batch)
        return {**request.timing.for_batch(request.batch), "interleaved": len(runs), "batch": request.batch,
                "threads": request.resolved_threads, "load_average": {"before": load_before, "after": load_after}}


def _task_digest(task: Any) -> str:
    """A short id of a task and its options (cache directories of different options differ)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(task.to_dict(), sort_keys=True).encode()).hexdigest()[:6]


def request_r_label(schedule: Schedule) -> str:
    """The directory label of a schedule (r=0 of every family is one build)."""
    return "r0" if not schedule.merges else schedule.label
