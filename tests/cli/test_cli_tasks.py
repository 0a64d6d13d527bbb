"""The encoder tasks through the command line: a transformers CLIP vision tower saved to a directory builds LLaVA-style
tokens from its second-to-last layer for ONNX Runtime and OpenVINO int8 (token count in the manifest, validated against
PyTorch ToMe), a timm ViT builds dense features on the full grid, and bad task flags are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tome_export.cli import main
from tome_export.images import sample_photos
from tome_export.manifest import load_manifest
from tome_export.models import create_model, patch, set_task
from tome_export.runtime import load

from tome_testing.hf_models import make_hf, save_model_dir

pytestmark = pytest.mark.slow

R = 12  # per layer: the tiny tower's 64 patches -> 52 -> 40 after two layers


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_model_dir(make_hf("CLIPVisionModel"), tmp_path_factory.mktemp("hf") / "clip-tower",
                          "CLIPImageProcessor", size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})


@pytest.mark.parametrize("target,precision", [("onnxruntime", "int8"), ("openvino", "int8")])
def test_a_clip_tower_builds_llava_style_tokens(clip_dir, tmp_path, capsys, target, precision):
    out = tmp_path / f"{target}-{precision}"
    code = main(["--model", str(clip_dir), "--r", str(R), "--task", "tokens", "--layer", "-2", "--target", target,
                 "--precision", precision, "-o", str(out), "-q"])
    printed = capsys.readouterr().out
    assert code == 0 and "tokens out 40 of 64 patches" in printed, printed
    manifest = load_manifest(out)
    assert manifest.task.blocks_run == 2 and manifest.task.final_norm is False and not manifest.task.keep_prefix
    assert manifest.output_shapes == {"tokens": (1, 40, 64), "token_sizes": (1, 40), "token_owners": (1, 64)}
    v = manifest.validation
    assert v["passed"] and v["tokens"] == 40 and v["patches"] == 64 and v["min_cosine"] >= 0.99
    model, _ = create_model(str(clip_dir))
    patch(model, R)
    set_task(model, "tokens", layer=-2)
    with load(out) as runner:
        x = runner.preprocess_batch(sample_photos(1))
        tokens, sizes, owners = (runner.infer(x)[n] for n in manifest.outputs)
    assert sizes.sum() == 64 and np.array_equal(np.bincount(owners[0], minlength=40), sizes[0])
    with torch.no_grad():
        want = model(torch.from_numpy(x))
    assert tokens.shape == tuple(want[0].shape)
    if np.array_equal(sizes, want[1].numpy()):  # the same merges: the same tokens, to int8's accuracy
        cosine = (tokens * want[0].numpy()).sum(-1) / np.linalg.norm(tokens, axis=-1) / want[0].norm(dim=-1).numpy()
        assert cosine.min() > 0.95


def test_dense_features_on_the_full_grid_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(["--model", "digits_vit", "--r", "8", "--task", "dense", "--target", "onnx", "--weights", "random",
                 "--json", "-o", str(out)]) == 0  # patch 4 at 32 px: an 8 x 8 grid of 192-wide features
    report = json.loads(capsys.readouterr().out)
    assert report["manifest"]["output_shapes"] == {"features": [1, 64, 192]}
    with load(out) as runner:
        features = runner(runner.preprocess_batch(sample_photos(1)))
    assert features.shape == (1, 64, 192)


@pytest.mark.parametrize("args,message", [
    (["--task", "embed", "--layer", "-2"], "--layer -2 applies to --task dense or tokens"),
    (["--task", "dense", "--normalize"], "--normalize applies to --task embed"),
    (["--task", "tokens", "--layer", "-40"], "outside this model's 12 blocks"),
])
def test_task_flags_that_do_not_apply_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(["--model", "vit_t16", "--weights", "random", "-o", str(tmp_path / "x"), "-q", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()
