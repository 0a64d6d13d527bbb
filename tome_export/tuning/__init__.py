"""``tome-export tune``: the fastest artifact within an accuracy budget, on this machine.

:func:`tune` checks the request (:mod:`.request`, no model needed), loads the model and its fp32 r=0 reference
(:mod:`.measure`), searches r schedules x precisions by bisection on quality (:mod:`.search`), times every built
candidate side by side, chooses the winner with explicit tie rules and says whether ToMe paid (:mod:`.select`),
and writes the winner as a normal build with a ``tune`` manifest section, ``tune.md`` and a Pareto plot
(:mod:`.report`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ..errors import ValidationError
from ..manifest import load_manifest, write_manifest
from .request import TUNE_SECTION, Budget, CheckedRequest, TimingSettings, TuneRequest, check_request, precision_order

Log = Callable[[str], None]

__all__ = ["Budget", "TimingSettings", "TuneRequest", "TuneResult", "tune"]


@dataclass(frozen=True)
class TuneResult:
    path: Path  # the winning artifact, with tune.md and the plot beside its files
    section: Dict[str, Any]  # the manifest's ``tune`` section
    met_budget: bool


def _request(request: Optional[TuneRequest], fields: Dict[str, Any]) -> TuneRequest:
    """A request from keyword arguments: the budget's fields may be given flat (``max_accuracy_drop=1.0``)."""
    if request is not None:
        return dataclasses.replace(request, **fields) if fields else request
    budget = fields.pop("budget", None) or Budget(**{k: fields.pop(k) for k in
                                                     ("max_accuracy_drop", "min_agreement", "max_latency_ms",
                                                      "min_cosine")
                                                     if k in fields})
    if isinstance(fields.get("timing"), dict):
        fields["timing"] = TimingSettings(**fields["timing"])
    if fields.get("precisions") is not None:
        fields["precisions"] = tuple(fields["precisions"])
    if fields.get("output") is not None:
        fields["output"] = Path(fields["output"])
    if isinstance(fields.get("task"), str):
        from ..tasks import as_task

        fields["task"] = as_task(fields["task"])
    return TuneRequest(budget=budget, **fields)


def tune(request: Optional[TuneRequest] = None, log: Log = lambda msg: None, cluster: Optional[str] = None,
         **fields: Any) -> TuneResult:
    """Search r schedules x precisions for the fastest artifact within the budget on this machine, and write it.

    Give a :class:`TuneRequest`, or its fields as keywords, e.g.
    ``tune(model="digits_vit", target="openvino", max_accuracy_drop=1.0, data="digits", output="out")``.
    ``log`` receives one line per step. ``cluster``: build and evaluate the candidates on Ray, and time them on
    one of its nodes (:data:`~tome_export.bench.executors.CLUSTER_HELP`); the winner is written here. Bad input
    raises :class:`~tome_export.errors.UserError` before any model is loaded; when nothing can be built at all,
    :class:`~tome_export.errors.ValidationError`.
    """
    from ..bench.cluster import open_executor
    from ..bench.executors import check_cluster
    from ..bench.harness import modules
    from ..bench.timing import machine, versions

    started = time.perf_counter()
    checked: CheckedRequest = check_request(_request(request, fields))
    check_cluster(cluster)
    environment = {"machine": machine(), "versions": versions(modules()), "load_start": list(os.getloadavg())}
    with open_executor(cluster, log) as executor:
        return _search_and_write(checked, log, started, executor, environment)


def _search_and_write(checked: CheckedRequest, log: Log, started: float, executor: Any,
                      environment: Dict[str, Any]) -> TuneResult:
    from .candidates import listening
    from .measure import Workbench
    from .report import tune_section
    from .search import Candidate, constant_family, run_search
    from .select import choose

    request = checked.request
    bench = Workbench(checked, log, started=started, executor=executor)
    with listening(bench.setting, bench.eval, bench.say):
        baseline = Candidate("fp32", constant_family(bench.shape)[0])
        bench.probe(baseline, force=True)  # always: the reference for speed-ups and the fallback to ship
        search = run_search(bench.shape, precision_order(checked.precisions), bench.screen, bench.probe,
                            bench.look_ahead)
        if search.stopped:
            bench.say(f"search stopped early: {search.stopped}")
        timing = bench.time_built()
        decision = choose(list(bench.evaluations.values()), request.budget, checked.precisions,
                          bench.evaluations[("fp32", baseline.schedule.blocks)], request.tie_tolerance)
        if decision.winner.status != "evaluated":
            raise ValidationError(f"nothing could be built: fp32 r=0 failed ({decision.winner.reason})")
        if executor.kind != "in-process":
            environment = {**environment, "cluster": executor.describe()}
        section = tune_section(request=request, checked=checked, bench=bench, decision=decision, search=search,
                               timing=timing, environment=environment)
        bench.say(f"winner {decision.winner.candidate.key}: {decision.reason}")
        files, again = bench.winner_files(decision.winner)
        section["winner"]["files"] = ("built again on this machine; the same sha256 as the build that was measured"
                                      if again else "the build that was measured")
        path = write_output(request.output, files, section, request.model)
    return TuneResult(path, section, decision.met_budget)


def write_output(out: Path, source: Path, section: Dict[str, Any], model: str) -> Path:
    """Copy the winning build to ``out`` with ``tune.md``, the plot and the manifest's ``tune`` section; the
    manifest is rewritten last, with the checksums of every file, so ``runtime.load`` verifies the report too."""
    from ..files import output_lock, remove_stale_workdirs, staged_output
    from ..ownership import survey
    from .report import PLOT, REPORT, markdown, pareto_plot

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        remove_stale_workdirs(out.parent, out.name)  # puts back a previous output a killed swap left
        with staged_output(out, lambda found: survey(found).foreign) as tmp:  # what is not ours is kept
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            manifest = load_manifest(tmp, verify=True)
            (tmp / REPORT).write_text(markdown(section, model) + "\n")
            pareto_plot(section, model, tmp / PLOT)
            write_manifest(tmp, dataclasses.replace(manifest, sections={**manifest.sections, TUNE_SECTION: section}))
    return Path(out)
