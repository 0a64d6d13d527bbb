"""The build's half of the self-check (:mod:`tome_export.runtime.selfcheck`): choose a few views of the bundled
photos, store them with PyTorch's outputs and the artifact's own outputs on the build machine, and record the
thresholds and the machine.

The views are chosen to be robust where the artifact is right: among the candidates that meet every per-image
threshold on the build machine, those whose merge decisions rest on the widest score gaps (a near-tie may merge
differently under another CPU's rounding and still be correct), one per photo first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np

from ..errors import ValidationError
from ..files import atomic_write
from ..images import SAMPLE_PHOTOS, sample_views, view_names
from ..preprocess import Preprocessing
from ..runtime import selfcheck
from ..runtime.base import Runner
from .decisions import matching_margins
from .validate import torch_outputs

CANDIDATES = len(SAMPLE_PHOTOS)  # views tried: each bundled photo once
VIEWS = 4  # views stored: cheap to run at load, enough to see an artifact that computes something else


@dataclass(frozen=True)
class Recorded:
    """What the manifest gets: the ``self_check`` record and ``validated_on`` (empty when the artifact did not run
    on the build machine), and a note when no self-check could be stored."""

    self_check: Dict[str, Any]
    validated_on: Dict[str, Any]
    note: Optional[str] = None


def _choose(margins: np.ndarray, passing: np.ndarray, count: int) -> List[int]:
    """Up to ``count`` passing candidates, widest merge margin first."""
    return [int(i) for i in np.argsort(-margins, kind="stable") if passing[i]][:count]


def _finite(value: float) -> Optional[float]:
    return value if np.isfinite(value) else None  # no merge decision at all (r=0): no margin


def _passing(runner: Optional[Runner], inputs: np.ndarray, reference: np.ndarray, output: str,
             thresholds: Mapping[str, float]) -> np.ndarray:
    """Per candidate, whether every row the artifact gives for it meets every threshold on its own (without a
    runner: whether PyTorch's top-1 class leads clearly)."""
    if runner is None:  # nothing to run here: keep the views whose top-1 class leads by more than the median
        top2 = np.sort(reference.reshape(len(reference), -1), axis=1)[:, -2:]
        gaps = top2[:, 1] - top2[:, 0]
        return gaps >= np.median(gaps)
    rows, ids = selfcheck.run_views(runner, inputs, output)
    ok = np.ones(len(inputs), dtype=bool)
    for view in range(len(inputs)):
        mine = ids == view
        figures = selfcheck.row_metrics(reference, rows[mine], ids[mine])
        ok[view] = not selfcheck.misses(figures, thresholds)
    return ok


def record_self_check(model: Any, preprocessing: Preprocessing, workdir: Path, thresholds: Mapping[str, float],
                      open_runner: Callable[[], Optional[Runner]], output: str) -> Recorded:
    """Write :data:`~tome_export.runtime.selfcheck.FILE` into ``workdir`` and return the manifest's records.

    ``open_runner``: the artifact's runner in ``workdir`` (None: it cannot run on this machine, e.g. an engine
    built elsewhere; the views are then chosen by margin alone and the build machine's outputs are absent).
    """
    limits = {k: float(v) for k, v in thresholds.items() if k in selfcheck.LIMITS}
    inputs = preprocessing.batch(sample_views(CANDIDATES))
    reference, _ = torch_outputs(model, [inputs])
    margins = matching_margins(model, [inputs])
    runner = open_runner()
    try:
        chosen = _choose(margins, _passing(runner, inputs, reference, output, limits), VIEWS)
        if not chosen:
            return Recorded({}, {}, "no view of the bundled photos met the thresholds on its own: the artifact "
                            "carries no self-check")
        data = selfcheck.SelfCheckData(inputs[chosen], reference[chosen])
        built, environment, figures = None, {}, None
        if runner is not None:
            built, ids = selfcheck.run_views(runner, data.inputs, output)
            figures = selfcheck.row_metrics(data.reference, built, ids)
            if selfcheck.misses(figures, limits):  # the views passed one by one: the backend is not repeatable
                raise ValidationError(f"the artifact does not reproduce its own outputs on the machine that built "
                                      f"it ({'; '.join(selfcheck.misses(figures, limits))}); nothing was written")
            environment = runner.environment()
    finally:
        if runner is not None:
            runner.close()
    atomic_write(workdir / selfcheck.FILE, selfcheck.SelfCheckData(data.inputs, data.reference, built).to_bytes())
    record = {"file": selfcheck.FILE, "format": selfcheck.FORMAT, "views": len(chosen),
              "photos": [view_names(CANDIDATES)[i] for i in chosen],
              "runs": "each view alone, then all together" if runner is not None and runner.batch_size is None
              else "batches of the artifact's static batch",
              "reference": "the fp32 PyTorch ToMe model the build validated against", "thresholds": limits,
              "smallest_merge_margin": _finite(float(margins[chosen].min())),
              "on_build_machine": {k: figures[k] for k in ("max_abs_diff", "min_cosine", "top1_agreement")}
              if figures else None}
    return Recorded(record, environment)
