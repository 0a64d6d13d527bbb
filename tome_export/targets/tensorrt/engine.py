"""Engine builds with NVIDIA's Python API, and the equivalent command line for the deployment machine.

Two libraries share the API: full TensorRT (``tensorrt``; builds need the GPU the engine will run on) and
TensorRT-RTX (``tensorrt_rtx``; compiles ahead of time on the CPU, the GPU-specific kernels are chosen just in
time on first run). Networks are strongly typed: precision comes from the ONNX (Casts, Q/DQ), no builder flags.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ...devices import gpu_available
from ...errors import UserError

MAX_BATCH = 4096  # the exporter's dynamic batch dimension allows up to this
ONNX = "model.onnx"
ENGINE = "model.engine"
SCRIPT = "build_engine.sh"
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class Library:
    module: str  # Python module
    display: str
    tool: str  # the command-line builder shipped with the library
    builds_without_gpu: bool  # TensorRT-RTX compiles ahead of time on the CPU
    timing_cache: bool  # TensorRT-RTX ignores timing caches, and setting one makes its build query a GPU
    install: str  # how to get the Python package
    tool_install: str  # where the command-line tool comes from (the pip wheels do not ship it)


TENSORRT = Library("tensorrt", "TensorRT", "trtexec", False, True,
                   "pip install tensorrt (its wheels come from NVIDIA's package index)",
                   "trtexec ships in NVIDIA's TensorRT tar/deb/container releases, in their bin/ directory")
TENSORRT_RTX = Library("tensorrt_rtx", "TensorRT-RTX", "tensorrt_rtx", True, False,
                       "pip install 'tome-export[tensorrt-rtx]' (tensorrt-rtx-cu12 or -cu13 from PyPI)",
                       "tensorrt_rtx ships in NVIDIA's TensorRT-RTX SDK archive, in its bin/ directory")


@dataclass(frozen=True)
class Profile:
    """The batch sizes an engine accepts: min <= opt <= max; all equal for a static batch."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "Profile":
        """``MIN:OPT:MAX``, e.g. ``1:8:64``."""
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2] <= MAX_BATCH:
            raise UserError(f"--dynamic-batch {text!r}: expected MIN:OPT:MAX batch sizes with "
                            f"1 <= MIN <= OPT <= MAX <= {MAX_BATCH}, e.g. 1:8:64")
        return cls(*values)

    @property
    def dynamic(self) -> bool:
        return not self.min == self.opt == self.max

    def shapes(self, image_shape: Sequence[int]) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
        return tuple((b, *image_shape) for b in (self.min, self.opt, self.max))  # type: ignore[return-value]

    def to_dict(self) -> Dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def import_library(library: Library) -> Optional[Any]:
    """The library's module, or None when it is not installed (or installed without its native libraries)."""
    try:
        return __import__(library.module)
    except (ImportError, OSError):
        return None


def engine_unavailable_reason(library: Library) -> Optional[str]:
    """Why no engine can be built here (None when it can)."""
    if import_library(library) is None:
        return f"the Python package {library.module!r} is not installed ({library.install})"
    if not library.builds_without_gpu and not gpu_available():
        return f"{library.display} builds engines on the GPU they run on, and this machine has no CUDA GPU"
    return None


def _compute_capability(trt: Any, text: str) -> Any:
    member = getattr(getattr(trt, "ComputeCapability", None), f"SM{text.replace('.', '')}", None)
    if member is None:
        known = [m for m in dir(getattr(trt, "ComputeCapability", object)) if m.startswith("SM")]
        raise UserError(f"build.compute_capabilities: {text!r} is not one of {', '.join(k[2:] for k in known) or 'none'}")
    return member


def _logger(trt: Any) -> Any:
    class Collect(trt.ILogger):
        """Keeps warnings and errors so a failed build can say why in one line."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: List[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append(msg)

    return Collect()


def _parse(trt: Any, library: Library, onnx_path: Path, log: Any) -> Tuple[Any, Any, Any]:
    """(builder, network, parser) of the ONNX file; a parser failure is a UserError naming the nodes."""
    builder = trt.Builder(log)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # required on TensorRT 10, the only mode (flag ignored) on 11 and RTX
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            if err.node_name() or err.node() >= 0:
                where = f"node {err.node_name() or '#' + str(err.node())} ({err.node_operator() or '?'})"
            else:  # some importers report no node, only themselves (e.g. importScatterElements)
                where = err.func() or "?"
            errors.append(f"{where}: {err.desc()}")
        raise UserError(f"{library.display}'s ONNX parser rejected the graph: {'; '.join(errors[:3]) or 'no reason given'}")
    return builder, network, parser


def _builder_config(trt: Any, builder: Any, input_name: str, image_shape: Sequence[int], profile: Profile,
                    optimization_level: int, compute_capabilities: Sequence[str]) -> Any:
    config = builder.create_builder_config()
    if not 0 <= optimization_level <= 5:
        raise UserError(f"build.optimization_level = {optimization_level}: choose 0..5")
    config.builder_optimization_level = optimization_level
    # TF32 is on by default: float32 matmuls would round their inputs to 10 mantissa bits, in fp32 engines and in
    # the matching path the graph keeps in fp32; the graph's types are what was validated.
    config.clear_flag(trt.BuilderFlag.TF32)
    if profile.dynamic:
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(input_name, *profile.shapes(image_shape))
        config.add_optimization_profile(opt_profile)
    if compute_capabilities:
        config.num_compute_capabilities = len(compute_capabilities)
        for i, cc in enumerate(compute_capabilities):
            config.set_compute_capability(_compute_capability(trt, cc), i)
    return config


def build_engine(
    library: Library,
    onnx_path: Path,
    engine_path: Path,
    input_name: str,
    image_shape: Sequence[int],
    profile: Profile,
    *,
    optimization_level: int = 3,
    timing_cache: Optional[Path] = None,
    compute_capabilities: Sequence[str] = (),
) -> Dict[str, Any]:
    """Parse ``onnx_path`` with NVIDIA's ONNX parser and write the serialized engine; returns build facts.

    A parser or builder failure is a UserError naming the node / the builder's message.
    """
    trt = import_library(library)
    if trt is None:
        raise UserError(f"cannot build a {library.display} engine: {engine_unavailable_reason(library)}")
    started = time.perf_counter()
    log = _logger(trt)
    builder, network, _parser = _parse(trt, library, onnx_path, log)
    config = _builder_config(trt, builder, input_name, image_shape, profile, optimization_level, compute_capabilities)
    cache = None
    if timing_cache is not None and library.timing_cache:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = "; ".join(log.messages[-3:]) or "no reason given"
        raise UserError(f"{library.display} could not build the engine: {reason}")
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "library": library.module,
        "library_version": getattr(trt, "__version__", "?"),
        "file": engine_path.name,
        "bytes": engine_path.stat().st_size,
        "build_seconds": round(time.perf_counter() - started, 1),
        "layers": network.num_layers,
        "timing_cache": timing_cache.name if cache is not None else None,
        "compute_capabilities": list(compute_capabilities),
        "warnings": len(log.messages),
    }


def engine_note(library: Library, engine: Mapping[str, Any]) -> str:
    """The manifest's one-line account of a built engine."""
    note = f"engine {ENGINE} built with {library.display} {engine['library_version']} " \
           f"({engine['bytes'] / 1e6:.1f} MB, {engine['build_seconds']} s)"
    if library.builds_without_gpu:
        note += "; kernels are compiled for the GPU on first run"
    return note


def build_command(
    library: Library,
    onnx_name: str,
    engine_name: str,
    input_name: str,
    image_shape: Sequence[int],
    profile: Profile,
    *,
    optimization_level: int = 3,
    timing_cache: Optional[str] = None,
    compute_capabilities: Sequence[str] = (),
) -> List[str]:
    """The command-line equivalent of :func:`build_engine` (trtexec / tensorrt_rtx).

    trtexec gets ``--noTF32`` as the Python API build clears TF32; the tensorrt_rtx tool's spelling of that is not
    verified here (no such tool on this machine), so its command leaves it out.
    """
    cmd = [library.tool, f"--onnx={onnx_name}", f"--saveEngine={engine_name}"]
    if library is TENSORRT:
        # Strong typing: needed on TensorRT 10 (no FP16/INT8 flags: precision is in the graph), default on 11.
        cmd += ["--stronglyTyped", "--noTF32", f"--builderOptimizationLevel={optimization_level}"]
        if timing_cache:
            cmd.append(f"--timingCacheFile={timing_cache}")
    if profile.dynamic:
        for flag, shape in zip(("--minShapes", "--optShapes", "--maxShapes"), profile.shapes(image_shape)):
            cmd.append(f"{flag}={input_name}:{'x'.join(map(str, shape))}")
    if compute_capabilities:
        cmd.append("--computeCapabilities=" + ",".join(cc.replace(".", "") for cc in compute_capabilities))
    cmd.append("--skipInference")
    return cmd


SCRIPT_TEXT = """#!/usr/bin/env bash
# Builds {engine} from {onnx} with {display} on the machine that will run it.
# Written by tome-export {version}; equivalent to the build it ran (or would have run) through the Python API.
# Precision is in the graph (strongly typed network): {precision_note}
# Extra arguments go to {tool} (e.g. --verbose, --device=1); editing this file makes runtime.load refuse the directory.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v {tool} >/dev/null 2>&1; then
    echo "build_engine.sh: {tool} not found: {tool_install}; put that directory on PATH" >&2
    exit 2
fi
{command} "$@"
"""


def write_build_script(path: Path, library: Library, command: Sequence[str], precision_note: str, version: str) -> Path:
    onnx_name = next(c.split("=", 1)[1] for c in command if c.startswith("--onnx="))
    engine_name = next(c.split("=", 1)[1] for c in command if c.startswith("--saveEngine="))
    body = " \\\n    ".join(shlex.quote(c) for c in command)
    path.write_text(SCRIPT_TEXT.format(engine=engine_name, onnx=onnx_name, display=library.display, version=version,
                                  precision_note=precision_note, tool=library.tool, tool_install=library.tool_install,
                                  command=body))
    path.chmod(0o755)
    return path


@dataclass(frozen=True)
class EngineSpec:
    """How an artifact's engine is built: the build, ``build_engine.sh`` and ``tome-export engine`` all use the
    settings recorded here, so an engine built later on the GPU machine is the one the build describes."""

    library: Library
    input_name: str
    image_shape: Tuple[int, ...]
    profile: Profile
    optimization_level: int = 3
    timing_cache: Optional[str] = None  # file name beside the ONNX; None: no timing cache kept
    compute_capabilities: Tuple[str, ...] = ()

    def command(self) -> List[str]:
        """The command-line builder's equivalent (what ``build_engine.sh`` runs)."""
        return build_command(self.library, ONNX, ENGINE, self.input_name, self.image_shape, self.profile,
                             optimization_level=self.optimization_level, timing_cache=self.timing_cache,
                             compute_capabilities=self.compute_capabilities)

    def build(self, directory: Path, engine_path: Path, timing_cache: Optional[Path] = None) -> Dict[str, Any]:
        """Build ``directory``'s ONNX into ``engine_path`` (``timing_cache``: the cache file to read and update,
        default the one named beside the ONNX)."""
        if timing_cache is None and self.timing_cache:
            timing_cache = directory / self.timing_cache
        return build_engine(self.library, directory / ONNX, engine_path, self.input_name, self.image_shape,
                            self.profile, optimization_level=self.optimization_level, timing_cache=timing_cache,
                            compute_capabilities=self.compute_capabilities)

    def facts(self) -> Dict[str, Any]:
        """The settings as the manifest's ``tensorrt`` section records them."""
        return {"profile": {"input": self.input_name, **self.profile.to_dict()},
                "optimization_level": self.optimization_level, "timing_cache": self.timing_cache,
                "compute_capabilities": list(self.compute_capabilities), "build_script": SCRIPT,
                "build_command": " ".join(self.command())}

    @classmethod
    def from_facts(cls, library: Library, facts: Mapping[str, Any], image_shape: Sequence[int]) -> "EngineSpec":
        """The spec a manifest's ``tensorrt`` section records (:meth:`facts`); builds written before it kept the
        timing cache and compute capabilities only in their build command."""
        profile = facts["profile"]
        flags = dict(arg.split("=", 1) for arg in str(facts.get("build_command", "")).split() if "=" in arg)
        cache = facts.get("timing_cache", flags.get("--timingCacheFile"))
        caps = facts.get("compute_capabilities")
        if caps is None:
            caps = [c for c in flags.get("--computeCapabilities", "").split(",") if c]
        return cls(library, str(profile["input"]), tuple(int(d) for d in image_shape),
                   Profile(int(profile["min"]), int(profile["opt"]), int(profile["max"])),
                   int(facts.get("optimization_level", 3)), cache, tuple(str(c) for c in caps))
