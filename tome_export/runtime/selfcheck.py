"""An artifact checks itself where it runs: before a runner's first use on a machine, it runs a few views of the
bundled photos stored in the artifact and compares its outputs with the PyTorch outputs the build validated
against, under the build's own thresholds.

A backend picks its kernels by the machine it runs on (CPU features, ``ONEDNN_MAX_CPU_ISA``, library versions,
the GPU), so an artifact validated on one machine can compute something else on another, silently. The build
stores the views, the PyTorch outputs and the outputs the artifact gave on the build machine in
:data:`FILE` (covered by the manifest's checksums) and the thresholds in the manifest's ``self_check``. A pass is
cached per artifact x runner environment (:func:`environment_key`), so a machine pays for the check once; a
failure is never cached, and raises :class:`SelfCheckError`.

Works for every runner through the runner contract (``runner.infer`` and ``runner.environment()``); imports no
torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .._version import __version__
from ..errors import UserError, ValidationError
from ..files import atomic_write
from ..manifest import MANIFEST, Manifest, confined
from .machine import describe_cpu

FILE = "selfcheck.npz"  # inputs, reference (PyTorch) and built (the artifact on the build machine)
FORMAT = 1
SKIP_VARIABLE = "TOME_EXPORT_SELF_CHECK"  # "0": skip the check everywhere (as self_check=False does)
CACHE_VARIABLE = "TOME_EXPORT_CACHE"  # the cache folder (default: $XDG_CACHE_HOME/tome-export, ~/.cache/tome-export)
# threshold -> (the measured figure it limits, whether the figure must stay at most or at least the limit); the
# names are the recipe's ``validation`` keys
LIMITS: Dict[str, Tuple[str, str]] = {"max_abs_diff": ("max_abs_diff", "at most"),
                                      "min_cosine": ("min_cosine", "at least"),
                                      "min_top1_agreement": ("top1_agreement", "at least")}


class SelfCheckError(ValidationError):
    """An artifact computes something else on this machine than on the machine where it was validated."""


def logit_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The cosine of each row ``(N,)`` between two ``(N, ...)`` arrays (in float64)."""
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    cand = candidate.astype(np.float64).reshape(len(candidate), -1)
    return (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-30)


# --- the data a build stores --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfCheckData:
    """The views a self-check runs, PyTorch's outputs for them, and (when the build could run the artifact) the
    artifact's outputs on the build machine, one row per run row (:func:`run_plan`)."""

    inputs: np.ndarray  # (K, C, H, W)
    reference: np.ndarray  # (K, ...) PyTorch, what the build validated against
    built: Optional[np.ndarray] = None  # (rows, ...) the artifact on the build machine, in run order

    def to_bytes(self) -> bytes:
        arrays = {"inputs": self.inputs, "reference": self.reference}
        if self.built is not None:
            arrays["built"] = self.built
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def read(cls, path: Path) -> "SelfCheckData":
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["inputs"], data["reference"], data["built"] if "built" in data.files else None)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path} is not a readable self-check file ({exc}): rebuild the artifact") from None


def run_plan(views: int, batch: Optional[int]) -> List[List[int]]:
    """Which views each run holds: a static batch runs batches of that size filled from the views in turn; a
    dynamic batch runs every view alone and then all of them together (kernels differ by batch size)."""
    if batch is None:
        return [[i] for i in range(views)] + ([list(range(views))] if views > 1 else [])
    return [[(start + j) % views for j in range(batch)] for start in range(0, views, batch)]


def run_views(runner: Any, inputs: np.ndarray, output: str) -> Tuple[np.ndarray, np.ndarray]:
    """The runner's ``output`` for every run of :func:`run_plan`, concatenated, and the view of each row."""
    plan = run_plan(len(inputs), runner.batch_size)
    rows = [runner.infer(np.ascontiguousarray(inputs[ids]), [output])[output] for ids in plan]
    return np.concatenate(rows), np.array([i for ids in plan for i in ids], dtype=np.int64)


def row_metrics(reference: np.ndarray, candidate: np.ndarray, ids: np.ndarray) -> Dict[str, Any]:
    """Per-row figures of ``candidate`` against ``reference[ids]``, and the summary the thresholds limit: largest
    difference, smallest cosine, and the share of views whose top-1 class agrees in every row."""
    ref = reference[ids].astype(np.float64).reshape(len(ids), -1)
    cand = candidate.astype(np.float64).reshape(len(ids), -1)
    cosines, diffs = logit_cosines(ref, cand), np.abs(ref - cand).max(1)
    agree_rows = ref.argmax(1) == cand.argmax(1)
    views = np.unique(ids)
    agreeing = int(sum(agree_rows[ids == v].all() for v in views))
    return {"max_abs_diff": float(diffs.max()), "min_cosine": float(cosines.min()),
            "top1_agreement": agreeing / len(views), "views": int(len(views)), "runs": int(len(ids)),
            "row_cosines": [round(float(c), 6) for c in cosines], "row_agrees": agree_rows.tolist()}


def misses(metrics: Mapping[str, Any], thresholds: Mapping[str, float]) -> List[str]:
    """Each threshold the figures miss, as ``"min_cosine 0.48 (must be at least 0.99)"``."""
    found = []
    for key, limit in thresholds.items():
        if key not in LIMITS:
            continue
        metric, sense = LIMITS[key]
        value = metrics[metric]
        if not (value <= limit if sense == "at most" else value >= limit):
            found.append(f"{metric} {value:.6g} (must be {sense} {limit:g})")
    return found


# --- the check ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one self-check found (or found earlier, ``cached``)."""

    passed: bool
    metrics: Dict[str, Any]  # against the PyTorch reference
    thresholds: Dict[str, float]
    environment: Dict[str, Any]  # this machine, as the runner describes it
    drift: Optional[Dict[str, Any]] = None  # against the artifact's outputs on the build machine
    misses: Tuple[str, ...] = ()
    cached: bool = False
    key: str = ""
    validated_on: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"passed": self.passed, "cached": self.cached, "metrics": self.metrics, "thresholds": self.thresholds,
                "misses": list(self.misses), "drift_from_build_machine": self.drift, "environment": self.environment,
                "validated_on": self.validated_on, "key": self.key}


def has_self_check(manifest: Manifest) -> bool:
    return bool(manifest.self_check.get("file"))


def environment_key(manifest: Manifest, environment: Mapping[str, Any]) -> str:
    """What a cached pass is valid for: this artifact (its manifest digest covers every file), this tool's
    version and the runner's environment (CPU model and flags, ISA limits, library versions, device)."""
    artifact = manifest.digest or json.dumps(manifest.artifacts, sort_keys=True)
    text = json.dumps({"format": FORMAT, "artifact": artifact, "tool": __version__, "environment": environment},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_folder() -> Path:
    root = os.environ.get(CACHE_VARIABLE)
    if root:
        return Path(root) / "self-check"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tome-export" / "self-check"


def _cached(key: str) -> Optional[Dict[str, Any]]:
    try:
        entry = json.loads((cache_folder() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("passed") is True and entry.get("key") == key else None


def remember(outcome: Outcome, directory: Path) -> None:
    """Cache a pass (atomically: concurrent loaders write the same entry whole); a cache that cannot be written
    only means the check runs again next time."""
    entry = {**outcome.to_dict(), "artifact": str(Path(directory).resolve()),
             "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        atomic_write(cache_folder() / f"{outcome.key}.json", json.dumps(entry, indent=1, default=str) + "\n")
    except OSError:
        pass


def _stored(directory: Path, manifest: Manifest) -> Tuple[Path, Dict[str, float]]:
    """The self-check's file (inside the directory and covered by the checksums) and its thresholds."""
    record = manifest.self_check
    rel, limits = record.get("file"), record.get("thresholds") or {}
    path = confined(directory, rel)
    numbers = isinstance(limits, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in limits.values())
    if path is None or rel not in manifest.artifacts or not numbers:
        raise UserError(f"the self-check recorded in {directory / MANIFEST} is not one tome-export wrote (its file "
                        f"{rel!r} or thresholds {limits!r}): rebuild the artifact")
    return path, {k: float(v) for k, v in limits.items() if k in LIMITS}


def measure(directory: Path, manifest: Manifest, runner: Any, environment: Optional[Dict[str, Any]] = None) -> Outcome:
    """Run the stored views now (no cache) and compare them with the stored outputs."""
    path, thresholds = _stored(Path(directory), manifest)
    data = SelfCheckData.read(path)
    output = runner.io.outputs[0]
    rows, ids = run_views(runner, data.inputs, output)
    if rows.shape[1:] != data.reference.shape[1:]:
        raise UserError(f"{path} holds outputs of shape {data.reference.shape[1:]}, the artifact gives "
                        f"{rows.shape[1:]}: the directory is inconsistent; rebuild it")
    metrics = row_metrics(data.reference, rows, ids)
    drift = None
    if data.built is not None and data.built.shape == rows.shape:
        built = data.built.astype(np.float64).reshape(len(rows), -1)
        drift = {"max_abs_diff": float(np.abs(built - rows.reshape(len(rows), -1)).max()),
                 "min_cosine": float(logit_cosines(built, rows).min())}
    environment = environment if environment is not None else runner.environment()
    missed = tuple(misses(metrics, thresholds))
    return Outcome(not missed, metrics, thresholds, environment, drift, missed,
                   key=environment_key(manifest, environment), validated_on=dict(manifest.validated_on))


def ensure(directory: Path, manifest: Manifest, runner: Any, use_cache: bool = True) -> Optional[Outcome]:
    """The self-check before a runner's first use on this machine: a cached pass, or a check run now (a pass is
    cached). Raises :class:`SelfCheckError` when the artifact computes something else here. None: the artifact
    holds no self-check (built before there were any)."""
    if not has_self_check(manifest):
        return None
    environment = runner.environment()
    key = environment_key(manifest, environment)
    entry = _cached(key) if use_cache else None
    if entry is not None:
        return Outcome(True, entry.get("metrics", {}), entry.get("thresholds", {}), environment,
                       entry.get("drift_from_build_machine"), cached=True, key=key,
                       validated_on=dict(manifest.validated_on))
    outcome = measure(directory, manifest, runner, environment)
    if not outcome.passed:
        raise SelfCheckError(refusal(directory, outcome))
    remember(outcome, directory)
    return outcome


def _where(environment: Mapping[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in sorted((environment.get("versions") or {}).items()))
    device = environment.get("device") or {}
    gpu = f", {device.get('name')}" if isinstance(device, dict) and device.get("name") else ""
    return f"{describe_cpu(environment.get('cpu') or {})}{gpu}" + (f", {versions}" if versions else "")


def refusal(directory: Path, outcome: Outcome) -> str:
    """The one-line reason a runner is refused."""
    built = f"validated on {_where(outcome.validated_on)}; " if outcome.validated_on else ""
    return (f"{str(directory)!r} computes something else on this machine than it was validated to compute: on "
            f"{outcome.metrics['views']} stored views, {'; '.join(outcome.misses)} against the outputs the build "
            f"validated; {built}running on {_where(outcome.environment)}. Rebuild the artifact on this machine "
            f"(or one like it), or run it unchecked with self_check=False ({SKIP_VARIABLE}=0)")


def outcome_lines(directory: Path, outcome: Outcome) -> List[str]:
    """What ``tome-export verify`` prints."""
    m = outcome.metrics
    limits = ", ".join(f"{k} {v:g}" for k, v in outcome.thresholds.items()) or "none"
    verdict = ("verified", "computes what it was validated to compute on this machine") if outcome.passed else (
        "FAILED", "computes something ELSE on this machine than it was validated to compute")
    lines = [f"{verdict[0]} {directory}: {verdict[1]}",
             f"  self-check   {m['views']} stored views ({m['runs']} rows): max |diff| {m['max_abs_diff']:.3g}, min "
             f"cosine {m['min_cosine']:.6f}, top-1 agreement {m['top1_agreement']:.3f} against the PyTorch outputs "
             f"the build validated against (thresholds: {limits})"]
    if outcome.drift:
        lines.append(f"  drift        from the artifact's outputs on the build machine: max |diff| "
                     f"{outcome.drift['max_abs_diff']:.3g}, min cosine {outcome.drift['min_cosine']:.6f}")
    lines.append(f"  this machine {_where(outcome.environment)}")
    if outcome.validated_on:
        lines.append(f"  validated on {_where(outcome.validated_on)}")
    return lines


def skipped_by_environment() -> bool:
    return os.environ.get(SKIP_VARIABLE, "").strip().lower() in ("0", "false", "no", "off")


__all__ = ["FILE", "Outcome", "SelfCheckData", "SelfCheckError", "ensure", "environment_key", "measure",
           "misses", "outcome_lines", "refusal", "remember", "row_metrics", "run_plan", "run_views"]
