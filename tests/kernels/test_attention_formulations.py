"""Every formulation of proportional attention computes the additive-mask attention, on the CPU.

cuDNN's kernel needs CUDA: on the CPU its formulation runs the same call with SDPA's fallback, so what is tested
here is its plumbing. FlexAttention runs its eager implementation on the CPU; padded heads are plain PyTorch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tome_testing.models import make_model, nontrivial
from tome_export import patch
from tome_export.kernels import attention as formulations
from tome_export.kernels import designs
from tome_export.kernels.designs import Design

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _reference(q, k, v, log_size):
    scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5 + log_size.double()
    return torch.softmax(scores, dim=-1) @ v.double()


def _inputs(dtype, heads=3, tokens=37, d=64):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, tokens, d, generator=gen).to(dtype) for _ in range(3))
    log_size = torch.randint(1, 200, (2, 1, 1, tokens), generator=gen).float().log()
    return q, k, v, log_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["cudnn", "flex"])
def test_formulations_are_as_exact_as_the_mask(name, dtype):
    q, k, v, log_size = _inputs(dtype)
    want = _reference(q, k, v, log_size)
    masked = formulations.mask_attention(q, k, v, log_size)
    got = formulations.FORMULATIONS[name](q, k, v, log_size)
    assert got.shape == want.shape and got.dtype == dtype
    assert (got.double() - want).abs().max() <= 1.5 * (masked.double() - want).abs().max() + 1e-6


def _projections(heads, d, dim, qkv_bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(3 * heads * d, dim, generator=gen) / dim ** 0.5
    bias = torch.randn(3 * heads * d, generator=gen) if qkv_bias else None
    proj = torch.randn(dim, heads * d, generator=gen) / (heads * d) ** 0.5
    return qkv, bias, proj, torch.randn(dim, generator=gen)


def _unpadded(x, qkv, bias, proj, proj_bias, heads, log_size, norms=(None, None)):
    b, n, _ = x.shape
    q, k, v = F.linear(x, qkv, bias).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = (t if norm is None else norm(t) for t, norm in zip((q, k), norms))
    out = formulations.mask_attention(q, k, v, log_size)
    return F.linear(out.transpose(1, 2).reshape(b, n, -1), proj, proj_bias), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("channels_from", ["plan", "log"])
def test_padded_heads_compute_the_masked_attention(dtype, qkv_bias, channels_from):
    heads, d, dim, tokens = 3, 16, 40, 23
    qkv, bias, proj, proj_bias = (t if t is None else t.to(dtype) for t in _projections(heads, d, dim, qkv_bias))
    x = torch.randn(2, tokens, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    size = torch.randint(1, 60, (2, tokens), generator=torch.Generator().manual_seed(2)).float()
    log_size = size.log()[:, None, None, :]
    channels = formulations.split_log_size(size.log(), d, dtype) if channels_from == "plan" else None
    want, want_k = _unpadded(x.double(), qkv.double(), None if bias is None else bias.double(), proj.double(),
                             proj_bias.double(), heads, log_size.double())
    masked, _ = _unpadded(x, qkv, bias, proj, proj_bias, heads, log_size.to(dtype))
    got, keys = formulations.padded_heads_attention(x, (qkv, bias), (proj, proj_bias), heads, log_size.to(dtype),
                                                    channels)
    assert got.shape == want.shape and got.dtype == dtype and keys.shape == (2, heads, tokens, d)
    assert (got.double() - want).abs().max() <= 1.5 * (masked.double() - want).abs().max() + 1e-6
    assert (keys.double() - want_k).abs().max() <= (1e-6 if dtype == torch.float32 else 0.02)


@pytest.mark.parametrize("grad", [False, True])
def test_qk_norm_normalises_only_the_real_channels(grad):
    heads, d, dim = 2, 16, 32
    qkv, bias, proj, proj_bias = _projections(heads, d, dim)
    norms = (torch.nn.LayerNorm(d), torch.nn.LayerNorm(d))
    with torch.no_grad():
        for i, norm in enumerate(norms):
            norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(i)))
    x = torch.randn(2, 11, dim, requires_grad=grad)
    log_size = torch.randint(1, 9, (2, 1, 1, 11)).float().log()
    with torch.set_grad_enabled(grad):
        want, want_k = _unpadded(x, qkv, bias, proj, proj_bias, heads, log_size, norms)
        got, keys = formulations.padded_heads_attention(x, (qkv, bias), (proj, proj_bias), heads, log_size, None,
                                                        norms)
    assert (got - want).abs().max() <= 1e-5 and (keys - want_k).abs().max() <= 1e-6


def test_padded_weights_are_built_once_per_weight_version():
    qkv, bias, proj, _ = _projections(2, 16, 32)
    first = formulations.cached_padded_weights(qkv, bias, proj, 2)
    assert all(a is b for a, b in zip(first, formulations.cached_padded_weights(qkv, bias, proj, 2)))
    with torch.no_grad():
        qkv.mul_(2.0)  # an in-place update: a new version of the same storage
    again = formulations.cached_padded_weights(qkv, bias, proj, 2)
    assert again[0] is not first[0] and torch.equal(again[0].view(3, 2, 24, 32)[:, :, :16], qkv.view(3, 2, 16, 32))


def test_padded_heads_train_the_original_weights():
    heads, d, dim = 2, 16, 32
    weights = [t.requires_grad_() for t in _projections(heads, d, dim)]
    x = torch.randn(2, 9, dim)
    log_size = torch.randint(1, 9, (2, 1, 1, 9)).float().log()
    grads = []
    for padded in (True, False):
        qkv, bias, proj, proj_bias = weights
        if padded:
            out, _ = formulations.padded_heads_attention(x, (qkv, bias), (proj, proj_bias), heads, log_size, None)
        else:
            out, _ = _unpadded(x, qkv, bias, proj, proj_bias, heads, log_size)
        grads.append(torch.autograd.grad(out.square().sum(), weights))
    for got, want in zip(*grads):
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


DESIGNS = [Design(("padded", "mask"), "three"), Design(("cudnn",), "one"), Design(("flex",), "three")]


@pytest.mark.parametrize("kind", ["qknorm", "registers"])
def test_timm_models_compute_the_same_logits_in_every_design(kind):
    model = patch(make_model(kind, depth=3, img_size=64), r=6)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        for chosen in DESIGNS:
            with designs.forced(chosen):
                got = model(x)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), chosen


def test_torchvision_and_transformers_models_compute_the_same_logits_in_every_design():
    from tome_testing.hf_models import make_hf

    import torchvision

    torch.manual_seed(0)
    tv = nontrivial(torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=2,
                                                         hidden_dim=32, mlp_dim=64, num_classes=10))
    # transformers' SigLIP: no padded heads (it takes the next formulation) and an attention-pool head
    models = [patch(tv, r=4), patch(make_hf("SiglipVisionModel"), r=4)]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for model in models:
        with torch.no_grad():
            want = model(x)
            for chosen in DESIGNS:
                with designs.forced(chosen):
                    got = model(x)
                assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (type(model).__name__, chosen)


def test_training_gradients_are_the_same_with_padded_heads():
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for chosen in (None, DESIGNS[0]):
        model = patch(make_model("qknorm", depth=2, img_size=64), r=6, trainable=True, prop_attn=True).train()
        with warnings.catch_warnings(), designs.forced(chosen or designs.DEFAULT):
            model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * max(1.0, grads[1].abs().max().item())


@pytest.mark.slow  # a compilation (~10-20 s)
def test_padded_heads_compile_as_one_graph():
    model = patch(make_model("qknorm", depth=2, img_size=64), r=6)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        with designs.forced(DESIGNS[0]):
            got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
