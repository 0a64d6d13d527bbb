"""Real photos that ship inside this package (``tome_export/photos``), for validation and calibration offline.

They are the colour photographs scikit-image bundles, byte for byte (sources and licences in
``photos/README.md``); shipping the eight files (3.4 MB) spares every install scikit-image and scipy.
Validation needs more distinct inputs than eight: :func:`sample_views` gives each photo under fixed views
(mirror, off-centre crops, a rotation, a colour change), applied before a model's preprocessing.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable, List, Tuple

from PIL import Image, ImageEnhance, ImageOps

from .preprocess import to_rgb

SAMPLE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
)


def sample_photo_paths() -> List[Path]:
    root = Path(str(resources.files(__package__) / "photos"))
    return [root / name for name in SAMPLE_PHOTOS if (root / name).is_file()]


def sample_photos(n: int = len(SAMPLE_PHOTOS)) -> List[Image.Image]:
    """The first ``n`` bundled photos as RGB PIL images (cycled when ``n`` exceeds what ships)."""
    paths = sample_photo_paths()
    if not paths:
        raise RuntimeError("the photos bundled with tome_export are missing (tome_export/photos): reinstall "
                           "tome-export")
    return [to_rgb(Image.open(paths[i % len(paths)])) for i in range(n)]


def _crop(left: float, top: float, right: float, bottom: float) -> Callable[[Image.Image], Image.Image]:
    """A view keeping the box given as fractions of the width and height."""
    def view(image: Image.Image) -> Image.Image:
        w, h = image.size
        return image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
    return view


def _rotated(image: Image.Image) -> Image.Image:
    """Rotated 10 degrees about the centre, then cropped to the middle 70 % so no filled corner shows."""
    return _crop(0.15, 0.15, 0.85, 0.85)(image.rotate(10, resample=Image.Resampling.BICUBIC))


def _recoloured(image: Image.Image) -> Image.Image:
    """Brighter, less contrasted and more saturated, by fixed factors."""
    for enhance, factor in ((ImageEnhance.Brightness, 1.2), (ImageEnhance.Contrast, 0.8), (ImageEnhance.Color, 1.3)):
        image = enhance(image).enhance(factor)
    return image


# Fixed views, most natural first: the first 8 validation images are the photos themselves, the next 8 their mirror
# images, and so on. Every view is deterministic (no random numbers), so validation sees the same inputs every run.
VIEWS: Tuple[Tuple[str, Callable[[Image.Image], Image.Image]], ...] = (
    ("photo", lambda image: image),
    ("mirror", ImageOps.mirror),
    ("crop top-left 80%", _crop(0.0, 0.0, 0.8, 0.8)),
    ("crop bottom-right 80%", _crop(0.2, 0.2, 1.0, 1.0)),
    ("rotate 10 degrees", _rotated),
    ("recolour", _recoloured),
)
MAX_VIEWS = len(SAMPLE_PHOTOS) * len(VIEWS)


def view_names(n: int) -> List[str]:
    """What the ``n`` images of :func:`sample_views` are, as ``"<photo> <view>"``."""
    return [f"{SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)]} {VIEWS[i // len(SAMPLE_PHOTOS)][0]}" for i in range(n)]


def sample_views(n: int) -> List[Image.Image]:
    """``n`` distinct RGB images: every bundled photo under the first view, then every photo under the next
    (:data:`VIEWS`); at most :data:`MAX_VIEWS`. The first eight are :func:`sample_photos`."""
    if not 1 <= n <= MAX_VIEWS:
        raise ValueError(f"{n} images asked: the bundled photos give 1 to {MAX_VIEWS} distinct views "
                         f"({len(SAMPLE_PHOTOS)} photos x {len(VIEWS)} views)")
    photos = sample_photos(min(n, len(SAMPLE_PHOTOS)))
    return [VIEWS[i // len(photos)][1](photos[i % len(photos)]) for i in range(n)]
