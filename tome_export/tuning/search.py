"""The search over r schedules and precisions, as pure logic over two probes (no torch, no timing).

Quality falls and speed rises as a schedule merges more, so each schedule family is an ordered list (no schedule
merges fewer tokens in total than the one before; until the per-block caps bind, every block merges at least as
much) and the search looks for the *last schedule within the budget* by bisection instead of trying them all:

1. **screen** a family (eager fp32 PyTorch, no build) for its boundary: constant r first, then decreasing
   ``r:-1`` (more merges early), then per-block lists between the constant boundary ``c`` and ``c+1`` (``c+1``
   in the first ``j`` blocks);
2. per precision (r=0 first, once): the family's boundary, searched at or below the fp32 screen's (reduced
   precision does not buy back accuracy that merging spent), probing the screen's boundary first;
3. the next family, the same way, so that a tight time budget still builds the most promising candidates.

Every decision depends on quality alone, which is deterministic for a seed; timing happens afterwards, on the
built candidates (:mod:`.measure`). A probe that would overrun the time budget raises :class:`OutOfTime`; what
was built until then still competes. ``ahead`` hears which candidates the search may probe next (each bisection
step's two possible successors, each precision's first probes): an executor with spare nodes starts them early,
which changes when a probe's answer is ready, never which probes are made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..schedule import RSpec, r_label, resolve_schedule

CONSTANT, DECREASING, PER_BLOCK = "constant", "decreasing", "per-block"
FAMILIES = (CONSTANT, DECREASING, PER_BLOCK)


class OutOfTime(Exception):
    """The next probe would not fit in the time budget (with the final timing and output reserved)."""


@dataclass(frozen=True)
class Schedule:
    """One schedule of a family: as requested (what a build is asked for) and per block after the caps."""

    r: RSpec
    family: str
    blocks: Tuple[int, ...]  # the r each block really merges: the schedule's identity

    @property
    def label(self) -> str:
        return r_label(self.r)

    @property
    def merges(self) -> int:
        return sum(self.blocks)


@dataclass(frozen=True)
class Candidate:
    precision: str
    schedule: Schedule

    @property
    def key(self) -> str:
        return f"{self.precision}/" + ("r0" if not self.schedule.merges else self.schedule.label)


@dataclass(frozen=True)
class Shape:
    """What a schedule's caps depend on."""

    blocks: int
    tokens: int
    protected: int

    def resolve(self, r: RSpec, family: str) -> Schedule:
        return Schedule(r, family, resolve_schedule(r, self.blocks, self.tokens, self.protected).r)


def _distinct(schedules: Sequence[Schedule]) -> List[Schedule]:
    """Consecutive schedules that merge the same are one candidate (caps make large r alike)."""
    out: List[Schedule] = []
    for s in schedules:
        if not out or out[-1].blocks != s.blocks:
            out.append(s)
    return out


def constant_family(shape: Shape) -> List[Schedule]:
    """r = 0, 1, ... up to the first block's cap (beyond it every block is capped alike)."""
    top = (shape.tokens - shape.protected) // 2
    return _distinct([shape.resolve(r, CONSTANT) for r in range(top + 1)])


def decreasing_family(shape: Shape) -> List[Schedule]:
    """``r:-1`` (2r in the first block falling to 0 in the last), r = 0, 1, ... until the caps hold every block."""
    if shape.blocks < 2:
        return []
    limit = shape.resolve((shape.tokens * shape.blocks, -1.0), DECREASING).blocks
    schedules, r = [], 0
    while True:
        s = shape.resolve((r, -1.0), DECREASING)
        schedules.append(s)
        if s.blocks == limit:
            return _distinct(schedules)
        r += 1


def per_block_family(shape: Shape, base: int) -> List[Schedule]:
    """Between constant ``base`` and ``base + 1``: ``base + 1`` in the first j blocks, j = 0 .. blocks."""
    lists = [[base + 1] * j + [base] * (shape.blocks - j) for j in range(shape.blocks + 1)]
    return _distinct([shape.resolve(r, PER_BLOCK) for r in lists])


def last_within(count: int, within: Callable[[int], bool], low: int, high: int, high_first: bool = False,
                ahead: Callable[[List[int]], None] = lambda indices: None) -> int:
    """The largest index in ``[low, high]`` whose schedule is within the budget, given that ``low``'s is and that
    being within the budget is monotone (within, then not). ``high_first``: probe ``high`` before bisecting (a
    bound that is often the answer). ``ahead`` hears each index about to be probed with the ones that may follow."""
    if not 0 <= low <= high < count:
        raise ValueError(f"bad search range [{low}, {high}] of {count}")
    if high_first and high > low:
        ahead([high] + ([(low + high) // 2] if high - 1 > low else []))
        if within(high):
            return high
        high -= 1
    while low < high:
        mid = (low + high + 1) // 2
        ahead([mid] + ([(mid + high + 1) // 2] if mid < high else []) + ([(low + mid) // 2] if low < mid - 1 else []))
        if within(mid):
            low = mid
        else:
            high = mid - 1
    return low


Screen = Callable[[Schedule], bool]  # eager fp32: within the budget?
Probe = Callable[[Candidate], bool]  # built artifact: within the budget? (raises OutOfTime)
Ahead = Callable[[List[Candidate]], None]  # candidates that may be probed next, most likely first


def _quiet(candidates: List[Candidate]) -> None:
    """Hears nothing."""


@dataclass
class SearchResult:
    screen_bounds: Dict[str, Optional[Schedule]]  # per family: the fp32 screen's last schedule within
    bounds: Dict[Tuple[str, str], Schedule]  # (precision, family) -> the last schedule within, as found
    stopped: Optional[str] = None  # why the search stopped early (the time budget), or None


def _screen_family(family: List[Schedule], screen: Screen) -> Optional[Schedule]:
    """The fp32 screen's last schedule within the budget (None for an empty family)."""
    return family[last_within(len(family), lambda i: screen(family[i]), 0, len(family) - 1)] if family else None


def _screen_per_block(shape: Shape, constant: Optional[Schedule], screen: Screen) -> Optional[Schedule]:
    """Per-block lists between the screen's constant boundary ``c`` and ``c + 1`` (which is outside)."""
    if constant is None or constant.blocks == constant_family(shape)[-1].blocks or not isinstance(constant.r, int):
        return None
    refine = per_block_family(shape, constant.r)
    return refine[last_within(len(refine), lambda i: screen(refine[i]), 0, len(refine) - 2)]


def _hints(family: List[Schedule], precision: str, ahead: Ahead) -> Callable[[List[int]], None]:
    return lambda indices: ahead([Candidate(precision, family[i]) for i in indices])


def _bounded(family: List[Schedule], bound: Optional[Schedule], precision: str, probe: Probe,
             ahead: Ahead = _quiet) -> Schedule:
    """The last schedule of ``family`` within the budget for ``precision``, at or below ``bound``."""
    high = next((i for i, s in enumerate(family) if bound is not None and s.blocks == bound.blocks), 0)
    return family[last_within(len(family), lambda i: probe(Candidate(precision, family[i])), 0, high,
                              high_first=True, ahead=_hints(family, precision, ahead))]


def _refine(shape: Shape, precision: str, base: Schedule, screened: Dict[str, Optional[Schedule]],
            probe: Probe, ahead: Ahead = _quiet) -> Optional[Schedule]:
    """Per-block lists between a precision's constant boundary and the next constant r."""
    if not isinstance(base.r, int) or base.blocks == constant_family(shape)[-1].blocks:
        return None
    family = per_block_family(shape, base.r)
    if len(family) < 3:
        return None
    screen_c, screen_j = screened[CONSTANT], screened[PER_BLOCK]
    if screen_c is not None and base.blocks == screen_c.blocks:  # the screen's refinement bounds this one
        if screen_j is None or not screen_j.merges > base.merges:
            return None
        return _bounded(family, screen_j, precision, probe, ahead)
    return family[last_within(len(family), lambda i: probe(Candidate(precision, family[i])), 0, len(family) - 2,
                              ahead=_hints(family, precision, ahead))]


def run_search(shape: Shape, precisions: Sequence[str], screen: Screen, probe: Probe,
               ahead: Ahead = _quiet) -> SearchResult:
    """Family by family, most valuable first (constant, decreasing, per-block): screen the family in fp32, then
    find each precision's boundary in it. A precision whose r=0 misses the budget is not searched further. When
    the time budget runs out, what was found until then stands."""
    result = SearchResult(screen_bounds={}, bounds={})
    screened = result.screen_bounds
    try:
        constant = constant_family(shape)
        screened[CONSTANT] = _screen_family(constant, screen)
        ahead([Candidate(p, s) for p in precisions for s in (constant[0], screened[CONSTANT])])
        within: List[str] = []
        for p in precisions:  # one precision's ToMe candidate before the next precision's r=0
            if probe(Candidate(p, constant[0])):
                within.append(p)
                result.bounds[(p, CONSTANT)] = _bounded(constant, screened[CONSTANT], p, probe, ahead)
        screened[DECREASING] = _screen_family(decreasing_family(shape), screen)
        for p in within:
            if screened[DECREASING] is not None:
                result.bounds[(p, DECREASING)] = _bounded(decreasing_family(shape), screened[DECREASING], p, probe,
                                                          ahead)
        screened[PER_BLOCK] = _screen_per_block(shape, screened[CONSTANT], screen)
        for p in within:
            found = _refine(shape, p, result.bounds[(p, CONSTANT)], screened, probe, ahead)
            if found is not None:
                result.bounds[(p, PER_BLOCK)] = found
    except OutOfTime as exc:
        result.stopped = str(exc) or "time budget"
    return result
