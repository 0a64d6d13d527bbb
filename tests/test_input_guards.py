"""Resource guards where input enters: images (special files, pixel and text bombs, extreme aspect ratios, a pixel
budget checked before decoding), calibration folders and recipe counts, visualize's sizes and picture formats.
Each is one line (a UserError; exit 2 in the CLI), refused before the work that would exhaust the machine.
"""

import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tome_export.cli import main
from tome_export.errors import UserError
from tome_export.preprocess import Preprocessing, open_image
from tome_export.quality import calibration

PRE = Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3, 0.875, "center", "bicubic")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(path: Path, width: int, height: int, extra: bytes = b"", rows: int = 0) -> Path:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels (only ``rows`` rows of data follow)."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    data = zlib.compress(b"".join(b"\0" + b"\x80" * 3 * width for _ in range(rows)) or b"\0")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + extra + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_refusal(lambda: open_image(fifo))), daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():  # release the reader that waits for a writer, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("open_image waited on a FIFO")
    assert "not a regular file" in outcome[0]


def _refusal(call) -> str:
    try:
        call()
    except UserError as exc:
        return str(exc)
    return "accepted"


def test_a_pixel_bomb_is_refused_from_its_header(tmp_path):
    bomb = _png(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(UserError, match="claims more than 89,478,485 pixels"):
        open_image(bomb)


def test_the_pixel_budget_is_checked_before_anything_is_decoded(tmp_path):
    # 96 megapixels: above the budget, below twice it (where PIL itself only warns and decodes); one row of data
    big = _png(tmp_path / "big.png", 12_000, 8_000, rows=1)
    with pytest.raises(UserError, match="claims more than 89,478,485 pixels") as err:
        open_image(big)
    assert "truncated" not in str(err.value)  # refused from the header, never decoded


def test_a_text_chunk_bomb_is_one_line(tmp_path):
    ztxt = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (64 << 20), 9))  # 64 MB of text, 64 KB on disk
    bomb = _png(tmp_path / "text.png", 8, 8, extra=ztxt, rows=8)
    with pytest.raises(UserError, match="MAX_TEXT_CHUNK") as err:
        open_image(bomb)
    assert "\n" not in str(err.value)


def test_an_extreme_aspect_ratio_is_refused_before_the_resize(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (3000, 10), "white").save(strip)  # resized by its short side: 256 x 76,800 pixels
    with pytest.raises(UserError, match="3000 x 10 pixels: sides more than 100 times apart"):
        PRE(strip)
    with pytest.raises(UserError, match="sides more than 100 times apart"):
        PRE(Image.new("RGB", (10, 3000)))  # an image handed over in memory too
    assert PRE(Image.new("RGB", (1000, 10))).shape == (3, 32, 32)  # 100:1 still runs


def test_directories_and_missing_files_are_one_line(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        open_image(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        open_image(tmp_path / "none.png")


# --- calibration ------------------------------------------------------------------------------------------------


def test_a_calibration_folder_skips_special_files_and_link_loops(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")  # read, it would block
    (tmp_path / "loop").symlink_to(tmp_path)  # followed, it would never end
    (tmp_path / "dev.png").symlink_to("/dev/zero")
    assert calibration.image_files(tmp_path) == [tmp_path / "a.png"]
    assert len(calibration.calibration_images(3, tmp_path, augment=True, seed=0)) == 3


def test_a_folder_far_larger_than_any_calibration_set_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "MAX_ENTRIES", 50)
    for i in range(60):
        (tmp_path / f"{i}.txt").write_text("")
    with pytest.raises(UserError, match="holds more than 50 files and folders"):
        calibration.image_files(tmp_path)


def test_a_bomb_in_a_calibration_folder_is_one_line(tmp_path):
    _png(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(UserError, match="claims more than"):
        calibration.calibration_images(2, tmp_path)


@pytest.mark.parametrize("section,value", [("calibration", {"images": 10**6}), ("calibration", {"batch": 10**6})])
def test_recipe_counts_beyond_memory_are_refused_before_any_work(section, value, tmp_path):
    from tome_testing.cpu_builds import plan_with

    with pytest.raises(UserError, match="must be between 1 and 4096"):
        plan_with(tmp_path, "onnxruntime", "int8", **{section: value})


# --- visualize --------------------------------------------------------------------------------------------------


def _one_line_exit_2(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (code, err)
    return err


def test_visualize_refuses_a_picture_format_pil_cannot_write_before_any_work(tmp_path, capsys):
    err = _one_line_exit_2(capsys, ["visualize", "astronaut", "--model", "vit_t16", "--weights", "random",
                                    "-o", str(tmp_path / "x.psd")])
    assert "cannot write them" in err and list(tmp_path.iterdir()) == []


def test_visualize_has_the_builds_memory_guard(tmp_path, capsys):
    err = _one_line_exit_2(capsys, ["visualize", "astronaut", "--model", "vit_t16", "--weights", "random",
                                    "--img-size", "4096", "-o", str(tmp_path / "x.png")])
    assert "GB of memory" in err and "--allow-large" in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--img-size", str(2**31)], "--img-size must be an image side from 16 to 8192"),
    (["--seed", str(2**70)], "--seed must be between 0 and 2**64 - 1"),
    (["--seed", "-1"], "--seed must be between 0 and 2**64 - 1"),
    (["--scale", str(2**70)], "--scale must be between 1 and 8"),
])
def test_visualize_numbers_at_their_extremes(argv, message, tmp_path, capsys):
    err = _one_line_exit_2(capsys, ["visualize", "astronaut", "--model", "vit_t16", "--weights", "random",
                                    "-o", str(tmp_path / "x.png"), *argv])
    assert message in err


def test_every_image_entry_point_shares_the_guard(tmp_path, capsys):
    bomb = _png(tmp_path / "bomb.png", 100_000, 100_000)
    err = _one_line_exit_2(capsys, ["visualize", str(bomb), "--model", "vit_t16", "--weights", "random",
                                    "-o", str(tmp_path / "x.png")])
    assert "claims more than" in err
    from tome_export.runtime import load

    fixture = Path(__file__).parent / "fixtures" / "manifests-0.1.0" / "vit_t16-tiny-onnxruntime-fp32"
    with load(fixture) as runner, pytest.raises(UserError, match="claims more than"):
        runner.preprocess(bomb)
