"""What the search's probes measure: the model and its fp32 r=0 reference, the evaluation images, eager fp32
screens, candidates built (once, cached) and evaluated through their own runners, and the final side-by-side
timing of every built candidate. Builds, quality passes and the timing are jobs (:mod:`.candidates`) that an
executor runs: in this process, or on a cluster, where builds run on any node, the search's next probes may
start before they are asked for (:meth:`Workbench.look_ahead`), and the timing has a node to itself. The time
budget is enforced here: a probe that would not leave room for the final timing and the output raises
:class:`~.search.OutOfTime`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..bench.config import DIGITS_ALIAS, DIGITS_MODEL, ModelConfig
from ..bench.executors import Executor, Job, Outcome
from ..bench.subjects import TorchSubject, load_model
from .candidates import (ProbeWork, Setting, TimingWork, default_cache, eval_set, evaluate_candidate, failure_reason,
                         local_artifact, quality_figures, request_r_label, task_figures,
                         time_candidates)
from .request import CheckedRequest, TuneRequest
from .search import Candidate, OutOfTime, Schedule, Shape

__all__ = ["Evaluation", "Workbench", "default_cache", "eval_set", "model_config", "quality_figures",
           "request_r_label"]

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
    directory: Optional[Path] = None  # on the machine that built it
    cached: bool = False
    batch_ms_hint: float = 0.0  # from the quality pass: sizes the time reserve, never reported as a measurement
    timing: Dict[str, Any] = field(default_factory=dict)
    identity: Dict[str, str] = field(default_factory=dict)  # sha256 of its files (how it is found again elsewhere)
    built_on: Optional[str] = None  # the machine that built it


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


class Workbench:
    """The model, its reference and every measurement of one tuning run."""

    def __init__(self, checked: CheckedRequest, log: Log, clock: Callable[[], float] = time.perf_counter,
                 started: Optional[float] = None, executor: Optional[Executor] = None) -> None:
        """``started``: when the run began on ``clock`` (the time budget counts from there; default now).
        ``executor``: where builds, quality passes and the timing run (default: this process)."""
        self.request, self.clock, self.log = checked.request, clock, log
        self.executor = executor if executor is not None else Executor()
        self.started = clock() if started is None else started
        self.deadline = self.started + 60.0 * self.request.time_budget_min
        self.config = model_config(self.request)
        self.say("loading the model" + (" (training the digits model the first time)" if self.config.train else ""))
        self.loaded = load_model(self.config, log=self.say)
        info = self.loaded.info
        self.shape = Shape(info.num_blocks, info.num_tokens, info.num_protected)
        digits_seed = dict(self.config.train or ()).get("seed", 0)
        self.eval = eval_set(self.request, self.loaded.preprocessing, info.num_classes, digits_seed)
        self.say(f"reference: fp32 r=0 PyTorch on {self.eval.name}")
        self.task = self.request.task
        self.reference = self._eager(0).predict_outputs(self.eval.images)
        self.setting = Setting(self.request, dict(self.loaded.create_args), self.config.key, self.loaded.preprocessing,
                               info.num_classes, digits_seed, verbose=self.executor.kind != Executor.kind)
        self.cache = self.setting.cache()
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

    def _job(self, candidate: Candidate) -> Job:
        work = ProbeWork(self.setting, candidate, self.reference)
        blocks = ",".join(map(str, candidate.schedule.blocks))
        return Job(f"probe {candidate.precision}/{blocks}", evaluate_candidate, (work,), label=f"probe {candidate.key}")

    def look_ahead(self, candidates: Sequence[Candidate]) -> None:
        """Start the builds of candidates the search may probe next, while an executor has room (a cluster's
        spare nodes); the search still asks for them in its own order, and the ones it never asks for are
        dropped before the final timing."""
        for candidate in candidates:
            if self.executor.spare() <= 0:
                return
            job = self._job(candidate)
            if (candidate.precision, candidate.schedule.blocks) not in self.evaluations \
                    and not self.executor.submitted(job.key):
                self.executor.submit(job)

    def probe(self, candidate: Candidate, force: bool = False) -> bool:
        """Build ``candidate`` (or take it from the cache) and measure its quality through its runner."""
        key = (candidate.precision, candidate.schedule.blocks)
        if key not in self.evaluations:
            job = self._job(candidate)
            if not force and not self.executor.submitted(job.key):
                self._make_room(self._estimate(candidate.precision), f"building {candidate.key}")
            self.probes += 1
            order, started = self.probes, self.clock()
            outcome = self.executor.result(job)
            self.evaluations[key] = self._evaluation(candidate, order, outcome, self.clock() - started)
        return self.evaluations[key].within

    def _evaluation(self, candidate: Candidate, order: int, outcome: Outcome, waited: float) -> Evaluation:
        found = outcome.value if outcome.error is None else {"status": "failed", "seconds": waited,
                                                             "reason": f"its job failed: {outcome.error}"}
        if found["status"] == "failed":
            self.say(f"{candidate.key}: failed ({found['reason']})")
            return Evaluation(candidate, {}, False, order, found["seconds"], "failed", found["reason"])
        figures = found["quality"]
        within = self.request.budget.within_quality(figures)
        self.say(f"{candidate.key}{' (cached)' if found['cached'] else ''}: {self.describe(figures)} -> "
                 f"{'within' if within else 'outside'} the budget")
        return Evaluation(candidate, figures, within, order, found["seconds"], directory=Path(found["directory"]),
                          cached=found["cached"], batch_ms_hint=found["batch_ms_hint"], identity=found["identity"],
                          built_on=found["node"]["host"])

    def describe(self, figures: Dict[str, Any]) -> str:
        if "top1_agreement" not in figures and "cosine" in figures:
            return f"mean {self.task.name} cosine {figures['cosine']:.4f}"
        if "lost_images" in figures:
            return (f"accuracy {100 * figures['accuracy']:.2f}% (lost {figures['lost_images']} images = "
                    f"{figures['lost_pts']:.2f} pts, net drop {figures['accuracy_drop_pts']:+.2f})")
        return f"top-1 agreement {figures['top1_agreement']:.3f}, mean cosine {figures['mean_cosine']:.4f}"

    def time_built(self) -> Dict[str, Any]:
        """Every built candidate timed side by side, interleaved, on one machine (fills each evaluation's
        ``timing``); returns what the measurement shares (settings, load averages, how many ran, where)."""
        self.executor.cancel_pending()  # look-ahead the search did not need
        built = [e for e in self.evaluations.values() if e.status == "evaluated"]
        request = self.request
        self.say(f"timing {len(built)} candidates side by side at batch {request.batch}, "
                 f"{request.resolved_threads} thread(s)")
        work = TimingWork(self.setting, tuple((e.candidate, str(e.directory), e.identity) for e in built))
        outcome = self.executor.result(Job("timing", time_candidates, (work,), exclusive=True,
                                           label="timing candidates"))
        if outcome.error is not None:
            found: Dict[str, Any] = {"timings": {}, "errors": {e.candidate.key: f"the timing job failed: "
                                                              f"{outcome.error}" for e in built}}
        else:
            found = outcome.value
        for e in built:
            key = e.candidate.key
            e.timing = found["timings"].get(key) or {"error": found["errors"].get(key, "not timed")}
        shared = {**request.timing.for_batch(request.batch), "interleaved": len(found["timings"]),
                  "batch": request.batch, "threads": found.get("threads", request.resolved_threads),
                  "load_average": found.get("load_average", {})}
        if self.executor.kind != Executor.kind:
            shared.update(node=found.get("node"), rebuilt_for_timing=found.get("rebuilt", []))
        return shared

    def winner_files(self, winner: Evaluation) -> Tuple[Path, bool]:
        """The winner's directory on this machine: the measured files themselves where they are here (this machine,
        or a shared --cache), else built again here with the same sha256; and whether it was built again."""
        directory, again = local_artifact(self.setting, winner.candidate, winner.identity, winner.directory, self.say)
        if again:
            self.say(f"{winner.candidate.key}: built again here; its files match the measured build's sha256")
        return directory, again
