"""Choosing the winner from the candidates timed side by side, and saying plainly whether ToMe paid.

Rules, in order:

1. eligible: built, timed, within the quality budget and the latency limit, and of a precision searched;
2. the fastest eligible throughput T; every eligible candidate within ``tie_tolerance`` of T is a tie (timing
   noise on a shared machine is a few percent), and ties go to better quality, then fewer merges, then the
   precision listed first, then the name — so a re-run picks the same winner unless the throughputs move by
   more than the tolerance;
3. nothing eligible: the fastest candidate within the quality budget when only the latency limit failed, else
   the unmodified model (fp32 r=0); either way the budget is reported as not met.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .measure import Evaluation
from .request import Budget


@dataclass
class Decision:
    winner: Evaluation
    met_budget: bool
    reason: str
    ties: List[str] = field(default_factory=list)  # keys within the tolerance of the fastest eligible
    eligible: List[str] = field(default_factory=list)
    tome_paid: bool = False
    tome_verdict: str = ""
    per_precision: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def throughput(e: Evaluation) -> Optional[float]:
    return e.timing.get("throughput_ips")


def quality_rank(e: Evaluation) -> Tuple[float, ...]:
    """Lower is better: images lost (then net drop) with labels, else agreement and cosine (an encoder task's
    mean feature cosine), negated."""
    q = e.quality
    if "lost_images" in q:
        return (q["lost_images"], q["accuracy_drop_pts"])
    if "top1_agreement" not in q:
        return (-q["cosine"],)
    return (-q["top1_agreement"], -q["mean_cosine"])


def _tie_order(e: Evaluation, precisions: Sequence[str]) -> Tuple[Any, ...]:
    rank = precisions.index(e.candidate.precision) if e.candidate.precision in precisions else len(precisions)
    return (quality_rank(e), e.candidate.schedule.merges, rank, e.candidate.key)


def _fastest_first(evaluations: Sequence[Evaluation]) -> List[Evaluation]:
    return sorted(evaluations, key=lambda e: (-throughput(e), e.candidate.key))


def choose(evaluations: Sequence[Evaluation], budget: Budget, precisions: Sequence[str], baseline: Evaluation,
           tie_tolerance: float) -> Decision:
    """The winner among ``evaluations`` (see the module's rules); ``baseline`` is fp32 r=0."""
    timed = [e for e in evaluations if e.status == "evaluated" and throughput(e)]
    good = [e for e in timed if e.within and e.candidate.precision in precisions]
    eligible = [e for e in good if budget.within_latency(e.timing.get("median_ms"))]
    if eligible:
        best = _fastest_first(eligible)[0]
        ties = [e for e in eligible if throughput(e) * (1.0 + tie_tolerance) >= throughput(best)]
        winner = min(ties, key=lambda e: _tie_order(e, precisions))
        if winner is best:
            reason = f"the fastest of {len(eligible)} candidates within the budget ({throughput(best):.1f} images/s)"
        else:
            reason = (f"within {100 * tie_tolerance:g}% of the fastest within the budget ({best.candidate.key}, "
                      f"{throughput(best):.1f} vs {throughput(winner):.1f} images/s: a tie), and ahead of it on "
                      f"quality, then fewer merges, then precision order")
        decision = Decision(winner, True, reason, [e.candidate.key for e in ties], [e.candidate.key for e in eligible])
    elif good:
        winner = _fastest_first(good)[0]
        decision = Decision(winner, False, (
            f"no candidate within the quality budget met the latency limit of {budget.max_latency_ms:g} ms; "
            f"shipping the fastest within the quality budget ({winner.timing['median_ms']:.2f} ms per batch)"))
    else:
        decision = Decision(baseline, False, "no candidate met the quality budget: shipping the unmodified model "
                                             "(fp32 r=0)")
    decision.per_precision = tome_by_precision(good)
    built_tome = any(e.status == "evaluated" and e.candidate.schedule.merges for e in evaluations)
    decision.tome_paid, decision.tome_verdict = tome_verdict(decision.winner, good, built_tome)
    return decision


def tome_by_precision(good: Sequence[Evaluation]) -> Dict[str, Dict[str, Any]]:
    """Per precision: r=0's throughput and the fastest ToMe candidate within the quality budget, side by side."""
    out: Dict[str, Dict[str, Any]] = {}
    for precision in dict.fromkeys(e.candidate.precision for e in good):
        mine = [e for e in good if e.candidate.precision == precision]
        zero = next((e for e in mine if not e.candidate.schedule.merges), None)
        tome = next(iter(_fastest_first([e for e in mine if e.candidate.schedule.merges])), None)
        entry: Dict[str, Any] = {"r0_ips": throughput(zero) if zero else None,
                                 "best_tome": tome.candidate.key if tome else None,
                                 "best_tome_ips": throughput(tome) if tome else None}
        entry["tome_speedup"] = (throughput(tome) / throughput(zero)) if tome and zero else None
        out[precision] = entry
    return out


def tome_verdict(winner: Evaluation, good: Sequence[Evaluation], built_tome: bool = True) -> Tuple[bool, str]:
    """Whether merging tokens paid against not merging, in the same measurement, in one sentence
    (``built_tome``: whether any schedule that merges tokens was built at all before the time budget ran out)."""
    zeros = _fastest_first([e for e in good if not e.candidate.schedule.merges])
    tomes = _fastest_first([e for e in good if e.candidate.schedule.merges])
    if winner.candidate.schedule.merges:
        if not zeros:
            return True, "ToMe pays: no candidate without merging kept the budget"
        return True, (f"ToMe pays: {winner.candidate.key} runs at {throughput(winner) / throughput(zeros[0]):.2f}x "
                      f"the throughput of the fastest candidate without merging ({zeros[0].candidate.key})")
    if not tomes and not built_tome:
        return False, ("ToMe was not measured: the search built no schedule that merges tokens (the time budget "
                       "ran out first, or no precision kept the budget at r=0); give more --time-budget")
    if not tomes:
        return False, "ToMe did not pay: no schedule that merges tokens kept the budget"
    return False, (f"ToMe did not pay here: the fastest ToMe candidate within the budget ({tomes[0].candidate.key}) "
                   f"reached {throughput(tomes[0]) / throughput(winner):.2f}x the winner's throughput, which merges "
                   f"no tokens")
