"""Fine-tuning with ToMe switched on: autograd through the merge, dropout kept, then export."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision

from tome_export import patch
from tome_export.export import export_onnx
from tome_export.merge import bipartite_soft_matching, merge_wavg

from tome_testing.models import make_named, nontrivial

LABELS = torch.tensor([0, 3, 5, 7])


def _finetune(model, x, steps: int, lr: float):
    """Eval loss before and after ``steps`` AdamW steps on one fixed batch; the patch-embedding grad of step 1."""
    def eval_loss():
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(x), LABELS).item()

    before = eval_loss()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    first_grads = None
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), LABELS).backward()
        if first_grads is None:
            first_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return before, eval_loss(), first_grads


@pytest.mark.slow  # trains, then exports
def test_finetune_timm_vit_with_tome_then_export(photo_cache, tmp_path):
    model = make_named("vit_tiny_patch16_224", depth=4, num_classes=10,
                       drop_path_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1)
    patch(model, 12, trainable=True)
    assert model.tome.prop_attn is False  # the reference's setting for training
    x = photo_cache(model, 4)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # dropout and drop-path are live in train mode
    before, after, grads = _finetune(model, x, steps=6, lr=5e-4)
    assert after < 0.5 * before, (before, after)
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight"):
        assert grads[name].abs().sum() > 0, name
    # the fine-tuned model deploys as it is
    model.eval()
    path = export_onnx(model, tmp_path / "finetuned.onnx", (3, 224, 224), batch=4)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() <= 1e-4


def test_finetune_torchvision_vit_with_tome(photo_cache):
    torch.manual_seed(0)
    model = nontrivial(torchvision.models.VisionTransformer(
        image_size=224, patch_size=16, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=10,
        dropout=0.1, attention_dropout=0.1))
    patch(model, 12, trainable=True, prop_attn=True)  # an explicit prop_attn wins
    assert model.tome.prop_attn is True
    x = photo_cache(model, 4)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    before, after, grads = _finetune(model, x, steps=6, lr=5e-4)
    assert after < 0.5 * before, (before, after)
    for name in ("conv_proj.weight", "class_token", "encoder.pos_embedding"):
        assert grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("impl", ["gather", "onehot"])
def test_gradient_of_the_size_weighted_merge_is_exact_and_skips_matching(impl):
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 11, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 11, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    size = 1 + torch.rand(2, 11, 1, dtype=torch.float64, generator=gen)
    merge = bipartite_soft_matching(metric, 4, num_protected=1, impl=impl)
    assert torch.autograd.gradcheck(lambda t: merge_wavg(merge, t, size)[0], (x,))
    merge_wavg(merge, x, size)[0].sum().backward()
    assert metric.grad is None  # which tokens merge is decided without gradients, as in the reference
