"""A benchmark cut into jobs: one per timing group that still has work, planned from the previous results.

A timing group is every cell of one model, backend, batch size and thread count: the variants whose ratios the
report prints side by side. Its job builds what the group needs (on whichever node runs it: artifacts stay there),
times the group in one interleaved run with the node to itself, and measures the memory of its cells. The first
job of a model and backend also measures the quality of its variants (once: quality does not depend on the batch
or the node). With one artifact for every batch size (``build.dynamic_batch``), the model and backend's later
groups follow the first onto its node, where its builds are.

A group whose cells are all final (measured, or failed: ``--force`` retries those) and that needs no memory
figure gets no job. Skipped cells are not final: their groups are tried again every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from .config import BenchConfig, Cell, ModelConfig

FINAL = ("measured", "failed")


@dataclass(frozen=True)
class GroupWork:
    """What a worker needs to measure one timing group (and nothing it can find itself)."""

    config: BenchConfig
    model: ModelConfig
    backend: str
    cells: Tuple[Cell, ...]
    cache: str  # where artifacts are built, on the node that runs the job (an absolute path)
    data: Optional[str]
    run_id: str
    previous: Dict[str, Dict[str, Any]]  # earlier records of these cells that are kept (final ones)
    quality_for: FrozenSet[str]  # the variant ids whose quality this job measures
    verbose: bool = False  # say each step on stderr (a cluster's worker; in this process the harness listens)

    @property
    def batch(self) -> int:
        return self.cells[0].batch

    @property
    def threads(self) -> int:
        return self.cells[0].threads

    @property
    def key(self) -> str:
        return f"{self.model.key}/{self.backend}/b{self.batch}/t{self.threads}"

    @property
    def label(self) -> str:
        return f"group {self.model.model}/{self.backend}/b{self.batch}/t{self.threads}"


@dataclass
class PairPlan:
    """The jobs of one model and backend, and the cells that need none (kept from the previous results)."""

    works: List[GroupWork]
    follows: Dict[str, str]  # job key -> the key of the job it follows
    settled: List[Cell]


def _groups(config: BenchConfig, cells: List[Cell]) -> List[List[Cell]]:
    """The pair's cells by (threads, batch), in the order the harness always timed them."""
    out = []
    for threads in config.threads:
        for batch in config.batches:
            members = [c for c in cells if c.threads == threads and c.batch == batch]
            if members:
                out.append(members)
    return out


def _settled(config: BenchConfig, members: List[Cell], final: Dict[str, Dict[str, Any]]) -> bool:
    if not all(c.id in final for c in members):
        return False
    return not (config.memory and any(final[c.id]["status"] == "measured" and "memory" not in final[c.id]
                                      for c in members))


def plan_pair(config: BenchConfig, model: ModelConfig, backend: str, cells: List[Cell],
              prev_cells: Dict[str, Dict[str, Any]], prev_variants: Dict[str, Any], *, cache: str,
              data: Optional[str], run_id: str, verbose: bool) -> PairPlan:
    """The jobs one model and backend needs this run."""
    final = {c.id: prev_cells[c.id] for c in cells if prev_cells.get(c.id, {}).get("status") in FINAL}
    variants = list(dict.fromkeys(c.variant for c in cells))
    gave_up = {v for v in variants if all(final.get(c.id, {}).get("status") == "failed"
                                          for c in cells if c.variant == v)}
    quality = frozenset(v.id for v in variants if v.id not in prev_variants and v not in gave_up)
    groups = _groups(config, cells)
    todo = [g for g in groups if not _settled(config, g, final)]
    if quality and not todo:
        todo = groups[:1]
    works = [GroupWork(config=config, model=model, backend=backend, cells=tuple(g), cache=cache, data=data,
                       run_id=run_id, previous={c.id: final[c.id] for c in g if c.id in final},
                       quality_for=quality if i == 0 else frozenset(), verbose=verbose)
             for i, g in enumerate(todo)]
    follows = {w.key: works[0].key for w in works[1:]} if config.dynamic_batch else {}
    settled = [c for g in groups if g not in todo for c in g]
    return PairPlan(works, follows, settled)


def node_key(node: Dict[str, Any]) -> str:
    """A short name for the machine (and Ray node) that ran a job."""
    ray_id = node.get("ray_node_id")
    return f"{node.get('host', '?')}:{ray_id[:8]}" if ray_id else str(node.get("host", "?"))
