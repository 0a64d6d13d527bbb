import pytest

from tome_export.errors import UserError
from tome_export.schedule import expand_schedule, parse_r_text, r_label, resolve_schedule


def test_vit_b16_r16_token_counts():
    s = resolve_schedule(16, 12, 197, 1)
    assert list(s.tokens) == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert list(s.r) == [16] * 11 + [10] and s.capped


def test_inflect_schedule_matches_the_reference_formula():
    # reference parse_r: min = int(r * (1 - inflect)), max = 2r - min, linear in between, int() per layer
    assert expand_schedule((8, -1.0), 12) == [int(16 + (0 - 16) / 11 * i) for i in range(12)]
    assert expand_schedule((8, 0.0), 4) == [8, 8, 8, 8]
    assert expand_schedule((10, 0.5), 3) == [5, 10, 15]
    assert expand_schedule((10, -1.0), 1) == [10]  # one block: no slope (the reference divides by zero)


def test_list_schedule_needs_one_r_per_block():
    assert expand_schedule([1, 2, 3], 3) == [1, 2, 3]
    with pytest.raises(UserError, match="one r per block"):
        expand_schedule([1, 2], 3)


@pytest.mark.parametrize("bad", [-1, (4, 2.0), [1, -1, 0], "8", 2.5, True])
def test_bad_schedules_are_rejected(bad):
    with pytest.raises(UserError):
        expand_schedule(bad, 3)


def test_parse_cli_forms():
    assert parse_r_text("16") == 16
    assert parse_r_text("16:-1") == (16, -1.0)
    assert parse_r_text("8,8,4") == [8, 8, 4]
    assert parse_r_text("[8, 8, 4]") == [8, 8, 4]
    for bad in ["-3", "abc", "1.5", "8;8", "", "16:2", "16:-1.5"]:
        with pytest.raises(UserError):
            parse_r_text(bad)


def test_labels():
    assert r_label(16) == "r16" and r_label((16, -1.0)) == "r16i-1" and r_label([1, 2]) == "r1-2"
