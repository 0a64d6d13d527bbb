"""Image preprocessing from a model's pretrained config, in NumPy and PIL only (no torch at deploy time).

Model families hand a :class:`Preprocessing` down (:func:`tome_export.models.preprocessing`); this module knows no
model.

Mirrors timm's eval transform and torchvision's ``ImageClassification`` (the same steps): resize (shorter
edge to ``size / crop_pct``), centre crop, scale to [0, 1], normalise with mean/std, CHW float32.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError

# An image is refused before it is decoded when its header claims more pixels than this (PIL's own warning limit,
# about 89 megapixels: 3x that in RGB bytes), and before it is resized when its sides differ by more than
# MAX_ASPECT: the resize scales the shorter side to the model's, so a 1 x 40000 strip would become gigapixels.
MAX_PIXELS = 89_478_485
MAX_ASPECT = 100

_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Preprocessing:
    input_size: Tuple[int, int, int]  # C, H, W
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_pct: float
    crop_mode: str
    interpolation: str

    @classmethod
    def from_config(cls, cfg: Dict[str, Any]) -> "Preprocessing":
        """From a timm-style data config (input_size, mean, std, crop_pct, crop_mode, interpolation)."""
        input_size = tuple(int(v) for v in cfg["input_size"])
        return cls(
            input_size=input_size,
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            crop_pct=float(cfg.get("crop_pct") or 0.875),
            crop_mode=str(cfg.get("crop_mode") or "center"),
            interpolation=str(cfg.get("interpolation") or "bilinear"),
        )

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Preprocessing":
        return cls(
            input_size=tuple(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            crop_pct=float(d["crop_pct"]),
            crop_mode=d["crop_mode"],
            interpolation=d["interpolation"],
        )

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @property
    def resize_to(self) -> Tuple[int, int]:
        """(H, W) the image is resized to before the crop (the shorter edge, for ``center`` with a square input)."""
        _, h, w = self.input_size
        return math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)

    def describe(self) -> Dict[str, Any]:
        """The steps as data, for readers without this package: an ONNX graph's metadata, a serving README."""
        (rh, rw), (_, h, w) = self.resize_to, self.input_size
        resize = (f"resize ({self.interpolation}) keeping the aspect ratio so the image covers {rh}x{rw} (H x W)"
                  if self.crop_mode == "center" else f"resize ({self.interpolation}) to {rh}x{rw} (H x W)")
        return {"layout": "NCHW", "channels": "RGB", "dtype": "float32", **self.to_dict(), "resize_to": [rh, rw],
                "steps": f"{resize}; centre crop {h}x{w}; scale to [0, 1]; subtract mean, divide by std "
                         f"(per channel); channels first"}

    def __call__(self, image: Union[Image.Image, str, os.PathLike]) -> np.ndarray:
        """One image (PIL or path) as a ``(C, H, W)`` float32 array."""
        img = to_rgb(check_image_size(image) if isinstance(image, Image.Image) else open_image(image))
        _, h, w = self.input_size
        interp = _INTERP.get(self.interpolation)
        if interp is None:
            raise UserError(f"unsupported interpolation {self.interpolation!r} in the preprocessing config")
        scale_h, scale_w = self.resize_to
        if self.crop_mode == "squash":
            img = img.resize((scale_w, scale_h), interp)
        elif self.crop_mode == "center":
            iw, ih = img.size
            if scale_h == scale_w:  # shorter edge to the scale size, as torchvision's Resize(int)
                short, long = (iw, ih) if iw <= ih else (ih, iw)
                new_short, new_long = scale_h, int(scale_h * long / short)
                size = (new_short, new_long) if iw <= ih else (new_long, new_short)
            else:
                ratio = max(scale_h / ih, scale_w / iw)
                size = (round(iw * ratio), round(ih * ratio))
            img = img.resize(size, interp)
        else:
            raise UserError(f"unsupported crop_mode {self.crop_mode!r}; supported: center, squash")
        iw, ih = img.size
        top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
        img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def batch(self, images: Sequence[Union[Image.Image, str, os.PathLike]]) -> np.ndarray:
        return np.stack([self(img) for img in images])


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto, as image viewers show them
_WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one channel wider than 8 bits


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image of any mode PIL reads, its values scaled rather than clipped.

    16-bit and 32-bit grey (``I;16*``, ``I``) are scaled from 0..65535 (values up to 255 in ``I`` are taken as
    8-bit); float grey (``F``) from 0..1 when it stays within it, else from 0..65535. Transparency (``RGBA``,
    ``LA``, ``PA``, palettes with a transparent index) is composited onto :data:`BACKGROUND`; palettes, CMYK,
    YCbCr and 1-bit images go through PIL's own conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE:
        return Image.fromarray(_grey_to_8bit(np.asarray(img), img.mode), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    try:
        return img.convert("RGB")
    except ValueError:
        raise UserError(f"cannot convert a {img.mode!r} image to RGB: save it as an RGB or greyscale PNG/JPEG") from None


def _grey_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(values.max()) if values.size else 0.0
    if mode == "F" and top <= 1.0:
        full = 1.0
    elif mode in ("I", "F") and top <= 255:
        full = 255.0
    else:
        full = 65535.0
    return np.clip(np.round(values / full * 255.0), 0, 255).astype(np.uint8)


def check_image_size(img: Image.Image, name: str = "the image") -> Image.Image:
    """``img`` when preprocessing it stays within :data:`MAX_PIXELS` and :data:`MAX_ASPECT`; else a UserError."""
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise UserError(f"{name} is {w} x {h} pixels, more than the {MAX_PIXELS:,} tome-export decodes: scale it down "
                        f"first")
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise UserError(f"{name} is {w} x {h} pixels: sides more than {MAX_ASPECT} times apart would be resized to a "
                        f"huge image (the shorter side is scaled to the model's input); crop it first")
    return img


def open_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open and decode an image file, or raise a one-line :class:`UserError`.

    Only regular files are read (a FIFO or device is refused, never waited on); the size the header claims is
    checked (:func:`check_image_size`) before any pixel is decoded, and decoder refusals (decompression bombs,
    oversized text chunks, truncated or malformed data) are one line too.
    """
    name = repr(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UserError(f"image {name} does not exist") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise UserError(f"{name} is {what}: pass an image file (JPEG/PNG)")
    with os.fdopen(fd, "rb") as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(f)
                check_image_size(img, f"image {name}")
                img.load()
        except UserError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UserError(f"image {name} claims more than {MAX_PIXELS:,} pixels (a decompression bomb, or a huge "
                            f"scan): scale it down first") from None
        except Exception as exc:  # PIL's decoders raise many types (OSError, ValueError, SyntaxError, ...)
            why = "" if isinstance(exc, UnidentifiedImageError) else " ".join(str(exc).split())[:80]
            raise UserError(f"{name} is not an image PIL can read ({type(exc).__name__}{': ' + why if why else ''}): "
                            f"pass a JPEG/PNG file") from None
    return img
