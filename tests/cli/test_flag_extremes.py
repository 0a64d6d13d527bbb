"""Every numeric flag at its extremes, and empty strings where a name belongs, give one line and exit 2 before any
work starts: the build, tune and bench (its config's numbers). ``serve`` and ``visualize`` have theirs in
tests/serve/test_serve_limits.py and tests/test_input_guards.py.
"""

import pytest
import yaml

from tome_export.cli import main

HUGE, NEGATIVE_HUGE = str(2**70), str(-(2**70))
BUILD = ["--model", "vit_t16", "--weights", "random", "-q"]
TUNE = ["tune", "--model", "vit_t16", "--weights", "random", "--target", "onnxruntime", "--min-agreement", "0.9"]

BUILD_CASES = {
    "--batch": ([HUGE, NEGATIVE_HUGE, "0", "65537"], "--batch must be"),
    "--opset": ([HUGE, NEGATIVE_HUGE, "0"], "--opset"),
    "--seed": ([HUGE, NEGATIVE_HUGE, "-1", str(2**64)], "--seed must be between 0 and 2**64 - 1"),
    "--img-size": ([HUGE, NEGATIVE_HUGE, str(2**31), "8193", "0", "15"], "--img-size must be an image side"),
    "--target": ([""], "unknown --target ''"),
    "--precision": ([""], "--precision '' is not available"),
    "--recipe": ([""], "is a directory"),
    "--r": ([HUGE, HUGE + ":0", ",".join([HUGE] * 12)], "r must be at most 1,048,576"),
    "--model": ([""], "--model is required"),
}
TUNE_CASES = {
    "--seed": ([HUGE, "-1"], "--seed must be between"),
    "--batch": ([HUGE, "0", "65537"], "--batch must be an integer from 1 to"),
    "--threads": ([HUGE, "0", "1025"], "--threads must be an integer from 1 to"),
    "--eval-images": ([HUGE, "0"], "--eval-images must be an integer from 1 to"),
    "--max-images": ([HUGE, "0"], "--max-images must be an integer from 1 to"),
    "--rounds": ([HUGE, "0", "1001"], "timing.rounds"),
    "--time-budget": (["nan", "inf", "0", "-1", "1e300"], "--time-budget"),
    "--tie-tolerance": (["nan", "-1", "0.6"], "--tie-tolerance"),
    "--max-latency-ms": (["nan", "0", "-5"], "--max-latency-ms"),
}


def _one_line_exit_2(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("tome-export: error: ") and "Traceback" not in err, \
        (argv, code, err)
    return err


@pytest.mark.parametrize("flag,value", [(f, v) for f, (values, _) in BUILD_CASES.items() for v in values])
def test_build_flags_at_their_extremes(flag, value, tmp_path, capsys):
    argv = [a for a in BUILD if not (flag == "--model" and a == "vit_t16")]
    argv = argv[:1] + [value] + argv[1:] if flag == "--model" else argv + [flag, value]
    err = _one_line_exit_2(capsys, argv + ["-o", str(tmp_path / "out")])
    assert BUILD_CASES[flag][1] in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_r_is_refused_not_taken_as_the_default(tmp_path, capsys):
    err = _one_line_exit_2(capsys, BUILD + ["--r", "", "-o", str(tmp_path / "out")])
    assert "cannot read --r ''" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag,value", [(f, v) for f, (values, _) in TUNE_CASES.items() for v in values])
def test_tune_flags_at_their_extremes(flag, value, tmp_path, capsys):
    err = _one_line_exit_2(capsys, TUNE + ["-o", str(tmp_path / "out"), flag, value])
    assert TUNE_CASES[flag][1] in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_tune_cache_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "cache").write_text("not a directory")
    err = _one_line_exit_2(capsys, TUNE + ["-o", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert "--cache" in err and "is not a directory" in err and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


BENCH = {"models": [{"model": "vit_t16", "weights": "random", "kwargs": {"depth": 2}}], "r": [0], "batches": [1],
         "backends": ["torch"], "timing": {"warmup": 0, "rounds": 1, "per_round": 1, "pause_s": 0.0}}
BENCH_CASES = {
    "a model that is a number": ({"models": [{"model": 123}]}, "models[0].model = 123"),
    "an empty model name": ({"models": [{"model": ""}]}, "models[0].model = ''"),
    "rounds that never end": ({"timing": {"rounds": 10**9}}, "timing.rounds = 1000000000"),
    "a warm-up that never ends": ({"timing": {"warmup": 10**9}}, "timing.warmup"),
    "a day-long pause": ({"timing": {"pause_s": 86400.0}}, "timing.pause_s"),
    "per-batch rounds": ({"timing": {"per_batch": {1: {"rounds": 10**9}}}}, "timing.per_batch.1.rounds"),
    "a million threads": ({"threads": [10**6]}, "threads = [1000000]"),
    "a huge seed": ({"models": [{"model": "vit_t16", "seed": 2**70}]}, "seed"),
}


@pytest.mark.parametrize("case", list(BENCH_CASES))
def test_bench_config_numbers_at_their_extremes(case, tmp_path, capsys):
    edit, message = BENCH_CASES[case]
    config = {**BENCH, **{k: v for k, v in edit.items() if k != "timing"}}
    config["timing"] = {**BENCH["timing"], **edit.get("timing", {})}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    err = _one_line_exit_2(capsys, ["bench", "--config", str(path), "--out", str(tmp_path / "out"), "-q"])
    assert message in err, err
    assert not (tmp_path / "out").exists()
