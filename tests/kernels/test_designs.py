"""The design table: which fused-path design a GPU runs at a batch size, as measured data with a default."""

from __future__ import annotations

import json

import pytest
import torch

from tome_export.kernels import designs
from tome_export.kernels.designs import DEFAULT, Design

H200 = "NVIDIA H200"


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "gpu_designs.json"
    path.write_text(json.dumps({"devices": {"Other GPU": [{"min_batch": 1, "attention": ["flex"], "merge": "one"}]}}))
    designs.write_measured(H200, [(8, Design(("padded", "mask"), "three")), (1, Design(("cudnn", "mask"), "one"))],
                           {"results": "benchmarks/results/gpu_speedup.json"}, path)
    return path


def test_the_packaged_table_reads():
    table = designs.read_table()
    assert all(isinstance(entries, tuple) for entries in table.values())


def test_a_gpu_takes_the_entry_of_the_largest_measured_batch_not_above_its_own(table):
    read = designs.read_table(table)
    assert designs.design_for(H200, 1, read) == Design(("cudnn", "mask"), "one")
    assert designs.design_for(H200, 7, read) == Design(("cudnn", "mask"), "one")
    assert designs.design_for(H200, 8, read) == Design(("padded", "mask"), "three")
    assert designs.design_for(H200, 4096, read) == Design(("padded", "mask"), "three")


def test_below_the_smallest_measured_batch_and_on_unmeasured_gpus_the_default_runs(table):
    read = designs.read_table(table)
    assert designs.design_for("NVIDIA H100 80GB HBM3", 64, read) == DEFAULT
    tail = {H200: read[H200][1:]}  # only the batch-8 entry
    assert designs.design_for(H200, 4, tail) == DEFAULT
    assert DEFAULT == Design(("mask",), "three")


def test_writing_a_gpu_keeps_the_other_gpus_and_records_the_measurement(table):
    raw = json.loads(table.read_text())
    assert set(raw["devices"]) == {"Other GPU", H200}
    assert [e["min_batch"] for e in raw["devices"][H200]] == [1, 8]
    assert raw["devices"][H200][0]["measured"] == {"results": "benchmarks/results/gpu_speedup.json"}


def test_unknown_designs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown design"):
        Design(("channel",), "three").check()
    with pytest.raises(ValueError, match="unknown design"):
        designs.write_measured(H200, [(1, Design(("mask",), "two"))], {}, tmp_path / "t.json")


def test_the_cpu_runs_the_default_unless_forced_and_exports_always_do():
    x = torch.zeros(4, 3)
    assert designs.design(x) == DEFAULT
    chosen = Design(("padded", "cudnn"), "one")
    with designs.forced(chosen):
        assert designs.design(x) == chosen
        exported = torch.export.export(_DesignProbe(), (x,))
    assert designs.design(x) == DEFAULT
    assert exported.module()(x).tolist() == [0.0] * 3  # the default (mask) was traced, not the forced padded heads


class _DesignProbe(torch.nn.Module):
    def forward(self, x):
        return x[0] + (1.0 if designs.design(x).attention[0] == "padded" else 0.0)


def test_a_family_without_padded_heads_takes_the_next_formulation():
    assert Design(("padded", "cudnn", "mask"), "three").attention_without("padded") == "cudnn"
    assert Design(("padded",), "three").attention_without("padded") == "mask"


def test_the_choice_compiles_without_a_graph_break():
    chosen = Design(("cudnn", "mask"), "one")

    def f(x):
        return x * (2.0 if designs.design(x).merge == "one" else 3.0)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with designs.forced(chosen):
        assert compiled(torch.ones(2)).tolist() == [2.0, 2.0]
