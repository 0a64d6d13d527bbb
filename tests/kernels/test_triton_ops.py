"""The fused operators are visible to export and to AOTInductor: ``torch.library.triton_op`` with ``wrap_triton``.

No GPU here: CUDA inputs are fake tensors (shapes and devices, no data). Export must keep the operators as
operators (an exported program names them), and AOT functionalization (what Inductor and AOTInductor compile)
must see the Triton kernels inside them, forward and backward. The ONNX path must keep tracing the portable
lowering; only :func:`fused_merge.in_exports` lets an export trace the operators.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tome_export.kernels import fused_merge
from tome_export.models.base import TokenMerge

pytest.importorskip("triton")
if not hasattr(torch.library, "triton_op"):
    pytest.skip("this torch has no torch.library.triton_op (the operators are opaque custom ops)",
                allow_module_level=True)

from torch._functorch.aot_autograd import aot_export_module  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402


@pytest.fixture(autouse=True)
def quiet_kernel_analysis():
    """Without a GPU driver Triton cannot compile the kernels to find which arguments they write, and torch logs
    a traceback before assuming all of them: true here, and harmless for what is checked."""
    logger = logging.getLogger("torch._higher_order_ops.triton_kernel_wrap")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


class Block(torch.nn.Module):
    def __init__(self, one_kernel: bool) -> None:
        super().__init__()
        self.one_kernel = one_kernel

    def forward(self, x, keys, size):
        return fused_merge.merge_weighted(x, keys, size, 8, 1, self.one_kernel)


def _fake_cuda():
    with FakeTensorMode():
        x = torch.empty(2, 33, 64, device="cuda", dtype=torch.float16)
        keys = torch.empty(2, 4, 33, 16, device="cuda", dtype=torch.float16)
        size = torch.empty(2, 33, 1, device="cuda")
    return x, keys, size


def _kernels(graph: torch.fx.Graph):
    return [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in graph.nodes
            if "triton_kernel_wrapper" in str(n.target)]


@pytest.mark.parametrize("one_kernel, ops, kernels", [
    (False, ["merge_plan", "merge_tokens"], ["_best_b_kernel", "_plan_kernel", "_merge_kernel"]),
    (True, ["merge_block"], ["_block_kernel"]),
])
def test_export_keeps_the_operators_and_compilation_sees_their_kernels(one_kernel, ops, kernels):
    inputs = _fake_cuda()
    exported = torch.export.export(Block(one_kernel), inputs)
    assert [str(n.target) for n in exported.graph.nodes if "tome_export" in str(n.target)] == \
        [f"tome_export.{op}.default" for op in ops]
    graph, _ = aot_export_module(Block(one_kernel), inputs, trace_joint=False)
    assert _kernels(graph.graph) == kernels


@pytest.mark.parametrize("one_kernel", [False, True])
def test_the_backward_is_the_backward_operator_and_compilation_sees_its_kernel(one_kernel):
    """A fake-CUDA backward cannot be traced without a GPU; so: the merge's gradient is computed by the backward
    operator (recorded in an eager CPU backward), and that operator's CUDA implementation is the kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            called.append(str(func))
            return func(*args, **(kwargs or {}))

    called = []
    x = torch.randn(2, 33, 64, requires_grad=True)
    merged = Block(one_kernel).forward(x, torch.randn(2, 4, 33, 16), torch.ones(2, 33, 1))[0]
    with Record():
        merged.sum().backward()
    assert "tome_export.merge_tokens_backward.default" in called

    class Backward(torch.nn.Module):
        def forward(self, grad, size, rows, size_out):
            return (fused_merge.merge_tokens_backward(grad, size, rows, size_out, torch.float16),)

    with FakeTensorMode():
        args = (torch.empty(2, 25, 64, device="cuda", dtype=torch.float16), torch.empty(2, 33, device="cuda"),
                torch.empty(2, 33, device="cuda", dtype=torch.int32), torch.empty(2, 25, device="cuda"))
    graph, _ = aot_export_module(Backward(), args, trace_joint=False)
    assert _kernels(graph.graph) == ["_merge_backward_kernel"]


class Merge(torch.nn.Module):
    """A block's TokenMerge, as a model calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.merge = TokenMerge(8, 1, "gather", prop_attn=True)

    def forward(self, x, keys, size):
        x, size, _, bias = self.merge(x, keys, size, None)
        return x, size, bias.log


def test_exports_trace_the_portable_lowering_unless_told_to_keep_the_kernels():
    inputs = _fake_cuda()
    plain = torch.export.export(Merge(), inputs)
    assert not [n for n in plain.graph.nodes if "tome_export" in str(n.target)]
    assert any("scatter_add" in str(n.target) for n in plain.graph.nodes)
    with fused_merge.in_exports():
        kept = torch.export.export(Merge(), inputs)
    assert [str(n.target) for n in kept.graph.nodes if "tome_export" in str(n.target)] == \
        ["tome_export.merge_plan.default", "tome_export.merge_tokens.default"]
    assert not fused_merge._KERNELS_IN_EXPORTS
