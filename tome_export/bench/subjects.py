"""The things a benchmark runs: an eager PyTorch model or a built artifact, behind one small interface.

``predict(x)`` gives logits for quality measurements (any number of images); ``timed(x)`` gives the callable
the clock runs (inputs already prepared, so the timing covers inference only, as a serving loop would).
"""

from __future__ import annotations

import copy
import io
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch

from ..errors import UserError
from ..info import ModelInfo
from ..models import create_model, model_info, patch, preprocessing, set_task
from ..pipeline import BuildRequest, build
from ..preprocess import Preprocessing
from ..schedule import RSpec, r_label
from ..tasks import Task
from .config import ModelConfig
from .config import Variant
from .matrix import backends
from .timing import cuda_clock_ms, cuda_graph

PREDICT_BATCH = 64  # quality passes only; timing uses the cell's batch


@dataclass
class LoadedModel:
    """A config model, ready: the fp32 eval model (unpatched), how to rebuild it, and its shape facts."""

    config: ModelConfig
    model: torch.nn.Module
    info: ModelInfo
    preprocessing: Preprocessing
    create_args: Dict[str, Any]  # create_model arguments (also what a memory subprocess rebuilds it from)
    training: Optional[Dict[str, Any]] = None  # the digits case: checkpoint and fp32 test accuracy


def load_model(mc: ModelConfig, log: Callable[[str], None] = lambda msg: None) -> LoadedModel:
    """Create (and for the digits case train, seeded and cached) the model of a config entry."""
    kwargs = dict(mc.kwargs)
    training = None
    checkpoint = mc.checkpoint
    if mc.train is not None:
        from .digits import train_digits_vit

        train = dict(mc.train)
        log(f"training {mc.model} (cached after the first run)")
        path, metrics = train_digits_vit(epochs=train.get("epochs", 40), seed=train.get("seed", 0),
                                         lr=train.get("lr", 3e-4), batch=train.get("batch", 64), log=log, **kwargs)
        checkpoint, training = str(path), {"checkpoint": str(path), **metrics}
    args = {"name": mc.model, "weights": "random" if mc.weights in ("checkpoint", "trained") else mc.weights,
            "checkpoint": checkpoint, "seed": mc.seed, "kwargs": kwargs}
    model = create_from(args)
    return LoadedModel(mc, model, model_info(model), preprocessing(model), args, training)


def create_from(args: Dict[str, Any]) -> torch.nn.Module:
    model, _ = create_model(args["name"], weights=args["weights"], checkpoint=args["checkpoint"], seed=args["seed"],
                            **args["kwargs"])
    return model


class Subject:
    """One variant, loaded and ready to run."""

    timer = "wall clock (perf_counter)"
    clock: Optional[Callable] = None  # None: wall clock
    static_batch: Optional[int] = None
    details: Dict[str, Any]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The first output (logits of a classifier) of any number of images."""
        return next(iter(self.predict_outputs(x).values()))

    def predict_outputs(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        """Every output of the task, by name, for any number of images, in chunks (padded for a static-batch
        artifact)."""
        size = self.static_batch or PREDICT_BATCH
        out: Dict[str, list] = {}
        for i in range(0, len(x), size):
            chunk = x[i:i + size]
            n = len(chunk)
            if self.static_batch and n < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
            for name, value in self._run_all(np.ascontiguousarray(chunk)).items():
                value = np.asarray(value)
                out.setdefault(name, []).append((value.astype(np.float32) if value.dtype.kind == "f" else value)[:n])
        return {name: np.concatenate(parts) for name, parts in out.items()}

    def timed(self, x: np.ndarray) -> Callable[[], object]:
        raise NotImplementedError

    def _run_all(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the subject holds (an artifact's runner); eager models are shared and stay."""


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TorchSubject(Subject):
    """Eager PyTorch: a patched copy of the fp32 model, converted to the variant's precision."""

    def __init__(self, base: torch.nn.Module, r: RSpec, precision: str, device: str = "cpu",
                 prop_attn: bool = True, graph: bool = False, task: Task = Task()) -> None:
        started = time.perf_counter()
        model = patch(copy.deepcopy(base), r, prop_attn=prop_attn)
        self.task = set_task(model, task)
        self.dtype = _DTYPES.get(precision, torch.float32)
        if precision in _DTYPES:
            model = model.to(self.dtype)
        elif precision == "int8":
            import warnings

            with warnings.catch_warnings():  # torch.ao's eager quantization announces its move to torchao
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        elif precision != "fp32":
            raise UserError(f"eager PyTorch has no {precision} mode")
        self.model = model.to(device).eval()
        self.device, self.graph = device, graph
        if device == "cuda":
            self.clock, self.timer = cuda_clock_ms, "CUDA events" + (" around CUDA-graph replays" if graph else "")
        buffer = io.BytesIO()
        torch.save(self.model.state_dict(), buffer)
        self.details = {"artifact_bytes": buffer.tell(), "artifact": "state_dict as torch.save writes it",
                        "build_seconds": round(time.perf_counter() - started, 2), "cached": False,
                        "merge_impl": "gather", "dynamic_batch": True,
                        "precision_ran": {"bf16": "bf16 weights and activations", "fp16": "fp16 weights and activations",
                                          "int8": "int8 dynamic quantization of Linear layers (torch.ao)"}.get(
                                              precision, "fp32")}

    def tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.device, self.dtype)

    def _run_all(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        with torch.inference_mode():
            values = self.model.tome_outputs(self.tensor(x))
        return {name: (v.float() if v.is_floating_point() else v).cpu().numpy()
                for name, v in zip(self.task.outputs, values)}

    def timed(self, x: np.ndarray) -> Callable[[], object]:
        xt = self.tensor(x)
        model = self.model

        def run() -> object:
            with torch.inference_mode():
                return model(xt)

        return cuda_graph(run) if self.graph else run


class ArtifactSubject(Subject):
    """A built artifact directory, run by its target's runner (``tome_export.runtime``)."""

    def __init__(self, directory: Path, threads: int, cached: bool) -> None:
        from ..runtime import open_artifact

        self.artifact = open_artifact(directory)
        self.runner = self.artifact.load(threads=threads)
        self.static_batch = self.runner.batch_size
        self.timer = f"wall clock (perf_counter) around the {type(self.runner).__name__} call"
        m = self.artifact.manifest
        validation = m.validation
        self.details = {
            "artifact_dir": str(directory), "artifact_bytes": sum(a["bytes"] for a in m.artifacts.values()),
            "build_seconds": m.build_seconds, "cached": cached, "merge_impl": m.merge_impl,
            "dynamic_batch": m.input.dynamic_batch, "runner": type(self.runner).__name__,
            "precision_ran": validation.get("precision_ran", m.precision),
            "build_validation": {k: validation[k] for k in ("backend", "max_abs_diff", "min_cosine", "top1_agreement")
                                 if k in validation},
        }

    def _run_all(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        return self.runner.infer(x, list(self.artifact.manifest.task_outputs))

    def timed(self, x: np.ndarray) -> Callable[[], object]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        runner = self.runner
        return lambda: runner(x)

    def close(self) -> None:
        self.runner.close()


def artifact_dir(cache: Path, variant: Variant, dynamic_batch: bool, batch: int) -> Path:
    shape = "dyn" if dynamic_batch else f"b{batch}"
    return cache / f"{variant.model.key}-{variant.r_label}-{backends()[variant.backend].target}-{variant.precision}-{shape}"


@contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing), waiting for it: two jobs that build the same artifact
    on one disk (two nodes of a cluster on one machine, or a shared cache) take turns, and the second finds the
    first's build."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one job at a time there anyway
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_artifact(prepared: LoadedModel, variant: Variant, cache: Path, dynamic_batch: bool, batch: int,
                    merge_impl: str, log: Callable[[str], None]) -> tuple:
    """Build the variant's artifact once (through the same pipeline as ``tome-export``); returns (dir, cached)."""
    out = artifact_dir(cache, variant, dynamic_batch, batch)
    with waiting_lock(cache / f".{out.name}.wait"):
        if (out / "manifest.json").is_file():
            return out, True
        _build_variant(prepared, variant, out, dynamic_batch, batch, merge_impl, log)
    return out, False


def _build_variant(prepared: LoadedModel, variant: Variant, out: Path, dynamic_batch: bool, batch: int,
                   merge_impl: str, log: Callable[[str], None]) -> None:
    cache = out.parent
    if not (cache / ".gitignore").exists():  # built models are large: keep them out of a results commit
        (cache / ".gitignore").write_text("*\n")
    args = prepared.create_args
    weights = "random" if args["checkpoint"] else args["weights"]
    log(f"building {variant.backend} {variant.precision} {r_label(variant.r)}")
    build(BuildRequest(
        model=args["name"], r=variant.r, target=backends()[variant.backend].target, precision=variant.precision,
        batch=batch, dynamic_batch=dynamic_batch, output=out, weights=weights, checkpoint=args["checkpoint"],
        seed=args["seed"], merge_impl=merge_impl, model_kwargs=dict(args["kwargs"]), force=True,
        prop_attn=variant.model.prop_attn, task=variant.model.task,
    ), log=lambda msg: log(f"{variant.backend} {variant.precision} {r_label(variant.r)}: {msg}"),
        warn=lambda msg: log(f"warning: {msg}"))
