"""Following patches through merges: a merge function's rows are the canonical destinations, and TokenOwners composed
over the blocks say which final token holds each patch, as the source map does."""

from __future__ import annotations

import pytest
import torch

from tome_export.merge import TokenOwners, bipartite_soft_matching, destinations, merge_wavg


@pytest.mark.parametrize("impl", ["gather", "onehot"])
@pytest.mark.parametrize("protected", [0, 1, 2, 5])
@pytest.mark.parametrize("r", [1, 4, 9])
def test_rows_are_the_destinations_of_the_same_matching(impl, protected, r):
    gen = torch.Generator().manual_seed(protected * 10 + r)
    metric = torch.randn(3, 21, 8, generator=gen)
    metric[:, 6] = metric[:, 9]  # equal keys: ties in the scores
    metric[1, 4] = 0  # a key without direction
    merge = bipartite_soft_matching(metric, r, protected, impl)
    want = destinations(metric, r, protected)
    assert torch.equal(merge.rows(), want)
    assert torch.equal(merge(TokenOwners.start(3, 21, metric.device)).index, want)


@pytest.mark.parametrize("impl", ["gather", "onehot"])
def test_owners_over_blocks_agree_with_the_source_map(impl):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 16, generator=gen)
    source = torch.eye(33)[None].expand(2, -1, -1)
    owners = TokenOwners.start(2, 33, x.device)
    size = None
    for r in (8, 6, 4, 3):
        merge = bipartite_soft_matching(x + 0.1 * torch.randn(x.shape, generator=gen), r, 1, impl)
        x, size = merge_wavg(merge, x, size)
        source, owners = merge(source), merge(owners)
    assert owners.index.shape == (2, 33) and int(owners.index.max()) < x.shape[1]
    assert torch.equal(owners.index, source.argmax(dim=1))
    assert torch.equal(torch.stack([torch.bincount(o, minlength=x.shape[1]) for o in owners.index]),
                       size[..., 0].round().long())


def test_an_unmerging_block_leaves_owners_where_they_are():
    metric = torch.randn(1, 5, 4)
    merge = bipartite_soft_matching(metric, 0, 1)
    owners = TokenOwners.start(1, 5, metric.device)
    assert merge(owners) is owners
