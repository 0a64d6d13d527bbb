"""The step on the GPU machine: build a TensorRT build directory's engine, validate it, record it.

A ``--target tensorrt`` build made where TensorRT (or a GPU) is missing ships ``model.onnx`` and the settings its
engine must be built with. :func:`finish_engine` builds that engine with the TensorRT Python API and the
recorded settings (:class:`.engine.EngineSpec`), runs it against the same ONNX in ONNX Runtime on the bundled
photos where a CUDA GPU is present, and records the engine (checksummed), the library, the device and the
validation in the manifest, so :func:`tome_export.runtime.load` accepts it. Nothing is written unless every step
succeeds: the engine is built under a temporary name and renamed into place only after it validated.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import numpy as np

from ...errors import UserError
from ...files import atomic_path, sha256_file
from ...manifest import Manifest, load_manifest, write_manifest
from ...preprocess import Preprocessing
from ...quality.validate import (DEFAULT_IMAGES, Thresholds, check_thresholds, compare_outputs, input_ids,
                                 validation_batches)
from ...runtime.tensorrt import cuda_device
from ..base import Finished
from .engine import (ENGINE, ONNX, TENSORRT, TENSORRT_RTX, EngineSpec, Library, engine_note,
                     engine_unavailable_reason)

LIBRARIES = {"tensorrt": TENSORRT, "tensorrt-rtx": TENSORRT_RTX}  # by target
NO_GPU = "no CUDA GPU here"


@dataclass(frozen=True)
class EngineResult:
    """What :func:`finish_engine` did: the engine's facts and its validation as recorded in the manifest."""

    directory: Path
    engine: Dict[str, Any]
    validation: Dict[str, Any]

    @property
    def validated(self) -> bool:
        return bool(self.validation.get("passed"))


def tensorrt_build(directory: Path) -> Manifest:
    """The verified manifest of a TensorRT build directory; anything else is a UserError saying what to pass."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory: pass a build directory written by "
                        f"tome-export --target tensorrt or tensorrt-rtx")
    manifest = load_manifest(directory)  # every checksum verified
    if manifest.target not in LIBRARIES or not isinstance(manifest.section("tensorrt"), dict):
        raise UserError(f"{str(directory)!r} is a --target {manifest.target} build: `tome-export engine` builds the "
                        f"engine of a --target tensorrt or tensorrt-rtx build")
    return manifest


def _library(manifest: Manifest) -> Library:
    library = LIBRARIES[manifest.target]
    reason = engine_unavailable_reason(library)
    if reason is not None:
        raise UserError(f"no {library.display} engine can be built here: {reason}")
    return library


def _validation_stack() -> None:
    """Validation runs the ONNX in ONNX Runtime: refuse before building when that cannot run here."""
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"validating the engine runs {ONNX} in ONNX Runtime, and {module!r} is not installed "
                            f"here: pip install 'tome-export[engine]'") from None


def validate_engine(directory: Path, manifest: Manifest, engine_file: str) -> Dict[str, Any]:
    """``engine_file`` (in ``directory``) vs ``model.onnx`` in ONNX Runtime at the recorded precision, on the
    views of the bundled photos the build validated on, against the thresholds its validation applied. Needs a
    CUDA GPU."""
    import onnx

    from ...runtime import runtime_settings
    from ...runtime.base import ArtifactIO
    from ...runtime.tensorrt import TensorRTRunner
    from .validation import HOW_RUN, cpu_runner

    io = ArtifactIO.from_manifest(directory, manifest, runtime_settings(manifest))
    spec = _spec(manifest)
    batches = [x for x in validation_batches(Preprocessing.from_dict(manifest.preprocessing), spec.profile.opt,
                                             spec.profile.dynamic, _photos(manifest))
               if spec.profile.min <= len(x) <= spec.profile.max]
    names = list(manifest.task_outputs)
    with cpu_runner(onnx.load(str(directory / ONNX)), manifest.precision, io) as reference:
        expected = [reference.infer(x, names) for x in batches]
    with TensorRTRunner(replace(io, runtime={**io.runtime, "file": engine_file})) as engine:
        got = [engine.infer(x, names) for x in batches]
    limits = {k: v for k, v in (manifest.validation.get("thresholds") or {}).items()
              if k in ("max_abs_diff", "min_cosine", "min_top1_agreement")}
    joined = [{name: np.concatenate([o[name] for o in outputs]) for name in names} for outputs in (expected, got)]
    checked = check_thresholds(compare_outputs(*joined, input_ids(batches)), Thresholds(**limits),
                               f"the {manifest.precision} engine on this GPU (against {ONNX} in ONNX Runtime)")
    return {"run": True, "against": f"{ONNX}: {HOW_RUN[manifest.precision]}", **checked}


def _photos(manifest: Manifest) -> int:
    images = (manifest.recipe.get("validation") or {}).get("images") if isinstance(manifest.recipe, dict) else None
    return int(images or DEFAULT_IMAGES)


def _spec(manifest: Manifest) -> EngineSpec:
    return EngineSpec.from_facts(LIBRARIES[manifest.target], manifest.section("tensorrt"), manifest.input.image_shape)


def not_validated(directory: Path) -> Dict[str, Any]:
    """The validation record of an engine built where it cannot run."""
    return {"run": False, "reason": NO_GPU,
            "how": f"run `tome-export engine {directory} --validate-only` on the GPU machine"}


def finish_engine(directory: Path, force: bool = False, validate_only: bool = False,
                  log: Callable[[str], None] = lambda message: None) -> EngineResult:
    """Build (unless ``validate_only``), validate where a CUDA GPU is, and record ``directory``'s engine.

    ``force``: replace an engine the directory already holds. A UserError (bad directory, library missing,
    an engine already there) or a ValidationError leaves the directory as it was.
    """
    directory = Path(directory)
    manifest = tensorrt_build(directory)
    if validate_only:
        return _validate_recorded(directory, manifest, log)
    library = _library(manifest)
    if (directory / ENGINE).exists() and not force:
        covered = "recorded in its manifest" if ENGINE in manifest.artifacts else "not covered by its manifest"
        raise UserError(f"{str(directory)!r} already holds {ENGINE} ({covered}): pass --force to build it again "
                        f"and replace it, or --validate-only to validate the recorded one")
    spec = _spec(manifest)
    device = cuda_device()
    if device is not None:
        _validation_stack()
    cache = directory / spec.timing_cache if spec.timing_cache and library.timing_cache else None
    with atomic_path(directory / ENGINE) as engine_tmp, _cache_copy(cache) as cache_tmp:
        log(f"building {ENGINE} with {library.display} from {ONNX}")
        engine = {**spec.build(directory, engine_tmp, cache_tmp), "file": ENGINE, "timing_cache": spec.timing_cache}
        if device is None:
            validation = not_validated(directory)
        else:
            log(f"validating the engine on {device['name']} against {ONNX} in ONNX Runtime")
            validation = validate_engine(directory, manifest, engine_tmp.name)
    engine.update(sha256=sha256_file(directory / ENGINE), device=device or {"name": None, "reason": NO_GPU})
    _record(directory, manifest, library, engine, validation)
    return EngineResult(directory, engine, validation)


def finish(directory: Path, force: bool = False, validate_only: bool = False,
           log: Callable[[str], None] = lambda message: None) -> Finished:
    """:func:`finish_engine` as the targets' finishing step (``tome-export engine DIR``)."""
    result = finish_engine(directory, force=force, validate_only=validate_only, log=log)
    engine = result.engine
    summary = (f"{engine['library']} {engine['library_version']}, {engine['bytes'] / 1e6:.1f} MB, "
               f"{engine['build_seconds']} s; sha256 {engine['sha256'][:16]}...")
    return Finished(result.directory, engine["file"], summary, result.validation, engine["device"].get("name"))


@contextlib.contextmanager
def _cache_copy(cache: Optional[Path]) -> Iterator[Optional[Path]]:
    """A temporary copy of the timing cache (None: no cache) that replaces it only when the block succeeds."""
    if cache is None:
        yield None
        return
    with atomic_path(cache) as tmp:
        if cache.is_file():
            shutil.copyfile(cache, tmp)
        yield tmp


def _validate_recorded(directory: Path, manifest: Manifest, log: Callable[[str], None]) -> EngineResult:
    trt = manifest.section("tensorrt")
    if ENGINE not in manifest.artifacts or not trt.get("engine"):
        raise UserError(f"{str(directory)!r} holds no {ENGINE} recorded in its manifest: run `tome-export engine "
                        f"{directory}` to build one")
    device = cuda_device()
    if device is None:
        raise UserError(f"{NO_GPU}: an engine is validated on the GPU it runs on; run this on the GPU machine")
    library = _library(manifest)
    _validation_stack()
    log(f"validating {ENGINE} on {device['name']} against {ONNX} in ONNX Runtime")
    validation = validate_engine(directory, manifest, ENGINE)
    engine = {**trt["engine"], "sha256": manifest.artifacts[ENGINE]["sha256"], "device": device}
    _record(directory, manifest, library, engine, validation)
    return EngineResult(directory, engine, validation)


def _record(directory: Path, manifest: Manifest, library: Library, engine: Mapping[str, Any],
            validation: Mapping[str, Any]) -> None:
    """The manifest with the engine, its device and its validation; checksums recomputed (the engine's too)."""
    note = engine_note(library, engine)
    note += f"; validated on {engine['device']['name']}" if validation.get("passed") else \
        f"; NOT validated ({validation.get('reason')}): {validation.get('how')}"
    trt = {**manifest.section("tensorrt"), "engine_built": True, "engine": dict(engine),
           "engine_validation": dict(validation), "engine_note": note}
    runtime = {**manifest.runtime, "engine_note": note, "engine_validated": bool(validation.get("passed"))}
    notes = tuple(n for n in manifest.notes if not n.startswith("engine ")) + (note,)
    write_manifest(directory, replace(manifest, sections={**manifest.sections, "tensorrt": trt}, runtime=runtime,
                                      notes=notes))
