"""The first hour with the tool: r beyond what any block can merge, the cap warning kept for real surprises,
suggestions that build, guessed preprocessing said and recorded, pictures that explain themselves, progress
lines with counts, and a tune that says it trains first and keeps its epochs across an interrupt."""

import pytest
import torch
from PIL import Image

from tome_export.bench.digits import train_digits_vit
from tome_export.cli import main
from tome_export.cli.common import Progress
from tome_export.errors import UserError
from tome_export.models import create_model, resolve, suggestions
from tome_export.pipeline import BuildRequest, prepare, prepare_model


def _warnings_of(r):
    said = []
    prepare_model(prepare(BuildRequest(model="vit_t16", r=r, weights="random", output=None)), warn=said.append)
    return said


def test_r_beyond_what_any_block_merges_is_refused_with_the_largest_useful_value(tmp_path, capsys):
    args = ["--model", "vit_t16", "--r", "1000", "--weights", "random", "-o", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--r 1000 is more than any block of vit_t16 can merge" in err
    assert "197 tokens (1 protected)" in err and "use --r 98 or less" in err
    assert not any(tmp_path.iterdir())
    (said,) = _warnings_of(98)  # the largest useful value is accepted; the later blocks' caps are said
    assert "block 1 98->49" in said


def test_the_cap_warns_only_when_it_trims_more_than_the_last_block():
    assert _warnings_of(16) == []  # r=16 on 197 tokens trims the last block only, as the ToMe reference does
    (said,) = _warnings_of(20)
    assert said.startswith("r capped where too few tokens are left to merge (block 8 20->18")


def test_suggestions_are_close_and_only_name_models_that_build():
    with pytest.raises(UserError, match=r"Did you mean vit_b16, vit_b_16, vit_t16\?") as err:
        resolve("vit_b61")
    assert "\n" not in str(err.value)
    near_levit = suggestions("levit_128s")
    assert not any(name.startswith(("levit", "mobilevit", "efficientvit", "fastvit")) for name in near_levit)
    for name in suggestions("vit_base_patch16_18x2_225") + near_levit:  # parallel-block variants are refused
        with torch.device("meta"):
            model, _ = create_model(name, weights="random")
        from tome_export.models import FAMILIES

        assert FAMILIES[resolve(name).family].unsupported_reason(model) is None, name


def test_guessed_preprocessing_is_said_and_recorded(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(str(tmp_path / "vit"))  # no processor saved
    said = []
    request = BuildRequest(model=str(tmp_path / "vit"), r=2, weights="pretrained", output=tmp_path / "o")
    prepared = prepare_model(prepare(request), warn=said.append)
    guessed = prepared.model.tome_source["preprocessing_guessed"]
    assert said == [f"preprocessing guessed: {guessed}"] and "has no preprocessor_config.json" in guessed
    assert "ViTImageProcessor defaults" in guessed
    assert prepared.spec.manifest_entry("transformers-vit")["preprocessing_guessed"] == guessed


def test_visualize_shows_the_input_and_captioned_blocks_by_default(tmp_path, capsys):
    out = tmp_path / "v.png"
    assert main(["visualize", "chelsea", "--model", "digits_vit", "--r", "8", "--weights", "random", "--scale", "1",
                 "-o", str(out)]) == 0  # 4 blocks at 32 px: every block is a quarter of the depth
    text = capsys.readouterr().out
    assert [part.split(":")[0] for part in text.split(": ", 1)[1].split("; ")] == [
        "after block 1", "after block 2", "after block 3", "after block 4"]
    sheet = Image.open(out)
    assert sheet.width > 5 * 32 and sheet.height > 32  # the input and four panels, captions below
    assert main(["visualize", "chelsea", "--model", "digits_vit", "--weights", "random", "--bare", "-o",
                 str(tmp_path / "b.png")]) == 2
    assert "--bare pictures one merge state; 4 were asked" in capsys.readouterr().err


def test_progress_lines_count_the_steps_and_time_each(capsys):
    progress = Progress(3, quiet=False)  # stderr is not a terminal here: one line per finished step
    progress("loading model")
    progress.sub("a part of it")
    progress("exporting")
    progress.done()
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": done in ")[0] for line in lines] == [
        "tome-export: [1/3] loading model", "tome-export: [1/3] loading model: a part of it",
        "tome-export: [2/3] exporting"]
    assert all(line.endswith(" s") for line in lines)


TINY_DIGITS = {"depth": 1, "embed_dim": 24, "num_heads": 2}


@pytest.mark.slow  # trains (two epochs, then one and one more after the interrupt)
def test_training_says_so_first_and_continues_after_an_interrupt(tmp_path):
    said = []
    whole, _ = train_digits_vit(epochs=2, cache=tmp_path / "whole", log=said.append, **TINY_DIGITS)
    assert said[0].startswith("training the digits ViT before anything else: 2 epochs")
    assert "not in the cache yet" in said[0] and said[-1].startswith("trained in ")

    def stop_after_one(message):  # said once the epoch is kept
        if message.startswith("digits ViT epoch 1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_digits_vit(epochs=2, cache=tmp_path / "cut", log=stop_after_one, **TINY_DIGITS)
    resumed_log = []
    resumed, metrics = train_digits_vit(epochs=2, cache=tmp_path / "cut", log=resumed_log.append, **TINY_DIGITS)
    assert "continuing after epoch 1" in resumed_log[0]
    assert [m.split(":")[0] for m in resumed_log[1:-1]] == ["digits ViT epoch 2/2"]
    a, b = torch.load(whole, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights as uninterrupted
    again = []
    train_digits_vit(epochs=2, cache=tmp_path / "cut", log=again.append, **TINY_DIGITS)
    assert len(again) == 1 and again[0].startswith("digits ViT: trained earlier, in ")
    assert again[0].endswith(f" s on this machine ({resumed})")
