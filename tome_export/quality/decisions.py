"""Merge decisions: which A token merged into which B token, per block and image, and how far two agree.

Read from the PyTorch model (:func:`torch_merge_decisions`, each block's own merge function) or from an artifact
whose decision tensors are exposed as extra outputs (:func:`decision_tensors`, :func:`with_decision_outputs`,
:func:`decisions_from_outputs`). Agreement has three measures, each with its own name
(:func:`merge_decision_agreement`): identical decisions, kept pairs and kept groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..graph_names import MATCH_PREFIX, block_of, block_order

# A merge decision of one block: for every image, the (A index, B index) pairs of the merged tokens, sorted by
# A index, shape (images, r, 2). Keys are block names as in the graph ("blocks.3").
Decisions = Dict[str, np.ndarray]


@dataclass(frozen=True)
class DecisionTensors:
    """The graph tensors that hold one block's merge decision.

    ``gather`` lowering: ``sources`` are the merged A indices and ``destinations`` their B tokens, both
    ``(batch, r)`` integers. ``onehot`` lowering: ``merged`` is the ``(batch, nA)`` boolean "this A token merges"
    (``rank < r``) and ``best`` every A token's best B index, ``(batch, nA)``.
    """

    lowering: str
    sources: Optional[str] = None
    destinations: Optional[str] = None
    merged: Optional[str] = None
    best: Optional[str] = None

    @property
    def names(self) -> List[str]:
        return [n for n in (self.sources, self.destinations, self.merged, self.best) if n is not None]


def decision_tensors(model: Any) -> Dict[str, DecisionTensors]:
    """Per merging block, the tensors of an fp32 ToMe export (``onnx.ModelProto``) that hold its decision.

    ``gather``: the matching path's GatherElements reads the merged A indices (its input 1) and yields their B
    destinations (its output). ``onehot``: the Less that says which A tokens merge (``rank < r``) and the
    ReduceMin that gives every A token's best B index.
    """
    blocks: Dict[str, DecisionTensors] = {}
    onehot: Dict[str, Dict[str, str]] = {}
    for node in model.graph.node:
        if not node.name.startswith(MATCH_PREFIX):
            continue
        if node.op_type == "GatherElements":
            blocks[block_of(node.name)] = DecisionTensors("gather", sources=node.input[1], destinations=node.output[0])
        elif node.op_type in ("Less", "ReduceMin"):
            onehot.setdefault(block_of(node.name), {})[node.op_type] = node.output[0]
    for block, found in onehot.items():
        if len(found) == 2:
            blocks[block] = DecisionTensors("onehot", merged=found["Less"], best=found["ReduceMin"])
    if not blocks and any(n.name.startswith(MATCH_PREFIX) for n in model.graph.node):
        raise RuntimeError("found no merge-decision tensors in a graph with ToMe nodes: the lowering changed; "
                           "update tome_export.quality.decisions.decision_tensors")
    return dict(sorted(blocks.items(), key=lambda kv: block_order(kv[0])))


def decision_output_names(tensors: Mapping[str, DecisionTensors]) -> List[str]:
    return [name for spec in tensors.values() for name in spec.names]


def with_decision_outputs(model: Any, tensors: Mapping[str, DecisionTensors]) -> Any:
    """A copy of ``model`` (an ``onnx.ModelProto``, fp32 or quantized) that also outputs every decision tensor."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {t for n in copy.graph.node for t in n.output}
    outputs = {o.name for o in copy.graph.output}
    for name in decision_output_names(tensors):
        if name not in existing:
            raise RuntimeError(f"decision tensor {name!r} is missing from the graph (a rewrite renamed it)")
        if name not in outputs:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy


def _onehot_pairs(merged: np.ndarray, best: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(A indices, B indices) ``(batch, r)`` from which A tokens merge ``(batch, nA)`` and their best B."""
    r = int(merged[0].sum())
    src = np.zeros((len(merged), r), np.int64)
    dst = np.zeros_like(src)
    for b, (mask, picks) in enumerate(zip(merged, best)):
        i = np.nonzero(mask)[0]
        if len(i) != r:  # a broken ranking (another number of merges): keep it visibly different
            src[b], dst[b] = np.resize(i, r), -1
        else:
            src[b], dst[b] = i, picks[i]
    return src, dst


def decisions_from_outputs(tensors: Mapping[str, DecisionTensors], outputs: Mapping[str, np.ndarray]) -> Decisions:
    """Canonical decisions ``(images, r, 2)`` per block from the decision tensors' values of one batch."""
    result: Decisions = {}
    for block, spec in tensors.items():
        if spec.lowering == "gather":
            src = np.asarray(outputs[spec.sources]).astype(np.int64)
            dst = np.asarray(outputs[spec.destinations]).astype(np.int64)
        else:
            src, dst = _onehot_pairs(np.asarray(outputs[spec.merged]).astype(bool),
                                     np.asarray(outputs[spec.best]).astype(np.int64))
        order = np.argsort(src, axis=1, kind="stable")
        result[block] = np.stack([np.take_along_axis(src, order, 1), np.take_along_axis(dst, order, 1)], -1)
    return result


def artifact_merge_decisions(infer: Callable[[np.ndarray], Mapping[str, np.ndarray]],
                             tensors: Mapping[str, DecisionTensors], batches: Sequence[np.ndarray]) -> Decisions:
    """Decisions of an artifact: ``infer(batch)`` returns its outputs by name, decision tensors included."""
    return concat_decisions([decisions_from_outputs(tensors, infer(x)) for x in batches])


def concat_decisions(parts: Sequence[Decisions]) -> Decisions:
    """Decisions of several batches, concatenated along the image axis."""
    return {block: np.concatenate([p[block] for p in parts]) for block in parts[0]} if parts else {}


def torch_merge_decisions(model: Any, batches: Sequence[np.ndarray],
                          to_tensor: Optional[Callable[[np.ndarray], Any]] = None) -> Decisions:
    """Decisions of a PyTorch ToMe model, read from each block's own merge function.

    Every block's ``TokenMatch`` returns ``merge(x)``; applied to one-hot token ids it shows where each input
    token went. Output rows are ``[protected, unmerged A, B]``, so an A token that lands in a B row merged
    into that B token. Independent of the lowering and precision: it is the model's own code that decides.
    ``to_tensor`` turns a batch into the model's input (default: ``torch.from_numpy``).
    """
    import torch

    from ..models.base import merge_destinations

    convert = to_tensor or (lambda x: torch.from_numpy(np.ascontiguousarray(x)))
    found: Dict[str, List[np.ndarray]] = {}
    for x in batches:
        for block, rows in merge_destinations(model, convert(x)).items():
            match = model.get_submodule(block).tome_merge.match
            found.setdefault(block, []).append(_pairs_of_rows(rows, match.r, match.num_protected))
    return {block: np.concatenate(v) for block, v in sorted(found.items(), key=lambda kv: block_order(kv[0]))}


def _pairs_of_rows(rows: np.ndarray, r: int, num_protected: int) -> np.ndarray:
    """``rows[b, t]`` (the output token holding input token t) -> merged (A index, B index) pairs per image."""
    from ..schedule import cap_r

    t, p = rows.shape[1], num_protected
    r = cap_r(r, t, p)  # > 0: only merging blocks run their match
    a0 = p + p % 2
    n_a = len(range(a0, t, 2))
    base = p + n_a - r  # first B row
    pairs = []
    for image in rows[:, a0::2]:  # where each A token went
        merged = np.nonzero(image >= base)[0]
        pairs.append(np.stack([merged, image[merged] - base], -1))
    return np.stack(pairs).astype(np.int64)


def _groups(pairs: np.ndarray) -> set:
    """The token groups one block merged in one image: each B token with the A tokens merged into it."""
    members: Dict[int, List[int]] = {}
    for a, b in pairs.tolist():
        members.setdefault(b, []).append(a)
    return {(b, frozenset(a)) for b, a in members.items()}


def _pairs(pairs: np.ndarray) -> set:
    return {tuple(p) for p in pairs.tolist()}


def merge_decision_agreement(reference: Decisions, candidate: Decisions) -> Dict[str, Any]:
    """How often a candidate merges exactly as the reference. Three measures, one meaning each:

    ``agreement``: the fraction of (block, image) decisions that are identical (the same set of (A token,
    B token) pairs). ``pair_agreement``: the fraction of the reference's merged pairs that the candidate
    merges too. ``group_agreement``: the fraction of the reference's merged groups (a B token with every A token
    merged into it) that the candidate forms identically. ``first_block``: the agreement of the first merging
    block, where both see the same input tokens; later blocks compound earlier differences.
    """
    if set(reference) != set(candidate):
        raise ValueError(f"blocks differ: reference {sorted(reference)} vs candidate {sorted(candidate)}")
    per_block: Dict[str, float] = {}
    counts = {"same": 0, "total": 0, "pairs_same": 0, "pairs": 0, "groups_same": 0, "groups": 0}
    for block in sorted(reference, key=block_order):
        ref, cand = reference[block], candidate[block]
        if ref.shape != cand.shape:
            raise ValueError(f"{block}: decision shapes differ {ref.shape} vs {cand.shape}")
        equal = (ref == cand).all(axis=(1, 2))
        per_block[block] = round(float(equal.mean()), 4)
        counts["same"] += int(equal.sum())
        counts["total"] += len(equal)
        for r_img, c_img in zip(ref, cand):
            counts["pairs_same"] += len(_pairs(r_img) & _pairs(c_img))
            counts["pairs"] += len(r_img)
            ref_groups = _groups(r_img)
            counts["groups_same"] += len(ref_groups & _groups(c_img))
            counts["groups"] += len(ref_groups)

    def fraction(part: str, whole: str) -> float:
        return round(counts[part] / counts[whole], 4) if counts[whole] else 1.0

    return {"agreement": fraction("same", "total"), "pair_agreement": fraction("pairs_same", "pairs"),
            "group_agreement": fraction("groups_same", "groups"),
            "first_block": next(iter(per_block.values()), 1.0), "decisions": counts["total"], "per_block": per_block}


def merge_decision_report(reference: Decisions, as_built: Decisions, images: int, keep_fp32: str,
                          without_protection: Optional[Any] = None) -> Dict[str, Any]:
    """The manifest's ``merge_decisions``: agreement of the artifact (and, when measured, of the same build
    without fp32 protection: a Decisions mapping, or a string saying why it was not built) with the reference."""
    if not reference:  # nothing merges (r = 0)
        return {"reference": "PyTorch fp32 ToMe", "blocks_merging": 0}
    report: Dict[str, Any] = {"reference": "PyTorch fp32 ToMe", "images": images, "keep_fp32": keep_fp32,
                              "as_built": merge_decision_agreement(reference, as_built)}
    if isinstance(without_protection, str):
        report["without_protection"] = without_protection
    elif without_protection is not None:
        report["without_protection"] = merge_decision_agreement(reference, without_protection)
    return report


def summary_line(report: Mapping[str, Any]) -> Optional[str]:
    """One line for the CLI: decision agreement as built and without protection."""
    built = report.get("as_built")
    if not isinstance(built, dict):
        return None
    line = (f"{built['agreement']:.1%} of {built['decisions']} merge decisions (which tokens one block merges, "
            f"for one image) as PyTorch fp32 makes them")
    other = report.get("without_protection")
    if isinstance(other, dict):
        line += f"; {other['agreement']:.1%} without the fp32 protection of the matching"
    return line + "; rounding flips near-tied matches, and the logits are validated apart"


def _decision_margin(metric: Any, r: int, num_protected: int) -> np.ndarray:
    """Per image, the smallest score gap one block's matching rests on ``(B,)``: between the r-th and (r+1)-th
    ranked A token, and between each merged A token's best and second-best B token. 0 for an exact tie."""
    import torch

    from ..merge import _layout, _scores
    from ..schedule import cap_r

    r = cap_r(r, metric.shape[1], num_protected)
    scores = _scores(metric.float(), _layout(metric.shape[1], num_protected, r, metric.device))
    n_a, n_b = scores.shape[1], scores.shape[2]
    top = scores.topk(min(2, n_b), dim=-1).values
    best = top[..., 0]
    second = best - top[..., 1] if n_b > 1 else torch.full_like(best, float("inf"))
    order = best.argsort(dim=-1, descending=True, stable=True)
    ranked = best.gather(1, order)
    rank_gap = ranked[:, r - 1] - ranked[:, r] if 0 < r < n_a else torch.full_like(best[:, 0], float("inf"))
    merged_gap = second.gather(1, order[:, :r]).amin(dim=-1) if r > 0 else torch.full_like(rank_gap, float("inf"))
    return torch.minimum(rank_gap, merged_gap).cpu().numpy().astype(np.float64)


def matching_margins(model: Any, batches: Sequence[np.ndarray]) -> np.ndarray:
    """Per image ``(N,)``, the smallest score gap any merge decision of the PyTorch model rests on (over every
    merging block). Where it is below the difference two backends' arithmetic makes, they may decide the merge
    differently: a near-tie flip, not an error of the graph."""
    import torch

    from ..models.base import TokenMatch, TokenMerge

    margins: List[np.ndarray] = []
    found: List[np.ndarray] = []  # this batch's margins, one array per merging block

    def record(module: TokenMatch, inputs: Tuple[Any, ...], output: Any) -> None:
        found.append(_decision_margin(inputs[0].mean(dim=1), module.r, module.num_protected))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, TokenMatch)]
    merges = [m for m in model.modules() if isinstance(m, TokenMerge)]
    fused = [m.fused for m in merges]
    try:
        for m in merges:  # the fused kernel bypasses TokenMatch (and so these hooks)
            m.fused = False
        for x in batches:
            found.clear()
            with torch.inference_mode():
                model(torch.from_numpy(np.ascontiguousarray(x)))
            margins.append(np.min(found, axis=0) if found else np.full(len(x), np.inf))
    finally:
        for h in handles:
            h.remove()
        for m, was in zip(merges, fused):
            m.fused = was
    return np.concatenate(margins)
