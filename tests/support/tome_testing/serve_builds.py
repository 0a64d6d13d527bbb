"""Real vit_t16 builds (r 8, random weights) for the serving tests (tests/serve), each built once per session.

Builds go through the same pipeline as the CLI, with the built-in recipe's validation trimmed to 2 photos
(the recipe's other settings unchanged) so the serving tests stay affordable on 2 cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import pytest
import yaml

from .cpu_builds import recipe_data
from tome_export.pipeline import BuildRequest, build


def trimmed_recipe(target: str, precision: str, directory: Path) -> Path:
    validation: Dict[str, Any] = {"images": 2}
    if target.startswith("tensorrt"):
        validation["merge_agreement"] = False
    path = directory / f"{target}-{precision}.yaml"
    path.write_text(yaml.safe_dump(recipe_data(target, precision, validation=validation)))
    return path


@pytest.fixture(scope="session")
def vit_t16_build(tmp_path_factory):
    """``vit_t16_build(target, batch="dynamic" | "static", precision="fp32", profile=None) -> artifact directory``."""
    root = tmp_path_factory.mktemp("serve-builds")
    cache: Dict[Tuple[str, str, str, str], Path] = {}

    def get(target: str, batch: str = "dynamic", precision: str = "fp32", profile: str = "") -> Path:
        key = (target, batch, precision, profile)
        if key not in cache:
            out = root / f"vit_t16-r8-{target}-{precision}-{batch}"
            extra = {"dynamic_batch": profile} if profile else {}
            result = build(BuildRequest(model="vit_t16", r=8, target=target, precision=precision, weights="random",
                                        dynamic_batch=batch == "dynamic", output=out, target_options=extra,
                                        recipe=trimmed_recipe(target, precision, root)))
            cache[key] = result.path
        return cache[key]

    return get
