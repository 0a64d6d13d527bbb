"""Each distinct ONNX export once per session.

The dynamo export is most of what a build costs on 2 cores (about 80% of a small model's build), and the suite
builds the same model with the same ToMe settings through many routes (CLI, pipeline, serve, tune). An export is
deterministic (``tome_export.export`` strips everything that differs between runs), so an export whose inputs
were all seen before writes the graph that the first one produced. The key is everything the export reads: every
module's class and plain attributes, every parameter and buffer, and the export's own arguments. Anything the key
cannot describe faithfully (an attribute whose ``repr`` holds an address, say) makes the key unique, so that
export runs for real.

Tests that use ``monkeypatch`` (they may change what the export reads in ways no key sees) and tests marked
``real_export`` always export for real; ``TOME_TEST_EXPORT_MEMO=0`` turns the memo off for a whole run. The memo is
installed when this plugin is imported, before the other plugins bind ``export_onnx`` by name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional

import onnx
import pytest
import torch

from tome_export import export as export_module
from tome_export import pipeline
from tome_export.onnx_files import save_onnx

_PLAIN = (bool, int, float, str, bytes, type(None))
_SKIPPED = {"_parameters", "_buffers", "_modules", "training"}
_memo: Dict[str, bytes] = {}
_ON_FOR_THIS_RUN = os.environ.get("TOME_TEST_EXPORT_MEMO", "1") != "0"
_state = {"enabled": _ON_FOR_THIS_RUN, "hits": 0, "misses": 0}


def _describe(value: Any) -> Optional[str]:
    """A faithful text of ``value`` or None (plain values, containers of them and dataclass-like values)."""
    if isinstance(value, _PLAIN) or isinstance(value, (torch.dtype, torch.device)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return f"tensor({data.dtype},{tuple(data.shape)},{hashlib.sha256(_bytes(data)).hexdigest()})"
    if isinstance(value, (tuple, list, frozenset, set)):
        parts = [_describe(v) for v in value]
        if None in parts:
            return None
        return f"{type(value).__name__}({sorted(parts) if isinstance(value, (set, frozenset)) else parts})"
    if isinstance(value, dict):
        parts = [(_describe(k), _describe(v)) for k, v in value.items()]
        return None if any(None in p for p in parts) else f"dict({parts})"
    if hasattr(value, "__dataclass_fields__"):
        fields = {name: _describe(getattr(value, name)) for name in value.__dataclass_fields__}
        return None if None in fields.values() else f"{type(value).__qualname__}({fields})"
    return None


def model_key(model: torch.nn.Module) -> Optional[str]:
    """A digest of everything about ``model`` an export reads, or None when some attribute cannot be described."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"|{name}:{type(module).__module__}.{type(module).__qualname__}".encode())
        for attr, value in sorted(vars(module).items()):
            empty_hooks = attr.startswith("_") and isinstance(value, dict) and not value
            if attr in _SKIPPED or empty_hooks:
                continue
            text = _describe(value)
            if text is None:
                return None
            digest.update(f"{attr}={text};".encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}{data.dtype}{tuple(data.shape)}".encode())
        digest.update(_bytes(data))
    return digest.hexdigest()


def _bytes(data: torch.Tensor) -> bytes:
    return data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""


def _memoized(export):
    def export_onnx(model: torch.nn.Module, path: os.PathLike, input_shape, **options) -> Path:
        key = model_key(model) if _state["enabled"] else None
        if key is None:
            return export(model, path, input_shape, **options)
        key += repr((tuple(input_shape), sorted(options.items(), key=lambda kv: kv[0])))
        if key not in _memo:
            _state["misses"] += 1
            written = export(model, path, input_shape, **options)
            if written.with_suffix(".onnx.data").exists() or written.stat().st_size > 256 << 20:
                return written  # big graphs are not kept
            _memo[key] = written.read_bytes()
            return written
        _state["hits"] += 1
        return save_onnx(onnx.load_from_string(_memo[key]), Path(path))

    export_onnx.__doc__ = export.__doc__
    export_onnx.__wrapped__ = export
    return export_onnx


def _install() -> None:
    memoized = _memoized(export_module.export_onnx)
    export_module.export_onnx = memoized
    pipeline.export_onnx = memoized


_install()


def pytest_runtest_setup(item) -> None:
    _state["enabled"] = (_ON_FOR_THIS_RUN
                         and "monkeypatch" not in getattr(item, "fixturenames", ())
                         and item.get_closest_marker("real_export") is None)


def pytest_terminal_summary(terminalreporter) -> None:
    if _state["hits"] or _state["misses"]:
        terminalreporter.write_line(f"ONNX exports: {_state['misses']} made, {_state['hits']} reused (same inputs)")
