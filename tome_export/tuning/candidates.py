"""A tuning candidate's work, wherever it runs: built once (cached), its quality measured through its own runner, and
the built candidates timed side by side. Plain data goes in and out (figures, checksums, where the files are), so
that a cluster's worker can do the work (:mod:`tome_export.bench.executors`) as well as this process.

Artifacts stay where they were built. The final timing needs every candidate on its node, and the winner is written
here, so a candidate is found again by the sha256 of its files (:func:`artifact_identity`): where its directory holds
the same bytes (this machine, or a ``--cache`` on a disk every node shares) it is used as it is; elsewhere it is built
again, which gives the same bytes (builds are deterministic), and the checksums say so or the run stops.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from ..bench import quality as bench_quality
from ..bench.harness import node_facts
from ..bench.subjects import ArtifactSubject, waiting_lock
from ..bench.tasks import task_fidelity
from ..bench.timing import measure_interleaved
from ..errors import UserError, ValidationError
from ..manifest import MANIFEST, load_manifest, read_manifest
from ..pipeline import BuildRequest, build
from ..preprocess import Preprocessing
from ..quality.calibration import BUNDLED, calibration_batches
from ..tasks import Task
from .request import DIGITS_DATA, TuneRequest
from .search import Candidate, Schedule

Say = Callable[[str], None]


def default_cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "tome-export" / "tune"


@dataclass(frozen=True)
class Setting:
    """What every job of one tuning run shares."""

    request: TuneRequest
    create_args: Dict[str, Any]  # how the model is made (a build makes it again from these)
    model_key: str  # the bench's key of the model entry (names cached builds)
    preprocessing: Preprocessing
    num_classes: int
    digits_seed: int
    verbose: bool = False  # a cluster's worker says each step on stderr (in this process the tuner listens)

    def cache(self) -> Path:
        """Where candidates are built, on the machine that runs the job: a named ``--cache`` is one path everywhere
        (a shared disk, or each machine's own), the default each machine's own cache."""
        return Path(self.request.cache) if self.request.cache is not None else default_cache()

    @property
    def eval_key(self) -> Tuple[Any, ...]:
        r = self.request
        return (self.model_key, r.data, r.max_images, r.eval_images, str(r.calib_data), r.seed, self.digits_seed)


@dataclass(frozen=True)
class ProbeWork:
    setting: Setting
    candidate: Candidate
    reference: Dict[str, np.ndarray]  # fp32 r=0 outputs of the task, by name, on the evaluation images


@dataclass(frozen=True)
class TimingWork:
    setting: Setting
    built: Tuple[Tuple[Candidate, str, Dict[str, str]], ...]  # candidate, directory where it was built, identity


# --- quality --------------------------------------------------------------------------------------------------


def eval_set(request: TuneRequest, preprocessing: Preprocessing, num_classes: int,
             digits_seed: int) -> bench_quality.EvalSet:
    """Labelled images for an accuracy budget; calibration-style images for an agreement budget (augmented with
    another seed than int8 calibration uses, so they are not the very images a quantizer saw)."""
    if request.data == DIGITS_DATA:
        return bench_quality.digits_set(digits_seed)
    if request.data is not None:
        return bench_quality.imagefolder_set(Path(request.data), preprocessing, num_classes, request.max_images)
    batches = calibration_batches(preprocessing, request.eval_images, 1, data_dir=request.calib_data,
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


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return f"validation failed: {exc}"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return first if isinstance(exc, UserError) else f"{type(exc).__name__}: {first}".rstrip(": ")


_eval_sets: Dict[Tuple[Any, ...], bench_quality.EvalSet] = {}  # this process's evaluation images, per run setting
_listener: Optional[Say] = None  # the tuner of this process, while it runs jobs here


@contextmanager
def listening(setting: Setting, images: bench_quality.EvalSet, say: Say) -> Iterator[None]:
    """Jobs run in this process use the tuner's evaluation images and report to it."""
    global _listener
    _eval_sets.clear()
    _eval_sets[setting.eval_key] = images
    _listener = say
    try:
        yield
    finally:
        _listener = None
        _eval_sets.clear()


def _images(setting: Setting) -> bench_quality.EvalSet:
    if setting.eval_key not in _eval_sets:
        _eval_sets.clear()  # one run's images at a time
        _eval_sets[setting.eval_key] = eval_set(setting.request, setting.preprocessing, setting.num_classes,
                                                setting.digits_seed)
    return _eval_sets[setting.eval_key]


def _say(setting: Setting) -> Say:
    if _listener is not None:
        return _listener
    if setting.verbose:
        return lambda msg: print(f"tune [worker]: {msg}", file=sys.stderr, flush=True)
    return lambda msg: None


# --- builds ---------------------------------------------------------------------------------------------------


def request_r_label(schedule: Schedule) -> str:
    """The directory label of a schedule (r=0 of every family is one build)."""
    return "r0" if not schedule.merges else schedule.label


def _task_digest(task: Task) -> str:
    """A short id of a task and its options (cache directories of different options differ)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(task.to_dict(), sort_keys=True).encode()).hexdigest()[:6]


def candidate_dir(setting: Setting, candidate: Candidate) -> Path:
    r, request = request_r_label(candidate.schedule), setting.request
    task = "" if request.task == Task() else f"-{request.task.name}-{_task_digest(request.task)}"
    return setting.cache() / (f"{setting.model_key}{task}-{request.target}-{candidate.precision}-{r}"
                               f"-b{request.batch}")


def build_candidate(setting: Setting, candidate: Candidate, say: Say) -> Tuple[Path, bool]:
    """The candidate's artifact directory in this machine's cache, built through the normal pipeline when missing
    (or damaged); returns (directory, found in the cache)."""
    out = candidate_dir(setting, candidate)
    with waiting_lock(out.parent / f".{out.name}.wait"):
        if (out / MANIFEST).is_file():
            try:
                read_manifest(out, verify=True)
                return out, True
            except UserError:  # an edited or damaged cache entry is built again
                shutil.rmtree(out, ignore_errors=True)
        args, request = setting.create_args, setting.request
        say(f"building {candidate.key}")
        options = {"calib_data": str(request.calib_data)} if request.calib_data is not None else {}
        build(BuildRequest(
            model=args["name"], r=candidate.schedule.r, target=request.target, precision=candidate.precision,
            batch=request.batch, output=out, weights="random" if args["checkpoint"] else args["weights"],
            checkpoint=args["checkpoint"], seed=args["seed"], model_kwargs=dict(args["kwargs"]),
            target_options=options, force=True, task=request.task),
            log=lambda msg: None, warn=lambda msg: say(f"{candidate.key}: warning: {msg}"))
    return out, False


_GENERATED_NAME = re.compile(rb'( name="[A-Za-z][A-Za-z0-9]*_)\d+(")')


def artifact_identity(directory: Path) -> Dict[str, str]:
    """The sha256 of every file of a build, from its manifest. An OpenVINO IR's XML (beside a ``.bin`` of the same
    name) is hashed with the numbers of generated layer names left out: OpenVINO numbers them with a counter of its
    process, so one graph built in two processes differs there, and only there."""
    import hashlib

    table = load_manifest(directory, verify=False).artifacts
    identity = {rel: entry["sha256"] for rel, entry in table.items()}
    for rel in identity:
        path = Path(directory) / rel
        if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
            identity[rel] = "ir:" + hashlib.sha256(_GENERATED_NAME.sub(rb"\1#\2", path.read_bytes())).hexdigest()
    return identity


def local_artifact(setting: Setting, candidate: Candidate, identity: Dict[str, str], built_at: Path,
                   say: Say) -> Tuple[Path, bool]:
    """The candidate's files on this machine: where it was built, when that directory holds the same bytes here;
    else built again here and checked against ``identity``. Returns (directory, built again)."""
    if (built_at / MANIFEST).is_file() and artifact_identity(built_at) == identity:
        return built_at, False
    directory, cached = build_candidate(setting, candidate, say)
    found = artifact_identity(directory)
    if found != identity:
        differ = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
        raise ValidationError(f"{candidate.key} built on this machine differs from the build that was measured "
                              f"({', '.join(differ)}: other sha256): name a --cache on a disk every node shares, so "
                              f"the measured files themselves are used")
    return directory, not cached


# --- the jobs -------------------------------------------------------------------------------------------------


def evaluate_candidate(work: ProbeWork) -> Dict[str, Any]:
    """Build a candidate (or find it built) and measure its quality through its runner."""
    started, setting, say = time.perf_counter(), work.setting, _say(work.setting)
    images = _images(setting)
    try:
        directory, cached = build_candidate(setting, work.candidate, say)
        subject = ArtifactSubject(directory, setting.request.resolved_threads, cached=cached)
        try:
            predicted = time.perf_counter()
            outputs = subject.predict_outputs(images.images)
            batches = math.ceil(len(images.images) / (subject.static_batch or 64))
            batch_ms = 1000.0 * (time.perf_counter() - predicted) / batches
        finally:
            subject.close()
        identity = artifact_identity(directory)
    except Exception as exc:  # a candidate that cannot be built or run loses; the search goes on
        return {"status": "failed", "reason": failure_reason(exc), "seconds": time.perf_counter() - started}
    quality = task_figures(setting.request.task.name, work.reference, outputs, images.labels)
    return {"status": "evaluated", "quality": quality,
            "directory": str(directory), "cached": cached, "batch_ms_hint": batch_ms, "identity": identity,
            "node": node_facts(), "seconds": time.perf_counter() - started}


def time_candidates(work: TimingWork) -> Dict[str, Any]:
    """Every built candidate timed side by side, interleaved, on this machine (those built elsewhere are built
    again here first); per candidate its timing or why it has none."""
    setting, say = work.setting, _say(work.setting)
    request, images = setting.request, _images(setting)
    x = np.ascontiguousarray(images.images[np.arange(request.batch) % len(images.images)])
    threads = request.resolved_threads
    subjects: Dict[str, ArtifactSubject] = {}
    runs, errors, rebuilt = {}, {}, []
    try:
        for candidate, built_at, identity in work.built:
            try:
                directory, again = local_artifact(setting, candidate, identity, Path(built_at), say)
                rebuilt += [candidate.key] if again else []
                subjects[candidate.key] = ArtifactSubject(directory, threads, cached=True)
                runs[candidate.key] = subjects[candidate.key].timed(x)
                runs[candidate.key]()  # one that cannot run this batch fails alone, before the clock starts
            except Exception as exc:
                runs.pop(candidate.key, None)
                errors[candidate.key] = failure_reason(exc)
        load_before = list(os.getloadavg())
        timings = measure_interleaved(runs, **request.timing.for_batch(request.batch))
        load_after = list(os.getloadavg())
    finally:
        for subject in subjects.values():
            subject.close()
    return {"timings": {k: t.summary(request.batch) for k, t in timings.items()}, "errors": errors,
            "rebuilt": rebuilt, "threads": threads, "load_average": {"before": load_before, "after": load_after},
            "node": node_facts()}
