"""timm ViT patching: r=0 identity, parity with the slow reference, sources, weights, unsupported models."""

import copy

import pytest
import timm
import torch

import tome_export
from tome_export.errors import UserError
from tome_export.models import create_model, model_info, patch
from tome_export.schedule import resolve_schedule

from tome_testing.models import TEST_MODELS, make_model
from tome_testing.reference_tome import reference_forward

KINDS = list(TEST_MODELS)


@pytest.mark.parametrize("kind", KINDS)
def test_r0_patched_equals_unpatched(kind, photo_cache):
    model = make_model(kind)
    x = photo_cache(model, 2)
    with torch.no_grad():
        want = model(x)
        got = patch(copy.deepcopy(model), 0)(x)
    assert (got - want).abs().max().item() <= 1e-5


SCHEDULES = {"constant": 8, "inflect": (8, -1.0), "list": "list"}


def _schedule(name, model):
    if SCHEDULES[name] == "list":
        depth = len(model.blocks)
        return [(3 * i) % 13 for i in range(depth)]  # irregular, includes 0 and more than the cap allows late
    return SCHEDULES[name]


# gather: every kind x schedule; onehot: every kind with the list schedule, all schedules on two kinds
REFERENCE_CASES = [(k, s, "gather") for k in KINDS for s in SCHEDULES] + [
    (k, s, "onehot") for k in KINDS for s in SCHEDULES if s == "list" or k in ("vit", "registers")
]
# The quick selection keeps every kind under both lowerings (constant r for gather, the list for onehot).
REFERENCE_CASES = [case if case[1:] in (("constant", "gather"), ("list", "onehot"))
                   else pytest.param(*case, marks=pytest.mark.slow) for case in REFERENCE_CASES]


@pytest.mark.parametrize("kind,schedule,impl", REFERENCE_CASES)
def test_patched_matches_slow_reference(kind, schedule, impl, photo_cache):
    model = make_model(kind)
    r = _schedule(schedule, model)
    info = model_info(model)
    sched = resolve_schedule(r, info.num_blocks, info.num_tokens, info.num_protected)
    x = photo_cache(model, 2)
    want, _ = reference_forward(model, x, list(sched.requested))
    with torch.no_grad():
        got = patch(copy.deepcopy(model), r, merge_impl=impl)(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["vit", "distilled", "registers", "avgpool"])
def test_sources_match_reference_and_protected_tokens_stay_alone(kind, photo_cache):
    model = make_model(kind)
    x = photo_cache(model, 2)
    _, ref_groups = reference_forward(model, x, [12] * len(model.blocks))
    patched = patch(copy.deepcopy(model), 12)
    with torch.no_grad():
        _, source = patched.forward_with_source(x)
    protected = model.num_prefix_tokens
    for i in range(len(x)):
        groups = [torch.nonzero(row).flatten().tolist() for row in source[i]]
        assert groups == ref_groups[i]
        for p in range(protected):
            assert groups[p] == [p]  # a protected token holds only itself...
        assert source[i, protected:, :protected].sum() == 0  # ...and no other token holds it
    info = model_info(model)
    assert source.shape[1] == resolve_schedule(12, info.num_blocks, info.num_tokens, protected).tokens[-1]


def test_merged_token_counts_per_block(photo_cache):
    model = patch(make_model("vit"), 16)
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(o.shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(photo_cache(model, 1))
    for h in hooks:
        h.remove()
    assert seen == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]


def test_patch_keeps_state_dict_and_has_no_shared_mutable_state(photo_cache):
    model = make_model("vit")
    keys = list(model.state_dict())
    patched = patch(copy.deepcopy(model), 8)
    assert list(patched.state_dict()) == keys
    with pytest.raises(Exception):
        patched.tome.r = (1,)  # frozen
    x = photo_cache(model, 1)
    with torch.no_grad():
        first, second = patched(x), patched(x)
    assert torch.equal(first, second)
    for _ in range(2):  # the reference's shared dict breaks on the second torch.export
        torch.export.export(patched, (x,))
    patch(patched, 0)  # re-configuring works in place
    with torch.no_grad():
        assert (patched(x) - model(x)).abs().max() <= 1e-5


def test_patched_model_trains(photo_cache):
    model = patch(make_model("layerscale"), 8).train()
    x = photo_cache(model, 2)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,why", [
    ("eva02_tiny_patch14_224", "rotary"),
    ("beit_base_patch16_224", "relative position"),
    ("resnet18", "not a timm VisionTransformer"),
])
def test_unsupported_architectures_get_a_clear_error(name, why):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with pytest.raises(UserError, match=why) as err:
        patch(model, 8)
    assert "Supported:" in str(err.value)


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'vit_b17'.*Did you mean"):
        create_model("vit_b17", weights="random")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_roundtrip(tmp_path, suffix, photo_cache):
    model = make_model("vit")
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pth":
        torch.save({"model": model.state_dict()}, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, spec = create_model("vit_t16", checkpoint=path)
    x = photo_cache(model, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert spec.weights == "checkpoint"


def test_checkpoint_with_ema_weights_loads_them_as_timm_does(tmp_path, photo_cache):
    """A training checkpoint with both weights: the EMA ones, as timm's own evaluation reads it; ``module.``
    prefixes (DDP) removed."""
    trained, ema = make_model("vit"), make_model("vit")
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    path = tmp_path / "train.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()},
                "state_dict_ema": ema.state_dict()}, path)
    loaded, _ = create_model("vit_t16", checkpoint=path)
    x = photo_cache(ema, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), ema(x)) and not torch.equal(loaded(x), trained(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        create_model("vit_t16", checkpoint=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        create_model("vit_t16", checkpoint=junk)
    other = tmp_path / "small.pth"
    torch.save(make_model("layerscale").state_dict(), other)
    with pytest.raises(UserError, match="does not match vit_t16"):
        create_model("vit_t16", checkpoint=other)


def test_pretrained_offline_fails_loudly(tmp_path, monkeypatch):
    from tome_export.models import timm_vit

    monkeypatch.setattr(timm_vit, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="--weights random"):
        create_model("vit_t16", weights="pretrained")


def test_public_api():
    assert callable(tome_export.patch) and callable(tome_export.export_onnx)
