"""bench checks every value before it writes anything: ranges in the schema, model names and their kwargs."""

import pytest
import yaml

from tome_export.bench.config import parse_config
from tome_export.cli import main
from tome_export.errors import UserError

BASE = {"models": [{"model": "vit_t16", "weights": "random", "kwargs": {"depth": 2}}], "r": [0], "batches": [1],
        "backends": ["torch"], "timing": {"warmup": 0, "rounds": 1, "per_round": 1, "pause_s": 0.0}}


@pytest.mark.parametrize("edit,message", [
    ({"timing": {"pause_s": -1}}, "pause_s = -1.0: expected a finite number >= 0"),
    ({"timing": {"pause_s": float("nan")}}, "pause_s = nan"),
    ({"models": [{"model": "vit_t16", "seed": 2**70}]}, "expected an int between 0 and 2\\*\\*64 - 1"),
])
def test_schema_ranges(edit, message):
    with pytest.raises(UserError, match=message):
        parse_config({**BASE, **edit})


@pytest.mark.parametrize("model,message", [
    ({"model": "vit_b17", "weights": "random"}, "unknown model 'vit_b17'"),
    ({"model": "vit_t16", "weights": "random", "kwargs": {"depth": "six"}}, "kwargs {'depth': 'six'} do not build"),
    ({"model": "vit_t16", "weights": "random", "kwargs": {"bogus": 1}}, "do not build the model"),
])
def test_models_are_checked_before_results_are_written(tmp_path, capsys, model, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**BASE, "models": [model]}))
    code = main(["bench", "--config", str(config), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
