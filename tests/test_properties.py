"""Property-based tests (hypothesis).

Fast properties of the pure parts (schedules, the CLI's r syntax, the merge against the slow reference) run
many examples; the export property runs a few: for small ViTs over r schedules, image sizes, patch sizes,
batch sizes and model kinds, an export matches PyTorch and the slow reference in ONNX Runtime, or fails with a
one-line UserError: never a wrong graph.

Examples are derandomized so CI is reproducible; TOME_HYPOTHESIS_SCALE=10 runs ten times as many.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tome_export import patch
from tome_export.errors import UserError
from tome_export.export import export_onnx
from tome_export.merge import bipartite_soft_matching, cap_r, destinations, merge_wavg
from tome_export.models import model_info, preprocessing
from tome_export.images import sample_photos
from tome_export.schedule import expand_schedule, parse_r_text, resolve_schedule

from tome_testing.models import make_model
from tome_testing.reference_tome import reference_forward, reference_merge

SCALE = float(os.environ.get("TOME_HYPOTHESIS_SCALE", "1"))


def _settings(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- schedules ----------------------------------------------------------------------------------------


@st.composite
def r_specs(draw, num_blocks: int):
    form = draw(st.sampled_from(["int", "inflect", "list"]))
    if form == "int":
        return draw(st.integers(0, 500))
    if form == "inflect":
        return (draw(st.integers(0, 200)), draw(st.integers(-1000, 1000)) / 1000)
    return draw(st.lists(st.integers(0, 500), min_size=num_blocks, max_size=num_blocks))


@st.composite
def schedule_cases(draw):
    blocks = draw(st.integers(1, 24))
    protected = draw(st.integers(0, 5))
    return draw(r_specs(blocks)), blocks, protected + draw(st.integers(0, 800)), protected


@_settings(300)
@given(schedule_cases())
def test_resolved_schedules_apply_the_reference_cap_block_by_block(case):
    r, blocks, tokens, protected = case
    s = resolve_schedule(r, blocks, tokens, protected)
    assert len(s.requested) == len(s.r) == len(s.tokens) == blocks
    t = tokens
    for want, got, after in zip(s.requested, s.r, s.tokens):
        assert want >= 0 and got == cap_r(want, t, protected) == max(0, min(want, (t - protected) // 2))
        t -= got
        assert after == t >= protected
    assert s.capped == (s.requested != s.r)
    if isinstance(r, tuple):  # the reference's linear schedule: r on average, never negative
        assert abs(sum(s.requested) - r[0] * blocks) <= blocks
        assert r[1] != 0 or set(s.requested) == {r[0]}


@_settings(300)
@given(st.integers(1, 24).flatmap(lambda n: st.tuples(st.just(n), r_specs(n))), st.booleans())
def test_cli_r_syntax_round_trips(case, brackets):
    blocks, r = case
    if isinstance(r, int):
        text = str(r)
    elif isinstance(r, tuple):
        text = f"{r[0]}:{r[1]:g}"
    else:
        text = ", ".join(map(str, r)) + ("," if len(r) == 1 else "")  # one int alone would be an int
        text = f"[{text}]" if brackets else text
    parsed = parse_r_text(text)
    assert parsed == r
    assert expand_schedule(parsed, blocks) == expand_schedule(r, blocks)


@_settings(300)
@given(st.text(max_size=24))
def test_any_r_text_parses_or_is_a_one_line_user_error(text):
    try:
        r = parse_r_text(text)
    except UserError as exc:
        assert "\n" not in str(exc) and "--r" in str(exc)
        return
    try:
        expand_schedule(r, 12)
    except UserError as exc:
        assert "\n" not in str(exc)


# --- the merge against the slow reference ------------------------------------------------------------


@st.composite
def merge_cases(draw):
    t = draw(st.integers(2, 40))
    protected = draw(st.integers(0, min(5, t)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    n = draw(st.integers(1, 2))
    if draw(st.booleans()):  # exact ties everywhere: one-hot metrics, whose cosines are exactly 0 or 1
        k = draw(st.integers(1, 4))
        metric = torch.nn.functional.one_hot(torch.randint(0, k, (n, t), generator=gen), 4).float()
    else:
        metric = torch.randn(n, t, 6, generator=gen)
    x = torch.randn(n, t, 5, generator=gen)
    size = torch.randint(1, 6, (n, t, 1), generator=gen).float()
    return metric, x, size, draw(st.integers(0, t)), protected, draw(st.sampled_from(["gather", "onehot"]))


@_settings(200)
@given(merge_cases())
def test_merge_matches_the_reference(case):
    metric, x, size, r, protected, impl = case
    merge = bipartite_soft_matching(metric, r, protected, impl)
    got_x, got_size = merge_wavg(merge, x, size)
    t = x.shape[1]
    assert got_x.shape[1] == t - cap_r(r, t, protected)
    source = merge(torch.eye(t).expand(x.shape[0], t, t).contiguous())
    for i in range(x.shape[0]):
        want_x, want_size, want_groups = reference_merge(x[i], size[i, :, 0].tolist(), metric[i], r, protected)
        torch.testing.assert_close(got_x[i], want_x, atol=1e-5, rtol=1e-5)
        assert got_size[i, :, 0].tolist() == want_size
        assert [torch.nonzero(row).flatten().tolist() for row in source[i]] == want_groups


@st.composite
def degenerate_merge_cases(draw):
    """Merge cases whose metric rows may be all zero, NaN or infinite (keys with no direction)."""
    metric, _, _, r, protected, _ = draw(merge_cases())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    bad = torch.rand(metric.shape[:2], generator=gen) < draw(st.sampled_from([0.0, 0.2, 0.6, 1.0]))
    metric[bad] = draw(st.sampled_from([0.0, float("nan"), float("inf"), -float("inf")]))
    return metric, r, protected


@_settings(200)
@given(degenerate_merge_cases())
def test_both_lowerings_move_every_token_to_its_destination(case):
    metric, r, protected = case
    n, t, _ = metric.shape
    want = destinations(metric, r, protected)
    assert want.shape == (n, t) and want[:, :protected].tolist() == [list(range(protected))] * n
    eye = torch.eye(t).expand(n, t, t).contiguous()
    for impl in ("gather", "onehot"):
        source = bipartite_soft_matching(metric, r, protected, impl)(eye)
        assert torch.equal(source.sum(1), torch.ones(n, t))  # mass conserved
        assert torch.equal(source.argmax(1), want)


# --- exports of small ViTs -----------------------------------------------------------------------------


@st.composite
def export_cases(draw):
    kind = draw(st.sampled_from(["vit", "distilled", "registers", "avgpool"]))
    heads = draw(st.sampled_from([1, 2, 3]))
    overrides = {
        "patch_size": draw(st.sampled_from([16, 32, 14])),
        "img_size": draw(st.sampled_from([224, 384])),
        "depth": draw(st.integers(1, 2)),
        "num_heads": heads,
        "embed_dim": heads * draw(st.sampled_from([8, 16])),
    }
    if kind == "registers":
        overrides["reg_tokens"] = draw(st.integers(1, 4))
    depth = overrides["depth"]
    if draw(st.integers(0, 5)) == 0:  # now and then a schedule that must be refused
        r = draw(st.lists(st.integers(0, 300), min_size=depth + 1, max_size=depth + 1))
    else:
        r = draw(r_specs(depth))
    return {
        "kind": kind, "overrides": overrides, "r": r, "seed": draw(st.integers(0, 1000)),
        "impl": draw(st.sampled_from(["gather", "onehot"])), "batch": draw(st.integers(1, 3)),
        "dynamic": draw(st.booleans()), "trace_source": draw(st.booleans()),
    }


def _ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.slow  # twelve exports
@_settings(12)
@given(export_cases())
def test_export_matches_pytorch_and_the_reference_or_fails_clearly(case):
    o = case["overrides"]  # what was covered: pytest --hypothesis-show-statistics
    event(f"{case['kind']} patch {o['patch_size']} at {o['img_size']} px")
    event(f"r {type(case['r']).__name__}, {case['impl']}, batch {'dynamic' if case['dynamic'] else case['batch']}")
    model = make_model(case["kind"], seed=case["seed"], **case["overrides"])
    reference_model = make_model(case["kind"], seed=case["seed"], **case["overrides"])
    pre = preprocessing(model)
    assert pre.input_size[1:] == (case["overrides"]["img_size"],) * 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            patch(model, case["r"], merge_impl=case["impl"])
            export_onnx(model, path, pre.input_size, batch=case["batch"], dynamic_batch=case["dynamic"],
                        trace_source=case["trace_source"])
        except UserError as exc:
            assert "\n" not in str(exc) and "one r per block" in str(exc), exc
            assert not path.exists()
            event("refused with a UserError")
            return
        session = _ort_session(path)
        x = pre.batch(sample_photos(case["batch"]))
        outputs = session.run(None, {"images": x})
    info = model_info(model)
    sched = resolve_schedule(case["r"], info.num_blocks, info.num_tokens, info.num_protected)
    with torch.no_grad():
        eager, source = model.forward_with_source(torch.from_numpy(x))
    assert outputs[0].shape == tuple(eager.shape)
    assert np.abs(outputs[0] - eager.numpy()).max() <= 1e-4
    want, groups = reference_forward(reference_model, torch.from_numpy(x[:1]), list(sched.requested))
    assert (eager[:1] - want).abs().max().item() <= 1e-4
    assert source.shape[1] == sched.tokens[-1]
    assert [torch.nonzero(row).flatten().tolist() for row in source[0]] == groups[0]
    if case["trace_source"]:
        assert np.array_equal(outputs[1], source.numpy())
