"""Load any built artifact directory and run it: ``tome_export.runtime.load(DIR)(batch) -> logits``.

The manifest names the artifact's runner (``runtime.runner``, ``"module:Class"``); it is imported only when the
artifact is loaded, so a deployment needs only its own backend installed. Deployment pipelines need numpy, PIL
and that backend here: no torch or timm import.
"""

from __future__ import annotations

import importlib
from importlib import metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from ..errors import UserError
from ..manifest import Manifest, load_manifest, refuse_failed
from . import selfcheck
from .base import ArtifactIO, Runner
from .selfcheck import SelfCheckError

# Manifests written before the runtime section named its runner: their target's runner and settings.
LEGACY_RUNNERS: Dict[str, str] = {
    "onnx": "tome_export.runtime.onnxruntime:OnnxRuntimeRunner",
    "onnxruntime": "tome_export.runtime.onnxruntime:OnnxRuntimeRunner",
    "openvino": "tome_export.runtime.openvino:OpenVINORunner",
    "tensorrt": "tome_export.runtime.tensorrt:TensorRTRunner",
    "tensorrt-rtx": "tome_export.runtime.tensorrt:TensorRTRunner",
}
LEGACY_INSTALL = {"openvino": "pip install 'tome-export[openvino]'", "tensorrt": "pip install tensorrt (NVIDIA's "
                  "package index)", "tensorrt-rtx": "pip install 'tome-export[tensorrt-rtx]'"}
# Runners come from this package or from a distribution that declares them in this entry-point group.
ENTRY_POINTS = "tome_export.runners"


def runtime_settings(manifest: Manifest) -> Dict[str, Any]:
    """The manifest's runtime section, completed for manifests written before it named the runner."""
    runtime = dict(manifest.runtime)
    if "runner" in runtime:
        return runtime
    if manifest.target not in LEGACY_RUNNERS:
        raise UserError(f"no runner for target {manifest.target!r}; available: {', '.join(sorted(LEGACY_RUNNERS))} "
                        f"(or rebuild the artifact with a tome-export that has this target)")
    runtime["runner"] = LEGACY_RUNNERS[manifest.target]
    runtime.setdefault("install", LEGACY_INSTALL.get(manifest.target, "pip install 'tome-export[onnxruntime]'"))
    trt = manifest.section("tensorrt") or {}
    if manifest.target.startswith("tensorrt"):
        runtime.update(file="model.engine", library=trt.get("library", "tensorrt"),
                       engine_note=trt.get("engine_note", "no engine"))
    return runtime


def runner_class(path: str) -> type:
    """The class a runtime section names (``"module:Class"``), from tome_export or the runner entry points."""
    module_name, _, cls_name = path.partition(":")
    allowed = module_name.startswith("tome_export.") or any(
        ep.value == path for ep in metadata.entry_points(group=ENTRY_POINTS))
    if not allowed or not cls_name:
        raise UserError(f"the manifest names the runner {path!r}, which is not a tome-export runner: rebuild the "
                        f"artifact, or install the package that provides it (entry points {ENTRY_POINTS!r})")
    return getattr(importlib.import_module(module_name), cls_name)


@dataclass(frozen=True)
class Artifact:
    """A built artifact directory: its manifest and how to run it (what a packaging step starts from)."""

    directory: Path
    manifest: Manifest
    io: ArtifactIO

    def load(self, threads: Optional[int] = None, throughput: bool = False, extra_outputs: Sequence[str] = (),
             self_check: bool = True) -> Runner:
        """A runner of this artifact (see :func:`load`), checked on this machine first unless ``self_check=False``."""
        runtime = self.io.runtime
        try:  # runners import their backend when constructed, so both steps can miss it
            runner = runner_class(str(runtime["runner"]))(self.io, threads=threads, throughput=throughput,
                                                          extra_outputs=extra_outputs)
        except ImportError as exc:
            raise UserError(f"running a {self.manifest.target} artifact needs {exc.name!r}, which is not installed: "
                            f"{runtime.get('install', 'install it')}") from None
        if self_check and not selfcheck.skipped_by_environment():
            try:
                selfcheck.ensure(self.directory, self.manifest, runner)
            except BaseException:
                runner.close()
                raise
        return runner

    def verify(self, threads: Optional[int] = None) -> Optional[selfcheck.Outcome]:
        """Run the self-check now, whatever the cache holds (a pass is cached); None: the artifact has none."""
        with self.load(threads, self_check=False) as runner:
            if not selfcheck.has_self_check(self.manifest):
                return None
            outcome = selfcheck.measure(self.directory, self.manifest, runner)
        if outcome.passed:
            selfcheck.remember(outcome, self.directory)
        return outcome


def open_artifact(directory: os.PathLike, verify: bool = True) -> Artifact:
    """An artifact directory's manifest and runtime settings (checksums verified unless ``verify=False``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory: pass a directory written by tome-export")
    manifest = load_manifest(directory, verify=verify)
    refuse_failed(directory, manifest)  # even unverified: a failed build never runs as a good one
    runtime = runtime_settings(manifest)
    covered = runtime.get("file")
    if verify and covered and covered not in manifest.artifacts and (directory / str(covered)).exists():
        # e.g. an engine built afterwards by build_engine.sh: never validated nor checksummed by the build
        raise UserError(f"{covered} in {str(directory)!r} is not covered by its manifest (built after it, so never "
                        f"validated nor checksummed): run `tome-export engine {directory} --force` on the GPU "
                        f"machine to build, validate and record it, or pass verify=False to run it unchecked")
    return Artifact(directory, manifest, ArtifactIO.from_manifest(directory, manifest, runtime))


def load(directory: os.PathLike, threads: Optional[int] = None, throughput: bool = False, verify: bool = True,
         extra_outputs: Sequence[str] = (), self_check: Optional[bool] = None) -> Runner:
    """A runner for the artifact in ``directory`` (checksums verified against the manifest unless ``verify=False``).

    ``threads``: CPU threads (None: the backend's default). ``throughput``: batch-serving mode where the backend
    has one (parallel requests); latency mode otherwise. ``extra_outputs``: intermediate tensors to return too.
    ``self_check`` (default: as ``verify``): before the first use on this machine, run the views the build stored
    and refuse (:class:`SelfCheckError`) when the outputs miss the build's thresholds against the outputs it
    validated; a pass is cached per artifact x runtime versions x CPU/GPU features. ``TOME_EXPORT_SELF_CHECK=0``
    skips it too.
    """
    check = verify if self_check is None else self_check
    return open_artifact(directory, verify).load(threads, throughput, extra_outputs, self_check=check)


__all__ = ["Artifact", "ArtifactIO", "Runner", "SelfCheckError", "load", "open_artifact"]
