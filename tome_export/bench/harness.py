"""The benchmark harness: ToMe r x precision x backend x batch x threads, measured side by side, with a report.

For each model and backend, every (r, precision) variant is built or patched once and loaded once; then for each
thread count and batch size the variants are timed together, interleaved (:func:`~.timing.measure_interleaved`),
so a noisy machine slows them alike and the speedups within that group are fair ratios. Results are written
after every group (atomically), so an interrupted run resumes where it stopped: cells already measured are kept
(keyed by a stable cell id) unless ``force``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from .._version import __version__
from ..errors import UserError, ValidationError
from ..flops import flops_summary
from ..models.base import merge_destinations
from ..schedule import resolve_schedule
from . import matrix, memory, quality
from .config import BenchConfig, ModelConfig
from .matrix import BACKENDS, Cell, Variant
from .report import atomic_write, write_outputs
from .subjects import ArtifactSubject, PreparedModel, Subject, TorchSubject, ensure_artifact, prepare_model
from .timing import machine, measure_interleaved, versions

RESULTS = "results.json"
FORMAT = "tome-export-bench/1"
MODULES = ("tome_export", "torch", "timm", "numpy", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt",
           "tensorrt_rtx")


@dataclass
class BenchResult:
    out_dir: Path
    results: Dict[str, Any]
    measured: int  # cells timed by this run
    resumed: int  # cells kept from an earlier run
    skipped: int
    failed: int


def environment() -> Dict[str, Any]:
    gpu = None
    if matrix.gpu_available():
        gpu = {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "cuda": torch.version.cuda}
    return {"machine": machine(), "gpu": gpu, "versions": versions(MODULES), "tool_version": __version__}


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


def _failure(exc: BaseException) -> tuple:
    """(status, reason) of an exception raised while building, loading or running a variant."""
    if isinstance(exc, UserError):
        return "skipped", str(exc)
    if isinstance(exc, ValidationError):
        return "failed", f"validation failed: {exc}"
    return "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


class _Run:
    def __init__(self, config: BenchConfig, out: Path, cache: Path, data: Optional[Path], force: bool,
                 progress: bool, log: Callable[[str], None]) -> None:
        from tqdm import tqdm

        self.config, self.out, self.cache, self.data, self.force = config, out, cache, data, force
        previous = {} if force else _load_previous(out)
        self.prev_cells: Dict[str, Dict] = previous.get("cells", {})
        # quality records hold only while the evaluation images are the same
        quality_key = {"data": str(data) if data else None, "images": config.photos, "max_images": config.max_images,
                       "decision_images": config.decision_images}
        same_images = previous.get("quality_key") == quality_key
        self.prev_variants: Dict[str, Dict] = previous.get("variants", {}) if same_images else {}
        self.run_id = uuid.uuid4().hex[:12]
        env = environment()
        self.results: Dict[str, Any] = {
            "format": FORMAT, "config": config.to_dict(), "data": str(data) if data else None,
            "quality_key": quality_key, "environment": env,
            "runs": previous.get("runs", []) + [{
                "run_id": self.run_id, "started_at": _now(), "force": force, "load_average": list(os.getloadavg()),
                "machine": env["machine"].get("cpu_model"), "gpu": env["gpu"]}],
            "models": previous.get("models", {}) if same_images else {}, "variants": {}, "cells": {},
        }
        self.gpu = matrix.gpu_available()
        self.counts = {"measured": 0, "resumed": 0, "skipped": 0, "failed": 0}
        self.bar = tqdm(total=len(matrix.cells(config)), unit="cell", disable=not progress or not sys.stderr.isatty(),
                        file=sys.stderr, dynamic_ncols=True)
        self.log = log
        self.prepared: Dict[str, PreparedModel] = {}
        self.eval_sets: Dict[str, quality.EvalSet] = {}
        self.references: Dict[str, Dict[str, Any]] = {}
        self.ref_decisions: Dict[tuple, Dict[str, np.ndarray]] = {}

    def say(self, message: str) -> None:
        self.bar.set_description_str(message[:70])
        if self.bar.disable:
            self.log(message)

    def save(self) -> None:
        atomic_write(self.out / RESULTS, json.dumps(self.results, indent=1, default=str) + "\n")

    # --- models, evaluation images, the fp32 r=0 reference ---------------------------------------------------

    def model(self, mc: ModelConfig) -> PreparedModel:
        if mc.key not in self.prepared:
            self.say(f"loading {mc.model}")
            prepared = prepare_model(mc, log=self.say)
            for r in mc.r if mc.r is not None else self.config.r:  # a wrong-length schedule fails now
                resolve_schedule(r, prepared.info.num_blocks, prepared.info.num_tokens, prepared.info.num_protected)
            self.prepared[mc.key] = prepared
        return self.prepared[mc.key]

    def eval_set(self, prepared: PreparedModel) -> quality.EvalSet:
        key = prepared.config.key
        if key not in self.eval_sets:
            if self.data is not None:
                ev = quality.imagefolder_set(self.data, prepared.preprocessing, prepared.info.num_classes,
                                             self.config.max_images)
            elif prepared.training is not None or prepared.create_args["name"] in ("digits_vit", "tome_digits_vit"):
                ev = quality.digits_set(dict(prepared.config.train or ()).get("seed", 0))
            else:
                ev = quality.photo_set(prepared.preprocessing, self.config.photos)
            self.eval_sets[key] = ev
        return self.eval_sets[key]

    def reference(self, prepared: PreparedModel) -> Dict[str, Any]:
        """fp32 r=0 eager PyTorch on the evaluation images: what every variant's fidelity is measured against."""
        key = prepared.config.key
        if key not in self.references:
            ev = self.eval_set(prepared)
            logits = TorchSubject(prepared.model, 0, "fp32").predict(ev.images)
            acc = quality.accuracy(logits, ev.labels) if ev.labels is not None else None
            self.references[key] = {"logits": logits, "accuracy": acc}
            info = prepared.info
            self.results["models"][key] = {
                "model": prepared.config.model, "description": prepared.config.describe(),
                "create_args": {k: v for k, v in prepared.create_args.items()}, "training": prepared.training,
                "eval_set": ev.name, "reference": "eager PyTorch, fp32, r=0", "reference_accuracy": acc,
                "tokens": info.num_tokens, "blocks": info.num_blocks, "embed_dim": info.embed_dim,
                "num_classes": info.num_classes, "input_size": list(prepared.preprocessing.input_size),
                **({"published": dict(prepared.config.published)} if prepared.config.published else {}),
            }
        return self.references[key]

    def reference_decisions(self, prepared: PreparedModel, variant: Variant, x: np.ndarray) -> Dict[str, np.ndarray]:
        key = (prepared.config.key, variant.r_label)
        if key not in self.ref_decisions:
            ref = TorchSubject(prepared.model, variant.r, "fp32", prop_attn=variant.model.prop_attn)
            self.ref_decisions[key] = merge_destinations(ref.model, ref.tensor(x))
        return self.ref_decisions[key]

    # --- records ---------------------------------------------------------------------------------------------

    def base_record(self, cell: Cell) -> Dict[str, Any]:
        v = cell.variant
        return {"id": cell.id, "variant": v.id, "model": v.model.key, "model_name": v.model.model,
                "backend": v.backend, "target": BACKENDS[v.backend].target or "eager torch",
                "device": BACKENDS[v.backend].device, "precision": v.precision, "r": v.r_label,
                "batch": cell.batch, "threads": cell.threads}

    def finish(self, cell: Cell, record: Dict[str, Any], counter: str) -> None:
        self.results["cells"][cell.id] = record
        self.counts[counter] += 1
        self.bar.update(1)

    def static_facts(self, prepared: PreparedModel, variant: Variant) -> Dict[str, Any]:
        info = prepared.info
        sched = resolve_schedule(variant.r, info.num_blocks, info.num_tokens, info.num_protected)
        return {"r_schedule": list(sched.r), "tokens_per_block": list(sched.tokens),
                "flops": flops_summary(info, sched.r)}

    # --- one model on one backend ----------------------------------------------------------------------------

    def run_backend(self, mc: ModelConfig, backend: str, cells: List[Cell]) -> None:
        variants = list(dict.fromkeys(c.variant for c in cells))
        reasons = {v: matrix.skip_reason(backend, v.precision, self.gpu) for v in variants}
        for cell in cells:
            if reasons[cell.variant] is not None:
                self.finish(cell, {**self.base_record(cell), "status": "skipped", "reason": reasons[cell.variant]},
                            "skipped")
        live = [c for c in cells if reasons[c.variant] is None]
        # measured and failed cells are final (--force retries failures); skipped ones are tried again every run
        final = {c.id: self.prev_cells[c.id] for c in live
                 if self.prev_cells.get(c.id, {}).get("status") in ("measured", "failed")}
        groups: Dict[tuple, List[Cell]] = {}
        for c in live:
            groups.setdefault((c.threads, c.batch), []).append(c)
        # a group is timed again as a whole when any member is new, so its speedups stay side by side
        to_time = {g for g, members in groups.items() if any(c.id not in final for c in members)}
        gave_up = {v for v in variants if reasons[v] is None
                   and all(final.get(c.id, {}).get("status") == "failed" for c in live if c.variant == v)}
        needs_quality = [v for v in variants if reasons[v] is None and v not in gave_up
                         and v.id not in self.prev_variants]
        needs_memory = self.config.memory and any(
            final.get(c.id, {}).get("status") == "measured" and "memory" not in final[c.id] for c in live)
        for v in variants:
            if v.id in self.prev_variants:
                self.results["variants"][v.id] = self.prev_variants[v.id]
        if not to_time and not needs_quality and not needs_memory:
            for c in live:
                self.finish(c, final[c.id], "resumed")
            return

        prepared = self.model(mc)
        self.reference(prepared)
        subjects = _Subjects(self, prepared, backend)
        timed: Dict[str, Dict[str, Any]] = {}
        cell_failures: Dict[str, tuple] = {}
        for threads in self.config.threads:
            if threads == self.config.threads[0]:
                for v in needs_quality:
                    subject = subjects.get(v, self.config.batches[-1], threads)
                    if subject is not None:
                        self.measure_quality(prepared, v, subject, subjects.dir_of(v, self.config.batches[-1]))
            for batch in self.config.batches:
                if (threads, batch) not in to_time:
                    continue
                members = [c for c in groups[(threads, batch)] if final.get(c.id, {}).get("status") != "failed"]
                group_subjects = {c.variant: subjects.get(c.variant, batch, threads) for c in members}
                members = [c for c in members if group_subjects[c.variant] is not None]
                new = self.time_group(prepared, members, group_subjects, cell_failures)
                timed.update(new)
                self.results["cells"].update(new)
                self.save()  # an interrupted run keeps every finished group
            subjects.release()

        for c in live:
            if c.id in timed:
                record = timed[c.id]
            elif c.id in cell_failures or c.variant in subjects.failed:
                status, reason = cell_failures.get(c.id) or subjects.failed[c.variant]
                record = {**self.base_record(c), "status": status, "reason": reason}
            elif c.id in final:
                record = final[c.id]
            else:  # cannot happen: every live cell is timed, failed or final
                raise AssertionError(f"cell {c.id} was neither measured nor resumed")
            self.results["cells"][c.id] = record
        if self.config.memory:
            self.measure_memory(prepared, live, subjects)
        for c in live:
            record = self.results["cells"][c.id]
            self.finish(c, record, "resumed" if c.id in final and c.id not in timed and record is final[c.id]
                        else record["status"])

    # --- measurements ----------------------------------------------------------------------------------------

    def measure_quality(self, prepared: PreparedModel, v: Variant, subject: Subject, directory: Optional[Path]) -> None:
        self.say(f"quality {v.backend} {v.precision} {v.r_label}")
        ev, ref = self.eval_set(prepared), self.reference(prepared)
        try:
            logits = subject.predict(ev.images)
        except Exception as exc:
            self.results["variants"][v.id] = {"variant": v.id, "error": _failure(exc)[1]}
            return
        record: Dict[str, Any] = {"variant": v.id, "eval_set": ev.name,
                                  "fidelity": quality.fidelity(ref["logits"], logits)}
        if ev.labels is not None:
            record["accuracy"] = quality.accuracy(logits, ev.labels)
            record["accuracy_drop"] = ref["accuracy"]["top1"] - record["accuracy"]["top1"]
        x = ev.images[: self.config.decision_images]
        if v.r_label == "r0":
            record["merge_decisions"] = {"agreement": None, "reason": "r=0 merges nothing"}
        elif isinstance(subject, TorchSubject):
            reference = self.reference_decisions(prepared, v, x)
            record["merge_decisions"] = quality.decision_agreement(
                reference, merge_destinations(subject.model, subject.tensor(x)))
        else:
            ref_model = TorchSubject(prepared.model, v.r, "fp32", prop_attn=v.model.prop_attn).model
            try:
                record["merge_decisions"] = quality.artifact_decision_agreement(
                    subject.runner.manifest, directory, ref_model, x, subject.static_batch)
            except Exception as exc:  # a graph the decision reader does not understand: say so, keep the rest
                record["merge_decisions"] = {"agreement": None, "reason": _failure(exc)[1]}
        self.results["variants"][v.id] = record

    def time_group(self, prepared: PreparedModel, members: List[Cell], subjects: Dict[Variant, Subject],
                   failures: Dict[str, tuple]) -> Dict[str, Dict[str, Any]]:
        """Time every member of one (model, backend, batch, threads) group side by side."""
        if not members:
            return {}
        batch, threads = members[0].batch, members[0].threads
        ev = self.eval_set(prepared)
        x = np.ascontiguousarray(ev.images[np.arange(batch) % len(ev.images)])
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)  # eager cells; artifact runners got their threads when loaded
        try:
            runs, clocks, ok = {}, {}, []
            for c in members:
                try:
                    run = subjects[c.variant].timed(x)
                    run()  # a variant that cannot run this batch fails alone, before the clock starts
                except Exception as exc:
                    failures[c.id] = _failure(exc)
                    continue
                runs[c.id] = run
                if subjects[c.variant].clock is not None:
                    clocks[c.id] = subjects[c.variant].clock
                ok.append(c)
            settings = self.config.timing.for_batch(batch)
            self.say(f"timing {members[0].variant.backend} batch {batch}, {threads} thread(s): {len(runs)} variants")
            load_before = list(os.getloadavg())
            timings = measure_interleaved(runs, clocks=clocks, **settings)
            load_after = list(os.getloadavg())
            threads_ran = torch.get_num_threads()
        finally:
            torch.set_num_threads(torch_threads)
        group = f"{self.run_id}:{members[0].variant.model.key}/{members[0].variant.backend}/b{batch}/t{threads}"
        out = {}
        for c in ok:
            subject = subjects[c.variant]
            out[c.id] = {
                **self.base_record(c), "status": "measured", **timings[c.id].summary(batch),
                "timer": subject.timer, "timing": settings, "group": group, "interleaved_with": len(ok),
                "run_id": self.run_id, "measured_at": _now(), "load_average": {"before": load_before, "after": load_after},
                "threads_ran": threads_ran if isinstance(subject, TorchSubject) else threads,
                "artifact": subject.details, **self.static_facts(prepared, c.variant),
            }
        return out

    def measure_memory(self, prepared: PreparedModel, live: List[Cell], subjects: "_Subjects") -> None:
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
            spec: Dict[str, Any] = {"threads": threads, "batches": sorted(c.batch for c in members),
                                    "input_shape": list(prepared.preprocessing.input_size)}
            if directory is None:
                spec.update(kind="torch", create_args=prepared.create_args, r=matrix.r_text(v.r),
                            precision=v.precision, device=BACKENDS[v.backend].device, prop_attn=v.model.prop_attn)
            else:
                spec.update(kind="artifact", directory=str(directory))
            measured = memory.measure_in_subprocess(spec)
            for c in members:
                entry = measured.get(str(c.batch)) if "error" not in measured else None
                self.results["cells"][c.id]["memory"] = (
                    {**entry, "method": memory.METHOD} if entry else {"peak_rss_mb": None, "reason": measured.get("error")})

    # --- the whole matrix ------------------------------------------------------------------------------------

    def run(self) -> BenchResult:
        all_cells = matrix.cells(self.config)
        self.save()  # marks the output directory as the benchmark's before any slow work
        try:
            for mc in self.config.models:
                for backend in self.config.backends:
                    cells = [c for c in all_cells if c.variant.model == mc and c.variant.backend == backend]
                    self.run_backend(mc, backend, cells)
                    self.save()
        finally:
            self.bar.close()
        self.results["cells"] = {c.id: self.results["cells"][c.id] for c in all_cells}  # matrix order
        self.results["runs"][-1].update(finished_at=_now(), load_average_at_end=list(os.getloadavg()),
                                        counts=dict(self.counts))
        write_outputs(self.out, self.results)
        self.save()
        return BenchResult(self.out, self.results, **self.counts)


class _Subjects:
    """The variants of one (model, backend): built once, loaded once per thread count, on demand."""

    def __init__(self, run: _Run, prepared: PreparedModel, backend: str) -> None:
        self.run, self.prepared, self.backend = run, prepared, backend
        self.eager = BACKENDS[backend].target is None
        self.torch: Dict[Variant, TorchSubject] = {}
        self.dirs: Dict[tuple, tuple] = {}  # (variant, batch or None) -> (directory, built by this run)
        self.loaded: Dict[tuple, ArtifactSubject] = {}
        self.failed: Dict[Variant, tuple] = {}

    def _key(self, v: Variant, batch: int) -> tuple:
        return (v, None if self.run.config.dynamic_batch else batch)

    def dir_of(self, v: Variant, batch: int) -> Optional[Path]:
        entry = self.dirs.get(self._key(v, batch))
        return entry[0] if entry else None

    def get(self, v: Variant, batch: int, threads: int) -> Optional[Subject]:
        """The variant ready to run ``batch`` images with ``threads`` threads; None when it cannot be had."""
        if v in self.failed:
            return None
        try:
            if self.eager:
                if v not in self.torch:
                    self.run.say(f"preparing torch {v.precision} {v.r_label}")
                    self.torch[v] = TorchSubject(self.prepared.model, v.r, v.precision, BACKENDS[self.backend].device,
                                                 prop_attn=v.model.prop_attn)
                return self.torch[v]
            key = self._key(v, batch)
            if key not in self.dirs:
                cfg = self.run.config
                directory, cached = ensure_artifact(self.prepared, v, self.run.cache, cfg.dynamic_batch, batch,
                                                    cfg.merge_impl, self.run.say)
                self.dirs[key] = (directory, not cached)
            directory, fresh = self.dirs[key]
            if (directory, threads) not in self.loaded:
                self.loaded[(directory, threads)] = ArtifactSubject(directory, threads, cached=not fresh)
            return self.loaded[(directory, threads)]
        except Exception as exc:  # one variant that cannot be built or loaded must not stop the others
            self.failed[v] = _failure(exc)
            return None

    def release(self) -> None:
        """Drop the loaded runners (their thread count is fixed); eager models serve every thread count."""
        self.loaded.clear()
        gc.collect()


def run_bench(config: BenchConfig, out_dir: os.PathLike, data: Optional[os.PathLike] = None, force: bool = False,
              cache: Optional[os.PathLike] = None, progress: bool = False,
              log: Callable[[str], None] = lambda msg: None) -> BenchResult:
    """Run (or resume) a benchmark matrix; writes results.json/.csv, report.md and plots/ into ``out_dir``.

    ``data``: an ImageFolder of labelled images for top-1/top-5 accuracy (needs real weights). ``cache``: where
    built artifacts live (default ``out_dir/artifacts``); they are reused between cells and between runs.
    """
    out = Path(out_dir)
    _check_out(out)
    _check_requirements(config)
    if data is not None:
        if not Path(data).is_dir():
            raise UserError(f"--data {str(data)!r} is not a directory: pass an ImageFolder (one folder per class)")
        random = [m.model for m in config.models if m.weights == "random"]
        if random:
            raise UserError(f"--data measures accuracy, which random weights do not have ({', '.join(random)}): "
                            f"pass --weights pretrained or --checkpoint PATH")
    out.mkdir(parents=True, exist_ok=True)
    return _Run(config, out, Path(cache) if cache else out / "artifacts", Path(data) if data else None, force,
                progress, log).run()
