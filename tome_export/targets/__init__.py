"""Build targets: one module (or package) per backend in this package, each registering its :class:`Target`.

Every module here whose name does not start with ``_`` (and is not ``base``) is a target module; they are found
and imported the first time the registry is read, as are targets other distributions declare in the
``tome_export.targets`` entry-point group. Importing them loads no torch (see :mod:`.base`).
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import metadata
from typing import Dict, Tuple

from ..errors import UserError
from ..recipe import Recipe
from .base import BuildContext, BuildPlan, Settings, Target, TargetOptions, TargetResult

ENTRY_POINTS = "tome_export.targets"
TARGETS: Dict[str, Target] = {}
_discovered = False


def register(target: Target) -> Target:
    """Add a target to the registry (target modules call this at import)."""
    if target.name in TARGETS and TARGETS[target.name] != target:
        raise ValueError(f"two targets are named {target.name!r}")
    TARGETS[target.name] = target
    return target


def targets() -> Dict[str, Target]:
    """Every registered target by name (the registry itself: tests may patch it)."""
    global _discovered
    if not _discovered:
        _discovered = True
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base" and not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        for entry in metadata.entry_points(group=ENTRY_POINTS):
            entry.load()
    return TARGETS


def get_target(name: str) -> Target:
    known = targets()
    if name not in known:
        raise UserError(f"unknown --target {name!r}; available: {', '.join(sorted(known))}")
    return known[name]


def recipe_settings(recipe: Recipe) -> Tuple[Target, Settings]:
    """The target of a recipe and the recipe's sections as that target's typed settings (every key checked)."""
    where = str(recipe.path) if recipe.path else "recipe"
    known = targets()
    target = known.get(recipe.target)
    if target is None:
        raise UserError(f"{where}: unknown target {recipe.target!r}; available: {', '.join(sorted(known))}")
    if recipe.precision not in target.precisions:
        raise UserError(f"{where}: precision {recipe.precision!r} is not one of {', '.join(target.precisions)}")
    return target, target.settings_for(recipe)


__all__ = ["BuildContext", "BuildPlan", "Settings", "Target", "TargetOptions", "TargetResult", "TARGETS",
           "get_target", "recipe_settings", "register", "targets"]
