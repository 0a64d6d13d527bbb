"""Visualisation: source map -> label map -> picture, from PyTorch and from an exported --trace-source graph."""

import numpy as np
import pytest
from PIL import Image

from tome_export import patch
from tome_export.cli import main
from tome_export.images import sample_photo_paths, sample_photos
from tome_export.models import create_model, model_info
from tome_export.schedule import resolve_schedule
from tome_export.visualize import (
    artifact_merge_state, border_mask, model_merge_states, palette, picture, pixel_labels, render, source_labels,
)

from tome_testing.models import make_model


def _colours(img: np.ndarray) -> set:
    return {tuple(c) for c in np.asarray(img).reshape(-1, 3).tolist()}


@pytest.mark.parametrize("kind,r", [("vit", 16), ("registers", 8), ("avgpool", (12, -1.0))])
def test_one_colour_group_per_final_token(kind, r):
    model = patch(make_model(kind), r)
    info = model_info(model)
    final = resolve_schedule(r, info.num_blocks, info.num_tokens, info.num_protected).tokens[-1]
    image, p, (state,) = model_merge_states(model, sample_photos(1)[0])
    groups = final - info.num_protected
    assert state.num_tokens == final and state.num_groups == groups
    assert state.labels.shape == (14, 14) and len(np.unique(state.labels)) == groups
    # The rendered picture: palette fill shows exactly one colour per group, plus the black outlines.
    flat = render(image, state.labels, p, fill="palette", scale=1)
    assert flat.shape == (224, 224, 3) and len(_colours(flat)) == groups + 1
    # Mean fill: every group's outline is in its own palette colour, its inside in the group's mean colour.
    shown = render(image, state.labels, p, fill="mean", scale=2)
    pix = pixel_labels(state.labels, (224, 224), p, scale=2)
    edges = border_mask(pix, 2)
    assert _colours(shown[edges]) == _colours(palette(groups))
    for g in range(groups):
        inside = (pix == g) & ~edges
        want = np.rint(image[pixel_labels(state.labels, (224, 224), p) == g].mean(axis=0))
        assert inside.any() and (shown[inside] == want).all()


def test_states_after_chosen_blocks_follow_the_schedule():
    model = patch(make_model("distilled"), 16)
    info = model_info(model)
    tokens = resolve_schedule(16, info.num_blocks, info.num_tokens, info.num_protected).tokens
    _, _, states = model_merge_states(model, sample_photos(2)[1], blocks=[0, 1, 6, 12])
    assert [s.num_tokens for s in states] == [info.num_tokens, tokens[0], tokens[5], tokens[11]]
    assert [len(np.unique(s.labels)) for s in states] == [s.num_tokens - 2 for s in states]
    assert (states[0].labels.flatten() == np.arange(196)).all()  # before any block every patch is alone
    # Merges only ever join groups: patches together after block 1 stay together after block 6.
    after1, after6 = states[1].labels.flatten(), states[2].labels.flatten()
    for g in np.unique(after1):
        assert len(np.unique(after6[after1 == g])) == 1


def test_visualizing_leaves_the_model_as_it_was():
    import torch

    model = patch(make_model("vit"), 8)
    x = torch.from_numpy(np.stack([np.zeros((3, 224, 224), np.float32)]))
    with torch.no_grad():
        before = model(x)
        model_merge_states(model, sample_photos(1)[0], blocks=[2])
        assert torch.equal(model(x), before) and model.tome.r == (8,) * 12


def test_source_labels_rejects_maps_that_are_not_tome():
    ok = np.zeros((3, 5))
    ok[0, 0] = ok[1, 1] = ok[1, 3] = ok[2, 2] = ok[2, 4] = 1
    assert source_labels(ok, 1, (2, 2)).tolist() == [[0, 1], [0, 1]]
    both = ok.copy()
    both[2, 3] = 1
    with pytest.raises(ValueError, match="several"):
        source_labels(both, 1, (2, 2))
    merged_cls = ok.copy()
    merged_cls[1, 0] = 1
    with pytest.raises(ValueError, match="protected"):
        source_labels(merged_cls, 1, (2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        source_labels(ok, 1, (3, 3))


def test_deployed_graph_merges_what_pytorch_merges(traced_artifact):
    directory, _ = traced_artifact
    model, _ = create_model("digits_vit", weights="random", seed=0)  # the traced build: patch 4 at 32 px, r=16
    patch(model, 16)
    for path in sample_photo_paths()[:3]:
        img_t, p_t, (torch_state,) = model_merge_states(model, path)
        img_a, p_a, art_state = artifact_merge_state(directory, path)
        assert p_t == p_a == (4, 4) and np.array_equal(img_t, img_a)
        assert art_state.num_tokens == torch_state.num_tokens == 9
        assert np.array_equal(art_state.labels, torch_state.labels)
        assert np.array_equal(np.asarray(picture(img_a, p_a, [art_state])), np.asarray(picture(img_t, p_t, [torch_state])))


def test_cli_visualize_model_and_artifact_agree(traced_artifact, tmp_path, capsys):
    directory, _ = traced_artifact
    common = ["--scale", "1", "--fill", "palette"]
    assert main(["visualize", "chelsea", "--model", "digits_vit", "--r", "16", "--weights", "random", "--blocks", "4",
                 "--bare", "-o", str(tmp_path / "torch.png"), *common]) == 0
    assert main(["visualize", "chelsea", "--artifact", str(directory), "--bare", "-o", str(tmp_path / "graph.png"),
                 *common]) == 0
    out = capsys.readouterr().out
    assert "8 groups" in out and out.count("wrote") == 2  # 9 tokens left, the class token apart
    torch_png, graph_png = (np.asarray(Image.open(tmp_path / n)) for n in ("torch.png", "graph.png"))
    assert torch_png.shape == (32, 32, 3) and np.array_equal(torch_png, graph_png)
    assert len(_colours(torch_png)) == 8 + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.png", "torch.png"]  # no temporary files left


def test_cli_visualize_blocks_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["visualize", str(sample_photo_paths()[2]), "--model", "vit_t16", "--r", "8", "--weights", "random",
                 "--blocks", "1,6,12", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "after block 1: 189 tokens, 188 groups" in text and "after block 12: 101 tokens, 100 groups" in text
    sheet = Image.open(out)
    assert sheet.width > 4 * 448 and sheet.height > 448  # input + 3 panels side by side, titles below
