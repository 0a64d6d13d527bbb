"""Requests that cannot fit are refused before the heavy work, with the flag that lifts the refusal."""

import pytest
import yaml

from tome_export.cli import main
from tome_export.info import ModelInfo
from tome_export.resources import MAX_CELLS, check_memory, forward_bytes, physical_memory
from tome_export.errors import UserError

BENCH = {"models": [{"model": "vit_t16", "weights": "random", "kwargs": {"depth": 2}}], "r": [0], "batches": [1],
         "backends": ["torch"], "timing": {"warmup": 0, "rounds": 1, "per_round": 1, "pause_s": 0.0}}
VIT_T16 = ModelInfo("timm-vit", 12, 196, 1, 192, 3, 192, 768, (16, 16), 3, 1000)


def _refused(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "--allow-large" in err, err


def test_an_image_size_that_cannot_fit_is_refused_before_the_export(tmp_path, capsys):
    _refused(capsys, ["--model", "vit_t16", "--weights", "random", "--img-size", "4096", "-o", str(tmp_path / "o"),
                      "-q"], "GB of memory (65537 tokens")
    assert list(tmp_path.iterdir()) == []


def test_the_estimate_is_small_for_ordinary_builds_and_the_flag_lifts_the_refusal():
    assert forward_bytes(VIT_T16, 8) < 1e9 < forward_bytes(VIT_T16, 100_000)
    check_memory(VIT_T16, 8, "a build")
    if physical_memory() is not None and forward_bytes(VIT_T16, 100_000) > physical_memory() / 2:
        with pytest.raises(UserError):
            check_memory(VIT_T16, 100_000, "a build")
    check_memory(VIT_T16, 100_000, "a build", allow=True)


@pytest.mark.parametrize("edit,message", [
    ({"batches": [100_000]}, "at batch 100000 needs about"),
    ({"r": list(range(16)), "batches": list(range(1, 41)), "threads": [1, 2, 3, 4]}, "2,560 cells"),
])
def test_bench_refuses_huge_matrices_and_batches_before_writing(tmp_path, capsys, edit, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**BENCH, **edit}))
    assert MAX_CELLS < 2560
    _refused(capsys, ["bench", "--config", str(config), "--out", str(tmp_path / "out"), "-q"], message)
    assert not (tmp_path / "out").exists()
