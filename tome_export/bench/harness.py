"""The benchmark harness: ToMe r x precision x backend x batch x threads, measured side by side, with a report.

For each model and backend, every (r, precision) variant is built or patched once; then for each thread count and
batch size the variants are loaded and timed together, interleaved (:func:`~.timing.measure_interleaved`), so a
noisy machine slows them alike and the speedups within that group are fair ratios. Each such timing group is a job
(:mod:`.jobs`) that an executor runs (:mod:`.executors`): one after another in this process, or spread over a Ray
cluster with each group on a node of its own. Results are written as each group comes back (atomically), so an
interrupted run resumes where it stopped: cells already measured are kept (keyed by a stable cell id) unless
``force``.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Set

import numpy as np
import torch

from .._version import __version__
from ..devices import gpu_available
from ..errors import UserError, ValidationError
from ..files import atomic_write
from ..flops import flops_summary
from ..models import family_libraries
from ..quality.decisions import Decisions, torch_merge_decisions
from ..resources import check_cells, check_memory
from ..schedule import r_text, resolve_schedule
from . import memory, quality, tasks
from .config import DIGITS_ALIAS, DIGITS_MODEL, BenchConfig, Cell, ModelConfig, Variant, cells, variants
from .cluster import open_executor
from .executors import Executor, Job, Outcome, check_cluster
from .jobs import GroupWork, node_key, plan_pair
from .matrix import backends, skip_reason
from .plots import write_plots
from .report import CSV_NAME, REPORT_NAME, derive, report, to_csv
from .subjects import ArtifactSubject, LoadedModel, Subject, TorchSubject, ensure_artifact, load_model
from .timing import machine, measure_interleaved, versions

RESULTS = "results.json"
FORMAT = "tome-export-bench/1"
CORE_MODULES = ("tome_export", "torch", "numpy", "onnx")


class Failure(NamedTuple):
    """Why a variant or cell has no measurement: ``skipped`` (cannot run here) or ``failed`` (ran and broke)."""

    status: str
    reason: str


class GroupKey(NamedTuple):
    """Cells timed side by side: one thread count and batch size (of one model and backend)."""

    threads: int
    batch: int


@dataclass
class BenchResult:
    out_dir: Path
    results: Dict[str, Any]
    measured: int  # cells timed by this run
    resumed: int  # cells kept from an earlier run
    skipped: int
    failed: int


def modules() -> tuple:
    """The libraries whose versions a benchmark records: the core, every family's and every target's."""
    from ..targets import targets

    return tuple(dict.fromkeys(CORE_MODULES + family_libraries()
                               + tuple(m for t in targets().values() for m in t.version_modules)))


def environment() -> Dict[str, Any]:
    gpu = None
    if gpu_available():
        gpu = {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "cuda": torch.version.cuda}
    return {"machine": machine(), "gpu": gpu, "versions": versions(modules()), "tool_version": __version__}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _load_previous(out: Path) -> Dict[str, Any]:
    path = out / RESULTS
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: remove it or pass --force to measure everything again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} was not written by this version of the harness: choose another --out or pass --force")
    return data


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / RESULTS).is_file():
        raise UserError(f"--out {str(out)!r} already holds files that the benchmark did not write: choose another --out")


def _check_requirements(config: BenchConfig) -> None:
    """What the harness itself needs beyond the core install, checked before any slow work."""
    import importlib.util

    needed = {"matplotlib": "the plots"}
    if any(m.train is not None for m in config.models):
        needed["sklearn"] = "the digits accuracy case (scikit-learn)"
    for module, why in needed.items():
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{why} need the Python package {module!r}: pip install 'tome-export[bench]'")


def _check_models(config: BenchConfig, allow_large: bool) -> None:
    """Every model name resolves and takes its ``kwargs``, and its largest batch fits in memory: each model is
    built on the meta device (no memory, no weights), before anything is written."""
    import torch

    from ..models import create_model, model_info, resolve

    for i, m in enumerate(config.models):
        if m.train is not None:  # the embedded digits case: built by the harness itself
            continue
        resolve(m.model)
        try:
            with torch.device("meta"):
                model, _ = create_model(m.model, weights="random", seed=m.seed, **dict(m.kwargs))
        except UserError:  # e.g. a hub model's config not cached: its cells report it
            continue
        except (TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"models[{i}] ({m.model}): kwargs {dict(m.kwargs)} do not build the model "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        check_memory(model_info(model), max(config.batches), f"models[{i}] ({m.model}) at batch "
                     f"{max(config.batches)}", allow_large)


def _failure(exc: BaseException) -> Failure:
    """Why building, loading or running a variant raised ``exc``."""
    if isinstance(exc, UserError):
        return Failure("skipped", str(exc))
    if isinstance(exc, ValidationError):
        return Failure("failed", f"validation failed: {exc}")
    return Failure("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))


@dataclass
class _BackendPlan:
    """What one (model, backend) still needs this run, from the matrix and the previous results."""

    cells: List[Cell]
    live: List[Cell]  # cells that can run here
    final: Dict[str, Dict[str, Any]]  # previous records kept as they are (measured, or failed: --force retries)
    groups: Dict[GroupKey, List[Cell]]
    to_time: Set[GroupKey]  # a group is timed again as a whole when any member is new
    needs_quality: List[Variant]
    needs_memory: bool

    @property
    def nothing_to_do(self) -> bool:
        return not self.to_time and not self.needs_quality and not self.needs_memory


class _Measure:
    """Measures the cells it is given (what can run, builds, quality, timing side by side, memory) into ``results``:
    a timing group's job, on whichever machine runs it (:func:`measure_group`). ``prev_cells``: earlier records of
    these cells, kept when final; ``quality_for``: the variants whose quality to measure (None: every one)."""

    def __init__(self, config: BenchConfig, cache: Path, data: Optional[Path], run_id: str,
                 prev_cells: Dict[str, Dict], quality_for: Optional[Set[str]], log: Callable[[str], None],
                 models: Optional["_Models"] = None) -> None:
        self.config, self.cache, self.data, self.run_id = config, cache, data, run_id
        self.prev_cells, self.prev_variants, self.quality_for = prev_cells, {}, quality_for
        self.results: Dict[str, Any] = {"cells": {}, "variants": {}, "models": {}}
        self.gpu = gpu_available()
        self.counts = {"measured": 0, "resumed": 0, "skipped": 0, "failed": 0}
        self.counters: Dict[str, str] = {}  # cell id -> how this run settled it
        self.log = log
        self.models = models if models is not None else _Models(config, data, self.say)

    def say(self, message: str) -> None:
        self.log(message)

    def save(self) -> None:
        """A job's records travel back whole; the harness writes them."""

    # --- records ---------------------------------------------------------------------------------------------

    def base_record(self, cell: Cell) -> Dict[str, Any]:
        v, backend = cell.variant, backends()[cell.variant.backend]
        return {"id": cell.id, "variant": v.id, "model": v.model.key, "model_name": v.model.model,
                "backend": v.backend, "target": backend.target or "eager torch", "device": backend.device,
                "precision": v.precision, "r": v.r_label, "batch": cell.batch, "threads": cell.threads}

    def finish(self, cell: Cell, record: Dict[str, Any], counter: str) -> None:
        self.results["cells"][cell.id] = record
        self.counts[counter] += 1
        self.counters[cell.id] = counter

    def static_facts(self, loaded: LoadedModel, variant: Variant) -> Dict[str, Any]:
        info = loaded.info
        sched = resolve_schedule(variant.r, info.num_blocks, info.num_tokens, info.num_protected)
        return {"r_schedule": list(sched.r), "tokens_per_block": list(sched.tokens),
                "flops": flops_summary(info, sched.r)}

    # --- one model on one backend ----------------------------------------------------------------------------

    def plan_backend(self, backend: str, cells: List[Cell]) -> _BackendPlan:
        """Skip what cannot run here (recorded at once); find what the previous results already hold."""
        variants = list(dict.fromkeys(c.variant for c in cells))
        reasons = {v: skip_reason(backend, v.precision, self.gpu) for v in variants}
        for cell in cells:
            if reasons[cell.variant] is not None:
                self.finish(cell, {**self.base_record(cell), "status": "skipped", "reason": reasons[cell.variant]},
                            "skipped")
        live = [c for c in cells if reasons[c.variant] is None]
        # measured and failed cells are final (--force retries failures); skipped ones are tried again every run
        final = {c.id: self.prev_cells[c.id] for c in live
                 if self.prev_cells.get(c.id, {}).get("status") in ("measured", "failed")}
        groups: Dict[GroupKey, List[Cell]] = {}
        for c in live:
            groups.setdefault(GroupKey(c.threads, c.batch), []).append(c)
        gave_up = {v for v in variants if reasons[v] is None
                   and all(final.get(c.id, {}).get("status") == "failed" for c in live if c.variant == v)}
        for v in variants:
            if v.id in self.prev_variants:
                self.results["variants"][v.id] = self.prev_variants[v.id]
        return _BackendPlan(
            cells=cells, live=live, final=final, groups=groups,
            to_time={g for g, members in groups.items() if any(c.id not in final for c in members)},
            needs_quality=[v for v in variants if reasons[v] is None and v not in gave_up
                           and v.id not in self.prev_variants
                           and (self.quality_for is None or v.id in self.quality_for)],
            needs_memory=self.config.memory and any(
                final.get(c.id, {}).get("status") == "measured" and "memory" not in final[c.id] for c in live))

    def run_backend(self, mc: ModelConfig, backend: str, cells: List[Cell]) -> None:
        plan = self.plan_backend(backend, cells)
        if plan.nothing_to_do:
            for c in plan.live:
                self.finish(c, plan.final[c.id], "resumed")
            return
        loaded = self.models.get(mc, mc.r if mc.r is not None else self.config.r)
        self.models.reference(loaded, self.results)
        subjects = _Subjects(self.config, self.cache, loaded, backend, self.say)
        timed: Dict[str, Dict[str, Any]] = {}
        failures: Dict[str, Failure] = {}
        for threads in self.config.threads:
            if threads == self.config.threads[0]:
                self.measure_qualities(loaded, plan.needs_quality, subjects, threads)
            for batch in self.config.batches:
                if GroupKey(threads, batch) in plan.to_time:
                    timed.update(self.time_group(loaded, plan, GroupKey(threads, batch), subjects, failures))
            subjects.release()
        self.record_backend(loaded, plan, subjects, timed, failures)

    def record_backend(self, loaded: LoadedModel, plan: _BackendPlan, subjects: "_Subjects",
                       timed: Dict[str, Dict[str, Any]], failures: Dict[str, Failure]) -> None:
        """Every live cell's record (timed now, failed now, or kept from before), its memory, its counter."""
        kept = set()
        for c in plan.live:
            if c.id in timed:
                record = timed[c.id]
            elif c.id in failures or subjects.failure(c.variant, c.batch) is not None:
                status, reason = failures.get(c.id) or subjects.failure(c.variant, c.batch)
                record = {**self.base_record(c), "status": status, "reason": reason}
            elif c.id in plan.final:
                record = plan.final[c.id]
                kept.add(c.id)
            else:  # cannot happen: every live cell is timed, failed or final
                raise AssertionError(f"cell {c.id} was neither measured nor resumed")
            self.results["cells"][c.id] = record
        if self.config.memory:
            self.measure_memory(loaded, plan.live, subjects)
        for c in plan.live:
            record = self.results["cells"][c.id]
            self.finish(c, record, "resumed" if c.id in kept else record["status"])

    # --- measurements ----------------------------------------------------------------------------------------

    def measure_qualities(self, loaded: LoadedModel, variants: List[Variant], subjects: "_Subjects",
                          threads: int) -> None:
        batch = self.config.batches[-1]
        for v in variants:
            subject = subjects.get(v, batch, threads)
            if subject is not None:
                self.measure_quality(loaded, v, subject)

    def measure_quality(self, loaded: LoadedModel, v: Variant, subject: Subject) -> None:
        self.say(f"quality {v.backend} {v.precision} {v.r_label}")
        ev, ref = self.models.eval_set(loaded), self.models.reference(loaded, self.results)
        try:
            outputs = subject.predict_outputs(ev.images)
        except Exception as exc:
            self.results["variants"][v.id] = {"variant": v.id, "error": _failure(exc).reason}
            return
        task = v.model.task.name
        # which artifact (each static batch has its own): the cells of other batches carry their own status
        record: Dict[str, Any] = {"variant": v.id, "eval_set": ev.name, "static_batch": subject.static_batch}
        if task == "classify":
            record["fidelity"] = quality.fidelity(ref["outputs"]["logits"], outputs["logits"])
            accuracy = quality.accuracy(outputs["logits"], ev.labels) if ev.labels is not None else None
        else:
            record["fidelity"] = tasks.task_fidelity(task, ref["outputs"], outputs)
            probe = ref.get("probe")
            accuracy = probe.accuracy(outputs, ev.labels) if probe is not None else None
        if accuracy is not None:
            record["accuracy"] = accuracy
            record["accuracy_drop"] = ref["accuracy"]["top1"] - accuracy["top1"]
        record["merge_decisions"] = self.merge_decisions(loaded, v, subject, ev.images[: self.config.decision_images])
        self.results["variants"][v.id] = record

    def merge_decisions(self, loaded: LoadedModel, v: Variant, subject: Subject, x: np.ndarray) -> Dict[str, Any]:
        if v.r_label == "r0":
            return {"agreement": None, "reason": "r=0 merges nothing"}
        if isinstance(subject, TorchSubject):
            reference = self.models.reference_decisions(loaded, v, x)
            return quality.decision_agreement(reference, subject.model, x, subject.tensor)
        try:
            reference_model = TorchSubject(loaded.model, v.r, "fp32", prop_attn=v.model.prop_attn,
                                           task=v.model.task).model
            return quality.artifact_decision_agreement(subject.artifact, reference_model, x)
        except Exception as exc:  # a graph the decision reader does not understand: say so, keep the rest
            return {"agreement": None, "reason": _failure(exc).reason}

    def time_group(self, loaded: LoadedModel, plan: _BackendPlan, key: GroupKey, subjects: "_Subjects",
                   failures: Dict[str, Failure]) -> Dict[str, Dict[str, Any]]:
        """Time every member of one (model, backend, batch, threads) group side by side; saves the results."""
        members = [c for c in plan.groups[key] if plan.final.get(c.id, {}).get("status") != "failed"]
        found = {c.variant: subjects.get(c.variant, key.batch, key.threads) for c in members}
        ready = {c: found[c.variant] for c in members if found[c.variant] is not None}
        if not ready:
            return {}
        ev = self.models.eval_set(loaded)
        x = np.ascontiguousarray(ev.images[np.arange(key.batch) % len(ev.images)])
        runs, clocks = {}, {}
        for c, subject in ready.items():
            try:
                runs[c.id] = subject.timed(x)
                runs[c.id]()  # a variant that cannot run this batch fails alone, before the clock starts
            except Exception as exc:
                runs.pop(c.id, None)
                failures[c.id] = _failure(exc)
                continue
            if subject.clock is not None:
                clocks[c.id] = subject.clock
        ok = [c for c in ready if c.id in runs]
        timings, context = self._measure(runs, clocks, key, ok)
        new = {c.id: {**self.base_record(c), "status": "measured", **timings[c.id].summary(key.batch), **context,
                      "timer": ready[c].timer, "threads_ran": context["threads_ran"]
                      if isinstance(ready[c], TorchSubject) else key.threads,
                      "artifact": ready[c].details, **self.static_facts(loaded, c.variant)} for c in ok}
        self.results["cells"].update(new)
        self.save()  # an interrupted run keeps every finished group
        return new

    def _measure(self, runs: Dict[str, Callable], clocks: Dict[str, Callable], key: GroupKey,
                 ok: List[Cell]) -> tuple:
        """The interleaved timings of a group, and what every record of it shares."""
        settings = self.config.timing.for_batch(key.batch)
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(key.threads)  # eager cells; artifact runners got their threads when loaded
        try:
            backend = ok[0].variant.backend if ok else "?"
            self.say(f"timing {backend} batch {key.batch}, {key.threads} thread(s): {len(runs)} variants")
            load_before = list(os.getloadavg())
            timings = measure_interleaved(runs, clocks=clocks, **settings)
            load_after = list(os.getloadavg())
            threads_ran = torch.get_num_threads()
        finally:
            torch.set_num_threads(torch_threads)
        group = f"{self.run_id}:{ok[0].variant.model.key}/{backend}/b{key.batch}/t{key.threads}" if ok else ""
        return timings, {"timing": settings, "group": group, "interleaved_with": len(ok), "run_id": self.run_id,
                         "measured_at": _now(), "load_average": {"before": load_before, "after": load_after},
                         "threads_ran": threads_ran}

    def measure_memory(self, loaded: LoadedModel, live: List[Cell], subjects: "_Subjects") -> None:
        """Peak memory per (variant, threads) in a fresh subprocess; attached to the measured cells."""
        supported = memory.supported()
        todo: Dict[tuple, List[Cell]] = {}
        for c in live:
            record = self.results["cells"][c.id]
            if record["status"] == "measured" and "memory" not in record:
                if not supported:
                    record["memory"] = {"peak_rss_mb": None, "reason": "needs Linux's /proc/self/status and clear_refs"}
                    continue
                directory = None if subjects.eager else subjects.dir_of(c.variant, c.batch)
                if directory is None and not subjects.eager:
                    directory = Path(record["artifact"]["artifact_dir"])  # a resumed cell: its artifact is cached
                todo.setdefault((c.variant, c.threads, directory), []).append(c)
        for (v, threads, directory), members in todo.items():
            self.say(f"memory {v.backend} {v.precision} {v.r_label}, {threads} thread(s)")
            measured = memory.measure_in_subprocess(self._memory_spec(loaded, v, threads, directory, members))
            for c in members:
                entry = measured.get(str(c.batch)) if "error" not in measured else None
                self.results["cells"][c.id]["memory"] = (
                    {**entry, "method": memory.METHOD} if entry else {"peak_rss_mb": None, "reason": measured.get("error")})

    @staticmethod
    def _memory_spec(loaded: LoadedModel, v: Variant, threads: int, directory: Optional[Path],
                     members: List[Cell]) -> Dict[str, Any]:
        spec: Dict[str, Any] = {"threads": threads, "batches": sorted(c.batch for c in members),
                                "input_shape": list(loaded.preprocessing.input_size)}
        if directory is None:
            spec.update(kind="torch", create_args=loaded.create_args, r=r_text(v.r),
                        precision=v.precision, device=backends()[v.backend].device, prop_attn=v.model.prop_attn)
        else:
            spec.update(kind="artifact", directory=str(directory))
        return spec


class _Run(_Measure):
    """One run of a benchmark matrix: previous results to resume from, the jobs still to do (:mod:`.jobs`), run by
    an executor (in this process or on a cluster), and the results file, written as each job comes back."""

    def __init__(self, config: BenchConfig, out: Path, cache: Path, data: Optional[Path], force: bool,
                 progress: bool, log: Callable[[str], None], executor: Optional[Executor] = None) -> None:
        from tqdm import tqdm

        self.out, self.force, self.verbose = out, force, progress
        self.bar = tqdm(total=len(cells(config)), unit="cell", disable=not progress or not sys.stderr.isatty(),
                        file=sys.stderr, dynamic_ncols=True)
        previous = {} if force else _load_previous(out)
        super().__init__(config, cache, data, uuid.uuid4().hex[:12], previous.get("cells", {}), None, log)
        # quality records hold only while the evaluation images are the same
        quality_key = {"data": str(data) if data else None, "images": config.photos, "max_images": config.max_images,
                       "decision_images": config.decision_images}
        same_images = previous.get("quality_key") == quality_key
        self.prev_variants = previous.get("variants", {}) if same_images else {}
        self.executor = executor if executor is not None else Executor()
        self.results = self._results(previous, quality_key, same_images)
        self.in_flight: Dict[str, int] = {}  # job key -> its cells, while it runs

    def _results(self, previous: Dict[str, Any], quality_key: Dict[str, Any], same_images: bool) -> Dict[str, Any]:
        env = environment()
        run = {"run_id": self.run_id, "started_at": _now(), "force": self.force, "load_average": list(os.getloadavg()),
               "machine": env["machine"].get("cpu_model"), "gpu": env["gpu"], "executor": self.executor.describe(),
               "jobs": {}}
        return {"format": FORMAT, "config": self.config.to_dict(), "data": str(self.data) if self.data else None,
                "quality_key": quality_key, "environment": env, "runs": previous.get("runs", []) + [run],
                "models": previous.get("models", {}) if same_images else {}, "nodes": previous.get("nodes", {}),
                "variants": {v.id: self.prev_variants[v.id] for v in variants(self.config) if v.id in self.prev_variants},
                "cells": {}}

    def say(self, message: str) -> None:
        self.bar.set_description_str(message[:70])
        if self.bar.disable:
            self.log(message)

    def save(self) -> None:
        atomic_write(self.out / RESULTS, json.dumps(self.results, indent=1, default=str) + "\n")

    def finish(self, cell: Cell, record: Dict[str, Any], counter: str) -> None:
        super().finish(cell, record, counter)
        self.bar.update(1)

    def progress(self) -> str:
        done = sum(self.counts.values())
        return (f"{done}/{len(cells(self.config))} cells done, {sum(self.in_flight.values())} in "
                f"{len(self.in_flight)} running or queued group(s), {self.counts['failed']} failed")

    # --- jobs ------------------------------------------------------------------------------------------------

    def submit_all(self, all_cells: List[Cell]) -> None:
        """A job per timing group with work left; groups with none are kept as they are, here."""
        for mc in self.config.models:
            for backend in self.config.backends:
                pair = [c for c in all_cells if c.variant.model == mc and c.variant.backend == backend]
                plan = plan_pair(self.config, mc, backend, pair, self.prev_cells, self.prev_variants,
                                 cache=str(self.cache.resolve()), data=str(self.data.resolve()) if self.data else None,
                                 run_id=self.run_id, verbose=self.verbose)
                for c in plan.settled:
                    self.finish(c, self.prev_cells[c.id], "resumed")
                for work in plan.works:
                    self.executor.submit(Job(work.key, measure_group, (work,), exclusive=True,
                                             follows=plan.follows.get(work.key), label=work.label))
                    self.in_flight[work.key] = len(work.cells)

    def absorb(self, work: GroupWork, outcome: Outcome) -> None:
        """A job's records into the results, which are saved at once (an interrupted run keeps them)."""
        self.in_flight.pop(work.key, None)
        where = "?"
        if outcome.error is not None:
            for c in work.cells:  # a record kept from before stays; the others failed with the job
                kept = work.previous.get(c.id)
                self.finish(c, kept or {**self.base_record(c), "status": "failed",
                                        "reason": f"the job of this timing group failed: {outcome.error}"},
                            "resumed" if kept else "failed")
        else:
            part = outcome.value
            node = {**part["node"], **{k: v for k, v in outcome.node.items() if k == "ray_node_id"}}
            where = node_key(node)
            self.results["nodes"][where] = node
            self.results["models"].update(part["models"])
            self.results["variants"].update(part["variants"])
            for c in work.cells:
                record, counter = part["cells"][c.id], part["counters"][c.id]
                if counter in ("measured", "failed"):
                    record["node"] = where
                self.finish(c, record, counter)
            self.results["runs"][-1]["jobs"][work.key] = {"node": where, "seconds": part["seconds"],
                                                          "cells": len(work.cells)}
        self.save()
        if self.bar.disable:
            self.log(f"{work.label} {'failed: ' + outcome.error if outcome.error else 'done on ' + where} "
                     f"({self.progress()})")
        else:
            self.bar.set_postfix_str(self.progress(), refresh=True)

    # --- the whole matrix ------------------------------------------------------------------------------------

    def run(self) -> BenchResult:
        global _listener
        all_cells = cells(self.config)
        self.save()  # marks the output directory as the benchmark's before any slow work
        _listener = self.say  # jobs run in this process report here
        try:
            self.submit_all(all_cells)
            for job, outcome in self.executor.completed():
                self.absorb(job.args[0], outcome)
        finally:
            _listener = None
            self.bar.close()
        self.results["cells"] = {c.id: self.results["cells"][c.id] for c in all_cells}  # matrix order
        self.results["runs"][-1].update(finished_at=_now(), load_average_at_end=list(os.getloadavg()),
                                        counts=dict(self.counts))
        write_outputs(self.out, self.results)
        self.save()
        return BenchResult(self.out, self.results, **self.counts)


# --- a timing group's job, wherever it runs ------------------------------------------------------------------

_listener: Optional[Callable[[str], None]] = None  # the harness of this process, while it runs jobs here
_worker_models: Dict[tuple, "_Models"] = {}  # a worker's models, kept for its next job of the same model


def _quiet(message: str) -> None:
    """Says nothing."""


def _models_for(work: GroupWork, say: Callable[[str], None]) -> "_Models":
    """The models this process loaded for an earlier job with the same evaluation images; only ``work``'s is
    kept (jobs come model by model, and a worker should not hold a whole zoo)."""
    key = (work.data, work.config.photos, work.config.max_images, work.config.decision_images)
    models = _worker_models.get(key)
    if models is None:
        _worker_models.clear()
        models = _worker_models[key] = _Models(work.config, Path(work.data) if work.data else None, say)
    models.say = say
    models.keep_only(work.model.key)
    return models


@contextmanager
def _every_core() -> Iterator[None]:
    """A job holds its node: builds and quality passes may use every core (a cluster's worker starts with one
    thread); timing sets the cell's own thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def node_facts() -> Dict[str, Any]:
    """The machine a job ran on: host, CPU model, logical cores and flags, GPU, library versions."""
    env = environment()
    return {"host": socket.gethostname(), **env["machine"], "gpu": env["gpu"], "versions": env["versions"],
            "tool_version": env["tool_version"]}


def measure_group(work: GroupWork) -> Dict[str, Any]:
    """A timing group's job (see :mod:`.jobs`): its records, the variants' quality it was asked for, its model's
    reference, the node it ran on and how long it took."""
    started = time.perf_counter()
    say = _listener or ((lambda m: print(f"bench [{work.label}]: {m}", file=sys.stderr, flush=True))
                        if work.verbose else _quiet)
    engine = _Measure(work.config, Path(work.cache), Path(work.data) if work.data else None, work.run_id,
                      dict(work.previous), set(work.quality_for), say)
    engine.models = _models_for(work, engine.say)
    with _every_core():
        engine.run_backend(work.model, work.backend, list(work.cells))
    return {"cells": engine.results["cells"], "counters": engine.counters, "variants": engine.results["variants"],
            "models": engine.results["models"], "node": node_facts(),
            "seconds": round(time.perf_counter() - started, 3)}


class _Models:
    """The config's models, loaded once; their evaluation images and fp32 r=0 reference outputs."""

    def __init__(self, config: BenchConfig, data: Optional[Path], say: Callable[[str], None]) -> None:
        self.config, self.data, self.say = config, data, say
        self.loaded: Dict[str, LoadedModel] = {}
        self.eval_sets: Dict[str, quality.EvalSet] = {}
        self.references: Dict[str, Dict[str, Any]] = {}
        self.decisions: Dict[tuple, Decisions] = {}

    def keep_only(self, key: str) -> None:
        """Forget every model but ``key`` (and what was computed from them)."""
        self.loaded = {k: v for k, v in self.loaded.items() if k == key}
        self.eval_sets = {k: v for k, v in self.eval_sets.items() if k == key}
        self.references = {k: v for k, v in self.references.items() if k == key}
        self.decisions = {k: v for k, v in self.decisions.items() if k[0] == key}

    def get(self, mc: ModelConfig, schedules: tuple) -> LoadedModel:
        if mc.key not in self.loaded:
            self.say(f"loading {mc.model}")
            loaded = load_model(mc, log=self.say)
            for r in schedules:  # a per-block schedule of the wrong length is a config error: fail now
                resolve_schedule(r, loaded.info.num_blocks, loaded.info.num_tokens, loaded.info.num_protected)
            self.loaded[mc.key] = loaded
        return self.loaded[mc.key]

    def eval_set(self, loaded: LoadedModel) -> quality.EvalSet:
        key = loaded.config.key
        if key not in self.eval_sets:
            if self.data is not None:
                ev = quality.imagefolder_set(self.data, loaded.preprocessing, loaded.info.num_classes,
                                             self.config.max_images)
            elif loaded.training is not None or loaded.create_args["name"] in (DIGITS_ALIAS, DIGITS_MODEL):
                ev = quality.digits_set(dict(loaded.config.train or ()).get("seed", 0))
            else:
                ev = quality.photo_set(loaded.preprocessing, self.config.photos)
            self.eval_sets[key] = ev
        return self.eval_sets[key]

    def reference(self, loaded: LoadedModel, results: Dict[str, Any]) -> Dict[str, Any]:
        """fp32 r=0 eager PyTorch on the evaluation images: what every variant's fidelity is measured against
        (and, for a task with a real task figure on labelled images, the probe it is measured with)."""
        key = loaded.config.key
        if key not in self.references:
            ev = self.eval_set(loaded)
            reference = TorchSubject(loaded.model, 0, "fp32", task=loaded.config.task)
            outputs = reference.predict_outputs(ev.images)
            probe = self.probe(loaded, reference) if ev.labels is not None else None
            if ev.labels is None:
                acc = None
            elif probe is not None:
                acc = probe.accuracy(outputs, ev.labels)
            elif loaded.config.task.name == "classify":
                acc = quality.accuracy(outputs["logits"], ev.labels)
            else:
                acc = None
            self.references[key] = {"outputs": outputs, "accuracy": acc, "probe": probe}
            info = loaded.info
            results["models"][key] = {
                "model": loaded.config.model, "description": loaded.config.describe(),
                "create_args": dict(loaded.create_args), "training": loaded.training,
                "eval_set": ev.name, "reference": "eager PyTorch, fp32, r=0", "reference_accuracy": acc,
                "tokens": info.num_tokens, "blocks": info.num_blocks, "embed_dim": info.embed_dim,
                "num_classes": info.num_classes, "input_size": list(loaded.preprocessing.input_size),
                "task": reference.task.to_dict(),
                **({"published": dict(loaded.config.published)} if loaded.config.published else {}),
            }
        return self.references[key]

    def probe(self, loaded: LoadedModel, reference: TorchSubject) -> Optional[tasks.TaskProbe]:
        """The digits case's real task figure for ``embed`` and ``dense``, fitted on fp32 r=0 outputs of the
        training split (None for other tasks and data)."""
        task = tasks.probe_for(loaded.config.task.name)
        digits = loaded.training is not None or loaded.create_args["name"] in (DIGITS_ALIAS, DIGITS_MODEL)
        if task is None or self.data is not None or not digits:
            return None
        from .digits import load_digits_split

        split = load_digits_split(dict(loaded.config.train or ()).get("seed", 0))
        self.say(f"fitting the {task} probe on fp32 r=0 train outputs")
        return tasks.TaskProbe(task, reference.predict_outputs(split.train_x), split.train_y)

    def reference_decisions(self, loaded: LoadedModel, variant: Variant, x: np.ndarray) -> Decisions:
        """The merge decisions of fp32 PyTorch at the variant's r (what every backend's are compared with)."""
        key = (loaded.config.key, variant.r_label)
        if key not in self.decisions:
            ref = TorchSubject(loaded.model, variant.r, "fp32", prop_attn=variant.model.prop_attn,
                               task=variant.model.task)
            self.decisions[key] = torch_merge_decisions(ref.model, [x], ref.tensor)
        return self.decisions[key]


class _Subjects:
    """The variants of one (model, backend): built once, loaded once per thread count, on demand."""

    def __init__(self, config: BenchConfig, cache: Path, loaded: LoadedModel, backend: str,
                 say: Callable[[str], None]) -> None:
        self.config, self.cache, self.loaded, self.backend, self.say = config, cache, loaded, backend, say
        self.eager = backends()[backend].target is None
        self.torch: Dict[Variant, TorchSubject] = {}
        self.dirs: Dict[tuple, tuple] = {}  # (variant, batch or None) -> (directory, built by this run)
        self.artifacts: Dict[tuple, ArtifactSubject] = {}  # (directory, threads) -> the loaded artifact
        self.failed: Dict[tuple, Failure] = {}  # by (variant, batch or None): a static batch's own artifact

    def _key(self, v: Variant, batch: int) -> tuple:
        return (v, None if self.config.dynamic_batch else batch)

    def dir_of(self, v: Variant, batch: int) -> Optional[Path]:
        entry = self.dirs.get(self._key(v, batch))
        return entry[0] if entry else None

    def get(self, v: Variant, batch: int, threads: int) -> Optional[Subject]:
        """The variant ready to run ``batch`` images with ``threads`` threads; None when it cannot be had."""
        key = (v, None) if self.eager else self._key(v, batch)
        if key in self.failed:
            return None
        try:
            return self._eager(v) if self.eager else self._artifact(v, batch, threads)
        except Exception as exc:  # one variant that cannot be built or loaded must not stop the others
            self.failed[key] = _failure(exc)
            return None

    def failure(self, v: Variant, batch: int) -> Optional[Failure]:
        """Why the variant cannot run ``batch`` here (each static batch has its own artifact), or None."""
        return self.failed.get((v, None) if self.eager else self._key(v, batch))

    def _eager(self, v: Variant) -> TorchSubject:
        if v not in self.torch:
            self.say(f"preparing torch {v.precision} {v.r_label}")
            spec = backends()[self.backend]
            self.torch[v] = TorchSubject(self.loaded.model, v.r, v.precision, spec.device,
                                         prop_attn=v.model.prop_attn, graph=spec.cuda_graph, task=v.model.task)
        return self.torch[v]

    def _artifact(self, v: Variant, batch: int, threads: int) -> ArtifactSubject:
        key = self._key(v, batch)
        if key not in self.dirs:
            directory, cached = ensure_artifact(self.loaded, v, self.cache, self.config.dynamic_batch, batch,
                                                self.config.merge_impl, self.say)
            self.dirs[key] = (directory, not cached)
        directory, fresh = self.dirs[key]
        if (directory, threads) not in self.artifacts:
            self.artifacts[(directory, threads)] = ArtifactSubject(directory, threads, cached=not fresh)
        return self.artifacts[(directory, threads)]

    def release(self) -> None:
        """Close the loaded runners (their thread count is fixed); eager models serve every thread count."""
        for subject in self.artifacts.values():
            subject.close()
        self.artifacts.clear()
        gc.collect()


def run_bench(config: BenchConfig, out_dir: os.PathLike, data: Optional[os.PathLike] = None, force: bool = False,
              cache: Optional[os.PathLike] = None, progress: bool = False,
              log: Callable[[str], None] = lambda msg: None, allow_large: bool = False,
              cluster: Optional[str] = None) -> BenchResult:
    """Run (or resume) a benchmark matrix; writes results.json/.csv, report.md and plots/ into ``out_dir``.

    ``data``: an ImageFolder of labelled images for top-1/top-5 accuracy (needs real weights). ``cache``: where
    built artifacts live (default ``out_dir/artifacts``); they are reused between cells and between runs.
    ``cluster``: run the timing groups on Ray (:data:`~.executors.CLUSTER_HELP`); each node builds into ``cache``
    on its own disk.
    """
    out = Path(out_dir)
    _check_out(out)
    check_cells(len(cells(config)), allow_large)
    _check_requirements(config)
    check_cluster(cluster)
    _check_models(config, allow_large)
    if data is not None:
        if not Path(data).is_dir():
            raise UserError(f"--data {str(data)!r} is not a directory: pass an ImageFolder (one folder per class)")
        random = [m.model for m in config.models if m.weights == "random"]
        if random:
            raise UserError(f"--data measures accuracy, which random weights do not have ({', '.join(random)}): "
                            f"pass --weights pretrained or --checkpoint PATH")
    with open_executor(cluster, log) as executor:
        out.mkdir(parents=True, exist_ok=True)
        return _Run(config, out, Path(cache) if cache else out / "artifacts", Path(data) if data else None, force,
                    progress, log, executor).run()


def write_outputs(out: Path, results: Dict[str, Any]) -> List[Path]:
    """Derive, then write results.csv, the plots and report.md (each atomically); returns the paths written."""
    derive(results["cells"])
    plots = write_plots(out, results)
    atomic_write(out / CSV_NAME, to_csv(results))
    atomic_write(out / REPORT_NAME, report(results, [p.relative_to(out).as_posix() for p in plots]) + "\n")
    return [out / CSV_NAME, out / REPORT_NAME, *plots]
