"""Images of every mode PIL reads reach the model as the picture they show: 16-bit grey scaled (not clipped to
white), transparency composited onto white, palettes, CMYK, greyscale and the rest converted to RGB."""

import numpy as np
import pytest
from PIL import Image

from tome_export.preprocess import BACKGROUND, Preprocessing, open_image, to_rgb
from tome_export.quality.calibration import calibration_images

PRE = Preprocessing((3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "center", "bilinear")
GRADIENT = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (48, 1))  # 8-bit reference picture


def _sixteen_bit_png(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(GRADIENT.astype(np.uint16) * 257).save(path)  # the same picture at 16 bits
    return path


def test_a_16_bit_png_is_scaled_in_preprocess_and_calibration(tmp_path):
    path = _sixteen_bit_png(tmp_path)
    assert open_image(path).mode.startswith("I")
    want = PRE(Image.fromarray(GRADIENT, "L"))
    assert np.abs(PRE(path) - want).max() < 1e-6
    (calibration,) = calibration_images(1, data_dir=tmp_path, augment=False)
    assert calibration.mode == "RGB" and np.array_equal(np.asarray(calibration)[..., 0], GRADIENT)


@pytest.mark.parametrize("mode,full", [("I", 65535), ("I", 255), ("F", 1.0), ("F", 65535)])
def test_wide_grey_modes_are_scaled_from_their_range(mode, full):
    values = GRADIENT.astype(np.float64) / 255 * full
    image = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode)
    assert np.abs(np.asarray(to_rgb(image))[..., 0].astype(int) - GRADIENT).max() <= 1


def test_transparency_is_composited_onto_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (200, 30, 60, 255))
    out = to_rgb(rgba)
    assert out.getpixel((1, 1)) == BACKGROUND and out.getpixel((0, 0)) == (200, 30, 60)
    half = to_rgb(Image.new("LA", (2, 2), (0, 128)))
    assert abs(half.getpixel((0, 0))[0] - 127) <= 1
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == BACKGROUND and to_rgb(palette).getpixel((1, 1)) == (10, 200, 30)


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBA", "LA", "I", "F", "I;16"])
def test_every_mode_gives_an_rgb_picture_close_to_the_original(mode):
    colour = (200, 30, 60)
    image = Image.new("RGB", (16, 16), colour)
    converted = image.convert(mode) if mode != "I;16" else Image.fromarray(
        np.full((16, 16), 84 * 257, np.uint16))
    rgb = to_rgb(converted)
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    grey = round(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])
    want = {"1": (0, 0, 0)}.get(mode, (grey,) * 3 if mode in ("L", "LA", "I", "F", "I;16") else colour)
    assert np.abs(np.subtract(rgb.getpixel((0, 0)), want)).max() <= (25 if mode == "P" else 3)  # a palette quantises
    assert np.isfinite(PRE(converted)).all()
