"""Checkpoints that cannot be right are refused before any export, naming the tensor: NaN or infinite values, and
integer, boolean or quantized values where the model holds floats (loading would cast them without a word)."""

import pytest
import timm
import torch

from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.models import create_model

KEY = "blocks.1.attn.qkv.weight"
SMALL = {"depth": 2}  # vit_t16 with 2 blocks: the checks are per tensor, the size does not matter


@pytest.fixture(scope="module")
def state_dict():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL).state_dict()


def _saved(tmp_path, state_dict, key, value):
    path = tmp_path / "ckpt.pth"
    torch.save({**state_dict, key: value}, path)
    return path


@pytest.mark.parametrize("case,value,message", [
    ("all NaN", lambda t: torch.full_like(t, float("nan")), f"{KEY} holds 110,592 NaN or infinite value"),
    ("one infinity", lambda t: t.clone().index_fill_(0, torch.tensor([5]), float("inf")), "NaN or infinite"),
    ("int8", lambda t: (t * 100).to(torch.int8), f"{KEY} holds int8 values where the model has float32 weights"),
    ("bool", lambda t: t > 0, f"{KEY} holds bool values"),
    ("int64", lambda t: t.long(), f"{KEY} holds int64 values"),
])
def test_a_checkpoint_that_cannot_be_right_is_refused_naming_the_tensor(case, value, message, state_dict, tmp_path):
    path = _saved(tmp_path, state_dict, KEY, value(state_dict[KEY]))
    with pytest.raises(UserError, match=message) as err:
        create_model("vit_t16", checkpoint=path, **SMALL)
    assert "\n" not in str(err.value)


def test_the_cli_refuses_it_before_the_export_and_writes_nothing(tmp_path, capsys):
    state_dict = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()  # the CLI's vit_t16
    path = _saved(tmp_path, state_dict, "head.weight", torch.full_like(state_dict["head.weight"], float("nan")))
    code = main(["--model", "vit_t16", "--checkpoint", str(path), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "head.weight holds" in err and "NaN" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_finite_float_checkpoints_still_load(state_dict, tmp_path):
    path = _saved(tmp_path, state_dict, KEY, state_dict[KEY].half())  # another float width is a float: loaded
    model, spec = create_model("vit_t16", checkpoint=path, **SMALL)
    assert spec.weights == "checkpoint" and torch.isfinite(model.blocks[1].attn.qkv.weight).all()
