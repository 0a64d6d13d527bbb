"""Merge schedules: how many tokens each block merges.

A schedule is given as one of
  * ``int`` r: the same r in every block;
  * ``(r, inflect)``: r varying linearly over the blocks, like the reference's ``parse_r``
    (inflect -1 merges more early, +1 more late, 0 is constant);
  * a list of ints, one per block.
Every token count is a Python int, so exported graphs have static shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

from .errors import UserError

RSpec = Union[int, Tuple[int, float], Sequence[int]]
MAX_R = 2**20  # more tokens than a ViT has at the largest image side tome-export builds: beyond it r is a typo


def cap_r(r: int, num_tokens: int, num_protected: int) -> int:
    """The number of merges a block can really make (the reference's cap): at most half the unprotected tokens."""
    return max(0, min(r, (num_tokens - num_protected) // 2))


def expand_schedule(r: RSpec, num_blocks: int) -> List[int]:
    """The requested r of each block (before capping)."""
    if isinstance(r, bool):
        raise UserError(f"r must be an int, an (r, inflect) pair or a list of ints, not {r!r}")
    if isinstance(r, int):
        if r < 0:
            raise UserError(f"r must be >= 0, got {r}: pass the number of tokens to merge per block")
        _check_max(r)
        return [r] * num_blocks
    if isinstance(r, tuple) and len(r) == 2:  # (r, inflect), as in the reference; per-block is a list
        base, inflect = r
        if not (isinstance(base, int) and isinstance(inflect, (int, float))) or isinstance(base, bool):
            raise UserError(f"an (r, inflect) schedule needs an int and a number, got {r!r}")
        if base < 0:
            raise UserError(f"r must be >= 0, got {base}")
        _check_max(base)
        if not -1.0 <= inflect <= 1.0:
            raise UserError(f"inflect must be in [-1, 1], got {inflect}")
        if num_blocks == 1:  # no slope over one block (the reference divides by zero): r itself
            return [base]
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / (num_blocks - 1)
        return [int(lo + step * i) for i in range(num_blocks)]
    if isinstance(r, list):
        values = list(r)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise UserError(f"an r schedule list must hold ints, got {values!r}")
        if any(v < 0 for v in values):
            raise UserError(f"an r schedule must not hold negative values, got {values!r}")
        _check_max(max(values, default=0))
        if len(values) != num_blocks:
            raise UserError(
                f"the r schedule has {len(values)} entries but the model has {num_blocks} blocks: "
                "give one r per block"
            )
        return values
    raise UserError(f"r must be an int, an (r, inflect) pair or a list of ints, not {r!r}")


def _check_max(r: int) -> None:
    if r > MAX_R:
        raise UserError(f"r must be at most {MAX_R:,} (more tokens than any model has), got {r}")


CAP_WARNING = "r capped"  # how the cap warning starts


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: the r each block really merges and the tokens left after it."""

    requested: Tuple[int, ...]
    r: Tuple[int, ...]
    tokens: Tuple[int, ...]
    num_tokens: int
    num_protected: int

    @property
    def capped(self) -> bool:
        return self.requested != self.r

    @property
    def capped_early(self) -> bool:
        """Whether a block before the last is capped: more than the reference's usual trim of the final block
        (r=16 on a 197-token ViT caps only there), so worth a warning."""
        return self.requested[:-1] != self.r[:-1]

    def cap_message(self) -> str:
        blocks = [f"block {i} {want}->{got}" for i, (want, got) in enumerate(zip(self.requested, self.r)) if want != got]
        return f"{CAP_WARNING} where too few tokens are left to merge ({', '.join(blocks)})"


def resolve_schedule(r: RSpec, num_blocks: int, num_tokens: int, num_protected: int) -> Schedule:
    """Apply the reference's per-block cap to a schedule."""
    requested = expand_schedule(r, num_blocks)
    effective, tokens, t = [], [], num_tokens
    for want in requested:
        got = cap_r(want, t, num_protected)
        t -= got
        effective.append(got)
        tokens.append(t)
    return Schedule(tuple(requested), tuple(effective), tuple(tokens), num_tokens, num_protected)


_LIST = re.compile(r"^\[?\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*\]?$")


def parse_r_text(text: str) -> RSpec:
    """Parse the CLI form: ``16``, ``16:-1`` (r:inflect) or ``8,8,8,...`` (one r per block)."""
    s = text.strip()
    if re.fullmatch(r"-?\d+", s):
        value = int(s)
        if value < 0:
            raise UserError(f"--r must be >= 0, got {value}")
        return value
    m = re.fullmatch(r"(-?\d+)\s*:\s*(-?\d+(?:\.\d*)?|-?\.\d+)", s)
    if m:
        base, inflect = int(m.group(1)), float(m.group(2))
        if base < 0 or not -1.0 <= inflect <= 1.0:
            raise UserError(f"--r {text!r}: r:inflect needs r >= 0 and inflect in [-1, 1] (e.g. 16:-1)")
        return (base, inflect)
    if "," in s and _LIST.match(s):
        return [int(v) for v in s.strip("[]").split(",") if v.strip()]
    raise UserError(
        f"cannot read --r {text!r}: use an int (16), r:inflect (16:-1) or one int per block (8,8,8,...)"
    )


def r_text(r: RSpec) -> str:
    """A schedule as ``--r`` takes it (``16``, ``16:-1``, ``8,8,7``): the inverse of :func:`parse_r_text`."""
    if isinstance(r, int):
        return str(r)
    if isinstance(r, tuple):
        return f"{r[0]}:{r[1]:g}"
    return ",".join(str(v) for v in r)


def r_label(r: RSpec) -> str:
    """Short label of a schedule for directory names: r16, r16i-1.0, rlist-..."""
    if isinstance(r, int):
        return f"r{r}"
    if isinstance(r, tuple):
        return f"r{r[0]}i{r[1]:g}"
    return "r" + "-".join(str(v) for v in r)
