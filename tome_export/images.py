"""Real photos that ship inside this package (``tome_export/photos``), for validation and calibration offline.

They are the colour photographs scikit-image bundles, byte for byte (sources and licences in
``photos/README.md``); shipping the eight files (3.4 MB) spares every install scikit-image and scipy.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import List

from PIL import Image

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
