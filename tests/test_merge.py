"""The merge module against a hand-written reference, ties, protected tokens and both lowerings."""

import pytest
import torch
import torch.nn.functional as F

from tome_export.merge import bipartite_soft_matching, cap_r, destinations, merge_wavg, split_ab
from tome_testing.reference_tome import reference_merge

IMPLS = ["gather", "onehot"]


def _random_case(seed: int, n: int = 2, t: int = 29, c: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, c, generator=gen)
    metric = torch.randn(n, t, 8, generator=gen)
    size = torch.randint(1, 5, (n, t, 1), generator=gen).float()
    return x, metric, size


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("protected", [0, 1, 2, 5])
@pytest.mark.parametrize("r", [1, 4, 13])
def test_merge_matches_reference(impl, protected, r):
    x, metric, size = _random_case(seed=protected * 100 + r)
    merge = bipartite_soft_matching(metric, r, protected, impl)
    got_x, got_size = merge_wavg(merge, x, size)
    for i in range(x.shape[0]):
        want_x, want_size, _ = reference_merge(x[i], size[i, :, 0].tolist(), metric[i], r, protected)
        assert got_x.shape[1] == x.shape[1] - cap_r(r, x.shape[1], protected)
        torch.testing.assert_close(got_x[i], want_x, atol=1e-5, rtol=1e-5)
        assert got_size[i, :, 0].tolist() == want_size


def test_several_sources_into_one_destination_are_all_summed():
    # Every A token is closest to B token 0 (position 1): all merges land there and must all be counted.
    t = 11
    metric = torch.zeros(1, t, 2)
    metric[..., 0] = 1.0
    metric[0, 1] = torch.tensor([1.0, 0.0])
    metric[0, 3::2] = torch.tensor([0.0, 1.0])
    x = torch.arange(t, dtype=torch.float32).reshape(1, t, 1)
    for impl in IMPLS:
        merge = bipartite_soft_matching(metric, 4, 0, impl)
        out, size = merge_wavg(merge, x, None)
        # A = 0,2,4,6,8,10 all score 1 with B position 1; ties -> lowest A indices 0,2,4,6 merge into 1.
        assert size[0, :, 0].tolist() == [1, 1, 5, 1, 1, 1, 1]
        assert out[0, 2, 0].item() == pytest.approx((1 + 0 + 2 + 4 + 6) / 5)
        assert out[0, :2, 0].tolist() == [8, 10]


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_ties_follow_the_documented_order(impl):
    # All scores equal: the lowest A indices merge, each into the lowest B index.
    t, r = 12, 3
    metric = torch.ones(2, t, 4)
    x = torch.arange(t, dtype=torch.float32).reshape(1, t, 1).expand(2, t, 1)
    out = bipartite_soft_matching(metric, r, 1, impl)(x)
    # protected 0; A = 2,4,6,8,10; B = 1,3,5,7,9,11; A 2,4,6 merge (sum) into B position 1.
    assert out[0, :, 0].tolist() == [0, 8, 10, 1 + 2 + 4 + 6, 3, 5, 7, 9, 11]
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_protected_tokens_are_never_merged(impl):
    x, metric, _ = _random_case(seed=7, t=21)
    protected = 5
    metric[:, :protected] = metric[:, protected:protected + 1]  # protected tokens look exactly like a patch
    source = torch.eye(21)[None].expand(2, -1, -1)
    out = bipartite_soft_matching(metric, 8, protected, impl)(source)
    assert torch.equal(out[:, :protected], source[:, :protected])
    assert torch.equal(out[:, protected:, :protected], torch.zeros_like(out[:, protected:, :protected]))
    assert torch.equal(out.sum(1), torch.ones(2, 21))  # every token lands in exactly one output token


def test_r_is_capped_like_the_reference():
    assert cap_r(16, 21, 1) == 10
    assert cap_r(5, 3, 1) == 1
    assert cap_r(4, 2, 2) == 0
    metric = torch.randn(1, 7, 4)
    assert bipartite_soft_matching(metric, 100, 1)(torch.randn(1, 7, 3)).shape[1] == 4


@pytest.mark.parametrize("protected", [0, 1, 2, 3])
def test_split_alternates_over_absolute_positions(protected):
    x = torch.arange(10).reshape(1, 10, 1)
    p, a, b = split_ab(x, protected)
    assert p[0, :, 0].tolist() == list(range(protected))
    assert all(v % 2 == 0 for v in a[0, :, 0].tolist()) and all(v % 2 == 1 for v in b[0, :, 0].tolist())
    assert sorted(p[0, :, 0].tolist() + a[0, :, 0].tolist() + b[0, :, 0].tolist()) == list(range(10))


def test_gradients_flow_through_both_lowerings():
    for impl in IMPLS:
        x, metric, _ = _random_case(seed=3)
        x.requires_grad_(True)
        out, _ = merge_wavg(bipartite_soft_matching(metric, 5, 1, impl), x, None)
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def _groups(merge, t):
    """For each output token, the input positions it holds (exact: merges of one-hot rows)."""
    source = merge(torch.eye(t)[None])[0]
    assert torch.equal(source.sum(0), torch.ones(t))  # mass conserved: every token lands in exactly one row
    return [torch.nonzero(row).flatten().tolist() for row in source]


def _degenerate_metric(bad_a, bad_b):
    # protected 0; A = 2, 4, 6, 8 (A indices 0-3); B = 1, 3, 5, 7 (B indices 0-3)
    metric = torch.tensor([[0.3, 0.1], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.7, 0.2],
                           [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [0.5, 0.5]])
    metric[4], metric[3], metric[8] = bad_a, bad_b, bad_a  # A1, B1 and A3 have no direction
    return metric[None]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", ["zero", "nan", "inf", "-inf"])
def test_degenerate_keys_score_minus_infinity_and_keep_mass(impl, bad):
    inf, nan = float("inf"), float("nan")
    row = {"zero": [0.0, 0.0], "nan": [nan, 1.0], "inf": [inf, 0.0], "-inf": [1.0, -inf]}[bad]
    metric = _degenerate_metric(torch.tensor(row), torch.tensor(row))
    # A0 best is B2 (score 1); A2 ties B0 and B2 (0.71) -> B0; A1, A3 score -inf everywhere -> B0, ranked last.
    assert _groups(bipartite_soft_matching(metric, 2, 1, impl), 9) == [[0], [4], [8], [1, 6], [3], [2, 5], [7]]
    assert _groups(bipartite_soft_matching(metric, 3, 1, impl), 9) == [[0], [8], [1, 4, 6], [3], [2, 5], [7]]
    assert _groups(bipartite_soft_matching(metric, 4, 1, impl), 9) == [[0], [1, 4, 6, 8], [3], [2, 5], [7]]
    assert destinations(metric, 3, 1).tolist() == [[0, 2, 4, 3, 2, 4, 2, 5, 1]]


@pytest.mark.parametrize("impl", IMPLS)
def test_all_keys_degenerate_merge_the_lowest_a_into_the_first_b(impl):
    metric = torch.zeros(1, 10, 4)
    metric[0, 5] = float("nan")
    assert _groups(bipartite_soft_matching(metric, 3, 1, impl), 10) == [[0], [8], [1, 2, 4, 6], [3], [5], [7], [9]]


def _cases():
    gen = torch.Generator().manual_seed(11)
    for seed in range(40):
        n, t = 2, 5 + seed % 23
        protected = seed % 4
        if seed % 3 == 0:  # heavy ties: one-hot metrics
            metric = F.one_hot(torch.randint(0, 3, (n, t), generator=gen), 4).float()
        else:
            metric = torch.randn(n, t, 6, generator=gen)
        bad = torch.rand(n, t, generator=gen) < 0.2
        metric[bad] = torch.tensor([0.0, float("nan"), float("inf")])[seed % 3]
        yield metric, 1 + seed % 9, protected


def test_destinations_are_what_both_lowerings_do():
    for metric, r, protected in _cases():
        n, t, _ = metric.shape
        want = destinations(metric, r, protected)
        out_rows = t - cap_r(r, t, protected)
        assert want.dtype == torch.int64 and want.shape == (n, t)
        assert want[:, :protected].tolist() == [list(range(protected))] * n
        assert all(sorted(set(row)) == list(range(out_rows)) for row in want.tolist())  # every row is used
        eye = torch.eye(t).expand(n, t, t)
        for impl in IMPLS:
            source = bipartite_soft_matching(metric, r, protected, impl)(eye)
            assert torch.equal(source.sum(1), torch.ones(n, t))
            assert torch.equal(source.argmax(1), want), (impl, r, protected)


def test_destinations_of_nothing_to_merge_are_the_positions():
    assert destinations(torch.randn(2, 5, 3), 0, 1).tolist() == [list(range(5))] * 2
    assert destinations(torch.randn(1, 3, 3), 4, 2).tolist() == [[0, 1, 2]]
