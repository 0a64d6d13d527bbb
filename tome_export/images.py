"""Real photos that ship inside a package (scikit-image), for validation and calibration offline."""

from __future__ import annotations

from pathlib import Path
from typing import List

from PIL import Image

from .preprocess import to_rgb

# Colour photographs from scikit-image's bundled data (no download needed).
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
    import skimage.data

    root = Path(skimage.data.__file__).parent
    return [root / name for name in SAMPLE_PHOTOS if (root / name).is_file()]


def sample_photos(n: int = len(SAMPLE_PHOTOS)) -> List[Image.Image]:
    """The first ``n`` bundled photos as RGB PIL images (cycled when ``n`` exceeds what ships)."""
    paths = sample_photo_paths()
    if not paths:
        raise RuntimeError("scikit-image's bundled sample photos are missing; reinstall scikit-image")
    return [to_rgb(Image.open(paths[i % len(paths)])) for i in range(n)]
