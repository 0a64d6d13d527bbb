"""The step on the GPU machine for an ``aoti-cuda`` build: compile its package there, validate it, record it.

:func:`finish` loads the build's exported program, moves it to the GPU, compiles it with AOTInductor into
``model.pt2`` and runs the package against the same program run eagerly by PyTorch on that GPU, on the views of the
bundled photos the build validated on, with the build's thresholds. It records the package (checksummed), the GPU,
torch, Triton and CUDA versions and the validation in the manifest, so :func:`tome_export.runtime.load` accepts it.
Nothing changes unless every step succeeds: the package is compiled in a hidden directory and moved into place only
after it validated. Needs torch with CUDA and Triton, not timm, ONNX or the model code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping

import numpy as np

from ...errors import UserError
from ...manifest import Manifest, load_manifest, write_manifest
from ...preprocess import Preprocessing
from ...quality.validate import (DEFAULT_IMAGES, Thresholds, check_thresholds, compare_outputs, input_ids,
                                 validation_batches)
from ...runtime import runtime_settings
from ...runtime.aoti import PACKAGE, PROGRAM, AOTIRunner
from ...runtime.base import ArtifactIO
from ..base import Finished

NO_GPU = "no CUDA GPU here"
TARGET = "aoti-cuda"


def aoti_build(directory: Path) -> Manifest:
    """The verified manifest of an ``aoti-cuda`` build directory; anything else is a UserError saying what to pass."""
    manifest = load_manifest(directory)  # every checksum verified
    if manifest.target != TARGET or not isinstance(manifest.section("aoti"), dict):
        raise UserError(f"{str(directory)!r} is a --target {manifest.target} build: this step compiles the package "
                        f"of a --target {TARGET} build")
    return manifest


def _gpu(directory: Path) -> Dict[str, str]:
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{NO_GPU}: an AOTInductor CUDA package is compiled and validated on the GPU that runs it; "
                        f"run `tome-export engine {directory}` on the GPU machine")
    from .build import gpu_facts

    return gpu_facts()


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A path for the new package in a hidden directory beside ``target``, moved onto it if the block succeeds."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield scratch / target.name
        os.replace(scratch / target.name, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def validate_package(directory: Path, manifest: Manifest, package: Path, program: Any,
                     device: str = "cuda") -> Dict[str, Any]:
    """``package`` (in ``directory``) vs ``program`` run eagerly by PyTorch on the same ``device``, on the views the
    build validated on, against the thresholds its validation applied."""
    from .program import run_program

    section = manifest.section("aoti")
    runtime = {**runtime_settings(manifest), "file": package.relative_to(directory).as_posix(), "compiled": True,
               "device": device}
    io = ArtifactIO.from_manifest(directory, manifest, runtime)
    images = int(manifest.validation.get("images") or DEFAULT_IMAGES)
    batches = validation_batches(Preprocessing.from_dict(manifest.preprocessing), int(section["validation_batch"]),
                                 manifest.input.dynamic_batch, images)
    names = list(manifest.task_outputs)
    eager = run_program(program, device, manifest.outputs)
    with AOTIRunner(io) as runner:
        runs = [(eager(x), runner.infer(x, names)) for x in batches]
    expected, got = ({name: np.concatenate([run[i][name] for run in runs]) for name in names} for i in (0, 1))
    limits = {k: v for k, v in (manifest.validation.get("thresholds") or {}).items()
              if k in ("max_abs_diff", "min_cosine", "min_top1_agreement")}
    what = f"the {manifest.precision} package on this {device} (against its exported program, eager PyTorch)"
    checked = check_thresholds(compare_outputs(expected, got, input_ids(batches)), Thresholds(**limits), what)
    return {"run": True, "against": f"{PROGRAM}, eager PyTorch on the same {'GPU' if device == 'cuda' else device}",
            **checked}


def finish(directory: Path, force: bool = False, validate_only: bool = False,
           log: Callable[[str], None] = lambda message: None) -> Finished:
    """Compile (unless ``validate_only``), validate on this GPU and record ``directory``'s package.

    ``force``: replace a package the directory already holds. A UserError or a ValidationError leaves the directory
    as it was.
    """
    directory = Path(directory)
    manifest = aoti_build(directory)
    gpu = _gpu(directory)
    if validate_only:
        return _validate_recorded(directory, manifest, gpu, log)
    if (directory / PACKAGE).exists() and not force:
        covered = "recorded in its manifest" if PACKAGE in manifest.artifacts else "not covered by its manifest"
        raise UserError(f"{str(directory)!r} already holds {PACKAGE} ({covered}): pass --force to compile it again "
                        f"and replace it, or --validate-only to validate the recorded one")
    return compile_validate_record(directory, manifest, "cuda", gpu, log)


def compile_validate_record(directory: Path, manifest: Manifest, device: str, facts: Mapping[str, str],
                            log: Callable[[str], None]) -> Finished:
    """The finishing step proper on ``device`` (``"cuda"``; the tests run it on the CPU, where the rest of the step
    refuses): compile the build's program there, validate the package against it, record both."""
    import torch
    from torch.export.passes import move_to_device_pass

    from .program import compile_package

    program = move_to_device_pass(torch.export.load(str(directory / PROGRAM)), device)
    with _staged(directory / PACKAGE) as staged:
        log(f"compiling {PACKAGE} from {PROGRAM} with AOTInductor on {facts['name']}")
        package = {**compile_package(program, staged, device), "device": dict(facts)}
        log(f"validating the package on {facts['name']} against {PROGRAM} run eagerly by PyTorch")
        validation = validate_package(directory, manifest, staged, program, device)
    return _record(directory, manifest, package, validation)


def _validate_recorded(directory: Path, manifest: Manifest, device: Mapping[str, str],
                       log: Callable[[str], None]) -> Finished:
    import torch
    from torch.export.passes import move_to_device_pass

    package = (manifest.section("aoti") or {}).get("package")
    if PACKAGE not in manifest.artifacts or not package:
        raise UserError(f"{str(directory)!r} holds no {PACKAGE} recorded in its manifest: run `tome-export engine "
                        f"{directory}` to compile one")
    log(f"validating {PACKAGE} on {device['name']} against {PROGRAM} run eagerly by PyTorch")
    program = move_to_device_pass(torch.export.load(str(directory / PROGRAM)), "cuda")
    validation = validate_package(directory, manifest, directory / PACKAGE, program)
    return _record(directory, manifest, {**package, "device": dict(device)}, validation)


def _record(directory: Path, manifest: Manifest, package: Mapping[str, Any],
            validation: Mapping[str, Any]) -> Finished:
    """The manifest with the package, its GPU, the versions and its validation; checksums recomputed."""
    import torch

    from .program import versions

    gpu = package["device"]["name"]
    note = f"{PACKAGE} compiled for and validated on {gpu} by `tome-export engine` (torch {torch.__version__})"
    section = {**manifest.section("aoti"), "compiled": True, "package": dict(package),
               "package_validation": dict(validation), "versions": dict(versions("cuda"))}
    runtime = {**manifest.runtime, "compiled": True, "torch": torch.__version__}
    notes = tuple(n for n in manifest.notes if not n.startswith(PACKAGE)) + (note,)
    written = write_manifest(directory, replace(manifest, sections={**manifest.sections, "aoti": section},
                                                runtime=runtime, notes=notes))
    summary = (f"AOTInductor, torch {torch.__version__}, {package['bytes'] / 1e6:.1f} MB, compiled in "
               f"{package['compile_seconds']} s; sha256 {written['artifacts'][PACKAGE]['sha256'][:16]}...")
    return Finished(directory, PACKAGE, summary, dict(validation), gpu)
