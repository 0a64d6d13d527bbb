"""A built-in recipe with its validation trimmed to 2 photos (its other settings unchanged), for builds whose
validation is not what a test checks.

The serving tests (tests/serve) build their artifacts with the shared ``tiny_build`` fixture
(``tome_testing.tiny_builds``); this module no longer holds a fixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import yaml

from .cpu_builds import recipe_data


def trimmed_recipe(target: str, precision: str, directory: Path) -> Path:
    validation: Dict[str, Any] = {"images": 2}
    if target.startswith("tensorrt"):
        validation["merge_agreement"] = False
    path = directory / f"{target}-{precision}.yaml"
    path.write_text(yaml.safe_dump(recipe_data(target, precision, validation=validation)))
    return path
