"""Which fused-path design a GPU runs at a batch size: measured choices as data, beside the measurement.

A design is the proportional-attention formulation (fastest first) and the merge kernels (``three`` per block
or ``one``). ``benchmarks/gpu_speedup.py`` times every design inside the model on a GPU and writes the fastest
per batch size into ``gpu_designs.json`` here, with the results file it came from; a model looks up its GPU by
name and takes the entry of the largest measured batch not above its own. A GPU without entries, a CPU and every
export get :data:`DEFAULT`, which is what was measured fastest before the other designs existed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

ATTENTION = ("mask", "padded", "cudnn", "flex")  # see tome_export.kernels.attention
MERGE = ("three", "one")  # see tome_export.kernels.fused_merge
TABLE = Path(__file__).with_name("gpu_designs.json")


class Design(NamedTuple):
    """``attention``: formulations, fastest first (a family without padded heads takes the next one);
    ``merge``: ``three`` kernels per merging block or ``one``."""

    attention: Tuple[str, ...]
    merge: str

    def check(self) -> "Design":
        unknown = [a for a in self.attention if a not in ATTENTION] + ([self.merge] if self.merge not in MERGE else [])
        if unknown or not self.attention:
            raise ValueError(f"unknown design {self}: attention from {ATTENTION}, merge from {MERGE}")
        return self

    def attention_without(self, unavailable: str) -> str:
        """The fastest formulation other than ``unavailable`` (the mask when none is left)."""
        return next((a for a in self.attention if a != unavailable), "mask")


# On an H200 the additive mask measured faster than the extra channel made by copies at every batch from 1 to 256,
# and the three-kernel merge is the design benchmarks/results/gpu_speedup.md measured.
DEFAULT = Design(("mask",), "three")

Entries = Tuple[Tuple[int, Design], ...]  # (smallest batch, design), ascending


def read_table(path: Path = TABLE) -> Dict[str, Entries]:
    """GPU name -> its measured entries."""
    raw = json.loads(path.read_text())
    return {gpu: tuple(sorted((int(e["min_batch"]), Design(tuple(e["attention"]), e["merge"]).check())
                              for e in entries))
            for gpu, entries in raw.get("devices", {}).items()}


_TABLE: Dict[str, Entries] = read_table()
_FORCED: Optional[Design] = None


def design_for(gpu: str, batch: int, table: Optional[Dict[str, Entries]] = None) -> Design:
    """The design measured fastest on ``gpu`` at the largest measured batch not above ``batch``."""
    chosen = DEFAULT
    for smallest, entry in (_TABLE if table is None else table).get(gpu, ()):
        if smallest <= batch:
            chosen = entry
    return chosen


_GPU_NAMES: Dict[int, str] = {}


@torch.compiler.assume_constant_result  # torch.compile takes the name as a constant instead of tracing CUDA calls
def _gpu_name(index: int) -> str:
    if index not in _GPU_NAMES:
        _GPU_NAMES[index] = torch.cuda.get_device_name(index)
    return _GPU_NAMES[index]


def design(x: torch.Tensor) -> Design:
    """The design for a call on ``x`` (batch = its first dim): :data:`DEFAULT` in exports and, unless
    :func:`forced`, off CUDA."""
    if torch.compiler.is_exporting():
        return DEFAULT
    if _FORCED is not None:
        return _FORCED
    if not x.is_cuda:
        return DEFAULT
    return design_for(_gpu_name(x.device.index), x.shape[0])


@contextlib.contextmanager
def forced(chosen: Design) -> Iterator[None]:
    """Every call in this block (on any device, exports excepted) runs ``chosen``: for measuring and testing.
    A CUDA graph captured inside keeps the design it captured."""
    global _FORCED
    before, _FORCED = _FORCED, chosen.check()
    try:
        yield
    finally:
        _FORCED = before


def reload(path: Path = TABLE) -> None:
    """Read the table again (after a benchmark wrote it)."""
    global _TABLE
    _TABLE = read_table(path)


def write_measured(gpu: str, chosen: Sequence[Tuple[int, Design]], measured: Dict[str, Any],
                   path: Path = TABLE) -> None:
    """Replace ``gpu``'s entries by ``chosen`` (smallest batch, design), each recording ``measured`` (where the
    timings are, when, which versions). Other GPUs' entries stay."""
    raw = json.loads(path.read_text()) if path.exists() else {}
    entries: List[Dict[str, Any]] = [{"min_batch": b, "attention": list(d.check().attention), "merge": d.merge,
                                      "measured": measured} for b, d in sorted(chosen)]
    raw.setdefault("devices", {})[gpu] = entries
    path.write_text(json.dumps(raw, indent=1) + "\n")
