"""Build targets: one module (or package) per backend in this package, each registering its :class:`Target`.

Every module here whose name does not start with ``_`` (and is not ``base``) is a target module; they are found
and imported the first time the registry is read, as are targets other distributions declare in the
``tome_export.targets`` entry-point group. Importing them loads no torch (see :mod:`.base`).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Tuple

from ..errors import UserError
from ..manifest import load_manifest
from ..recipe import Recipe
from .base import BuildContext, BuildPlan, Finished, Settings, Target, TargetOptions, TargetResult

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


def finish_artifact(directory: os.PathLike, force: bool = False, validate_only: bool = False,
                    log: Callable[[str], None] = lambda message: None) -> Finished:
    """Finish a build directory on the machine that runs it (``tome-export engine DIR``): its target's step.

    The manifest names the target; a target without such a step (its artifacts are complete when built) is a
    UserError. The target's step verifies the directory and leaves it as it was unless every part succeeds.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{str(directory)!r} is not a directory: pass a build directory written by tome-export")
    built = load_manifest(directory, verify=False).target  # the target's step verifies every checksum
    target = targets().get(built)
    if target is None or target.finish is None:
        steps = sorted(t.name for t in targets().values() if t.finish is not None)
        names = f"{', '.join(steps[:-1])} or {steps[-1]}" if len(steps) > 1 else "".join(steps)
        raise UserError(f"{str(directory)!r} is a --target {built} build, which has nothing to finish on the target "
                        f"machine: `tome-export engine` finishes --target {names} builds")
    return target.finish(directory=directory, force=force, validate_only=validate_only, log=log)


__all__ = ["BuildContext", "BuildPlan", "Finished", "Settings", "Target", "TargetOptions", "TargetResult", "TARGETS",
           "finish_artifact", "get_target", "recipe_settings", "register", "targets"]
