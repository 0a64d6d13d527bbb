"""What a computation on this machine depends on beyond the artifact: the CPU, the variables that limit which of
its instructions the math libraries use, and the versions of the runtime libraries.

A CPU backend picks its kernels by the CPU's features at run time (oneDNN's JIT kernels in OpenVINO, MLAS in ONNX
Runtime), so one artifact can run different code on two machines, or on one machine under
``ONEDNN_MAX_CPU_ISA``. These facts key the self-check's cache (:mod:`.selfcheck`) and are recorded in the
manifest as what the build validated with.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, List, Sequence

# Variables that change which CPU instructions (or which arithmetic) a math library uses: oneDNN (OpenVINO's CPU
# plugin, PyTorch), MKL, PyTorch's own kernels.
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_CPU_ISA_HINTS", "DNNL_CPU_ISA_HINTS",
                 "ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                 "ATEN_CPU_CAPABILITY")
# The features that decide int8/bf16/fp16 kernels, shown by ``inspect`` (the manifest keeps every flag).
NOTABLE_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                 "amx_int8", "amx_bf16", "amx_fp16", "asimd", "sve")
# Backends whose version decides what an artifact computes, by module name.
RUNTIME_MODULES = ("onnxruntime", "openvino", "tensorrt", "tensorrt_rtx", "torch")


def _cpuinfo() -> Dict[str, Any]:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
        if not line.strip() and fields:  # the first processor is enough: the cores of one machine are alike
            break
    flags = fields.get("flags") or fields.get("features") or ""  # x86 | Arm
    return {"model": fields.get("model name") or fields.get("cpu model") or "", "flags": sorted(set(flags.split()))}


def cpu_description() -> Dict[str, Any]:
    """This CPU: its model name, architecture, every feature flag, and the ISA-limiting variables that are set."""
    info = _cpuinfo()
    return {"model": info.get("model") or platform.processor() or platform.machine(), "machine": platform.machine(),
            "flags": info.get("flags", []),
            "isa_limits": {name: os.environ[name] for name in ISA_VARIABLES if os.environ.get(name)}}


def notable_flags(flags: Sequence[str]) -> List[str]:
    present = set(flags)
    return [f for f in NOTABLE_FLAGS if f in present]


def module_versions(names: Sequence[str]) -> Dict[str, str]:
    """The versions of the named modules that this process has imported (nothing is imported here)."""
    versions = {}
    for name in names:
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None) if module is not None else None
        if isinstance(version, str):
            versions[name] = version.split("+")[0].split("-")[0]
    return versions


def describe_cpu(cpu: Dict[str, Any]) -> str:
    """One line: model, notable flags, ISA limits (for messages and ``inspect``)."""
    flags = notable_flags(cpu.get("flags", []))
    limits = cpu.get("isa_limits") or {}
    text = f"{cpu.get('model') or 'unknown CPU'} ({', '.join(flags) if flags else 'none of ' + '/'.join(NOTABLE_FLAGS[:4])})"
    return text + "".join(f", {k}={v}" for k, v in sorted(limits.items()))
