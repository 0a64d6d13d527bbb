"""Load any built artifact directory and run it: ``tome_export.runtime.load(DIR)(batch) -> logits``.

Deployment pipelines need only numpy, PIL and the backend's runtime here: no torch or timm import.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Dict, Optional

from ..errors import UserError
from ..manifest import read_manifest
from .base import Runner

# target -> "module:Class" (imported lazily, so a deployment needs only its own backend installed)
RUNNERS: Dict[str, str] = {
    "onnx": "tome_export.runtime.onnx:OnnxRunner",
    "onnxruntime": "tome_export.runtime.onnxruntime:OnnxRuntimeRunner",
    "openvino": "tome_export.runtime.openvino:OpenVINORunner",
    "tensorrt": "tome_export.runtime.tensorrt:TensorRTRunner",
    "tensorrt-rtx": "tome_export.runtime.tensorrt:TensorRTRunner",
}


def load(directory: os.PathLike, threads: Optional[int] = None, throughput: bool = False, verify: bool = True) -> Runner:
    """A runner for the artifact in ``directory`` (checksums verified against the manifest unless ``verify=False``).

    ``threads``: CPU threads (None: the backend's default). ``throughput``: batch-serving mode where the backend
    has one (parallel requests); latency mode otherwise.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory: pass a directory written by tome-export")
    manifest = read_manifest(directory, verify=verify)
    target = manifest.get("target")
    if target not in RUNNERS:
        raise UserError(f"no runner for target {target!r}; available: {', '.join(sorted(RUNNERS))}")
    module_name, cls_name = RUNNERS[target].split(":")
    try:  # runners import their backend when constructed, so both steps can miss it
        runner_cls = getattr(importlib.import_module(module_name), cls_name)
        return runner_cls(directory, manifest, threads=threads, throughput=throughput)
    except ImportError as exc:
        raise UserError(f"running a {target} artifact needs {exc.name!r}, which is not installed: "
                        f"pip install 'tome-export[{target}]'") from None


__all__ = ["Runner", "load", "RUNNERS"]
