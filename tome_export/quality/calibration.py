"""Calibration images for quantization: real photos (a user folder, else the bundled ones) with seeded augmentation.

Never random noise: activation ranges of noise are not those of photos.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ..errors import UserError
from ..images import sample_photos
from ..preprocess import Preprocessing, open_image, to_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_ENTRIES = 100_000  # a calibration folder walked further than this is the wrong folder (a home, a disk)
BUNDLED = "bundled sample photos (tome_export/photos)"


@dataclass(frozen=True)
class Calibration:
    """A recipe's ``calibration`` section: how many images, in which batches, augmented or not."""

    images: int = 32
    batch: int = 1  # batch of a dynamic-batch build's calibration (a static build uses its own batch)
    augment: bool = True
    seed: int = 0
    data_dir: Optional[str] = None  # a folder of photos; --calib-data overrides it


def image_files(directory: Union[str, os.PathLike]) -> List[Path]:
    """Image files under ``directory`` (recursively, sorted), or a one-line UserError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--calib-data {str(directory)!r} is not a directory: pass a folder of JPEG/PNG images")
    files = []
    for count, path in enumerate(directory.rglob("*")):  # symbolic links to folders are not followed
        if count >= MAX_ENTRIES:
            raise UserError(f"--calib-data {str(directory)!r} holds more than {MAX_ENTRIES:,} files and folders: pass "
                            f"a folder of representative photos (a few hundred are plenty)")
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():  # is_file: FIFOs and devices are skipped
            files.append(path)
    files.sort()
    if not files:
        raise UserError(f"--calib-data {str(directory)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                        f"pass a folder of representative photos")
    return files


def _augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (30-100% of the area, aspect 3:4-4:3), a horizontal flip half the time, colour jitter."""
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(0.3, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = image.crop((left, top, left + cw, top + ch))
            break
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(float(rng.uniform(0.7, 1.3)))
    return image


def calibration_images(count: int, data_dir: Optional[os.PathLike] = None, augment: bool = True,
                       seed: int = 0) -> List[Image.Image]:
    """``count`` real RGB photos: from ``data_dir`` (a seeded sample when it holds more), else the bundled photos.

    With ``augment`` every image but the first pass over a folder's originals is a random crop/flip/jitter of
    one, so a handful of photos still give varied activation ranges. The bundled photos are augmented from the
    first image on: validation runs on them and on fixed views of them, which a quantizer must not have seen.
    Never random noise.
    """
    if count < 1:
        raise UserError(f"calibration needs at least one image, got {count}")
    rng = np.random.default_rng(seed)
    if data_dir is not None:
        files = image_files(data_dir)
        if len(files) > count:
            files = [files[i] for i in sorted(rng.choice(len(files), count, replace=False))]
        originals = [to_rgb(open_image(f)) for f in files]
    else:
        originals = sample_photos()
    kept = len(originals) if data_dir is not None else 0  # plain originals before the augmented ones
    images = []
    for i in range(count):
        image = originals[i % len(originals)]
        images.append(_augment(image, rng) if augment and i >= kept else image)
    return images


def calibration_batches(pre: Preprocessing, count: int, batch: int, data_dir: Optional[os.PathLike] = None,
                        augment: bool = True, seed: int = 0) -> List[np.ndarray]:
    """Preprocessed calibration images in batches of ``batch`` (``count`` rounded up to whole batches)."""
    count = -(-count // batch) * batch
    arrays = pre.batch(calibration_images(count, data_dir, augment, seed))
    return [arrays[i:i + batch] for i in range(0, count, batch)]


def calibrate(settings: Calibration, pre: Preprocessing, batch: Optional[int],
              data_dir: Optional[os.PathLike] = None) -> Tuple[List[np.ndarray], Dict[str, Any]]:
    """Calibration batches of a recipe's ``calibration`` section, and what was used (for the manifest).

    ``batch``: the artifact's static batch, or None for a dynamic-batch build (the section's ``batch``).
    ``data_dir`` (``--calib-data``) wins over the section's ``data_dir``.
    """
    folder = data_dir if data_dir is not None else settings.data_dir
    batches = calibration_batches(pre, settings.images, batch or settings.batch, data_dir=folder,
                                  augment=settings.augment, seed=settings.seed)
    return batches, {"images": sum(len(b) for b in batches), "source": str(folder) if folder else BUNDLED,
                     "augment": settings.augment, "seed": settings.seed}
