"""Declarative build recipes: one YAML file per (target, precision), in the top-level ``recipes/`` folder.

The folder ships inside the package as ``tome_export.recipes`` (pyproject's ``package-dir`` maps it), so a wheel, an
editable install and a source checkout all read the same files.

A recipe is data the build reads — opset, merge lowering, target settings, quantization, calibration and
validation thresholds — never code. Users run an edited copy with ``--recipe FILE``. This module reads the
format; the target a recipe names checks every key of its sections (:func:`tome_export.targets.recipe_settings`),
so a typo is an error, not a silently ignored setting.

Shape of a recipe::

    target: onnxruntime        # a registered target
    precision: int8            # one of the target's precisions
    description: ...           # optional, recorded in manifests
    opset: 18                  # optional
    merge_impl: gather         # optional: auto | gather | onehot
    build: {...}               # target settings
    quantization: {...}        # optional
    calibration: {...}         # optional
    validation: {...}          # thresholds
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import UserError

SECTIONS = ("build", "quantization", "calibration", "validation")
TOP_LEVEL = {"target": str, "precision": str, "description": str, "opset": int, "merge_impl": str,
             **{s: dict for s in SECTIONS}}
MERGE_IMPLS = ("auto", "gather", "onehot")


@dataclass(frozen=True)
class Recipe:
    """A recipe as written: its sections are checked and typed by its target."""

    target: str
    precision: str
    path: Optional[Path] = None
    description: str = ""
    opset: Optional[int] = None
    merge_impl: Optional[str] = None
    sections: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def section(self, name: str) -> Dict[str, Any]:
        return dict(self.sections.get(name) or {})

    def to_dict(self) -> Dict[str, Any]:
        """What the manifest records: the recipe's content and where it came from."""
        d: Dict[str, Any] = {k: getattr(self, k) for k in ("target", "precision", "description", "opset", "merge_impl")}
        d.update({s: self.section(s) for s in SECTIONS})
        d["file"] = self.path.name if self.path else None
        return d


def _read(path: Path) -> Dict[str, Any]:
    import yaml  # only reading a recipe needs PyYAML: the registries and deployment tools stay without it

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"recipe {str(path)!r} does not exist: pass the path of a recipe YAML file") from None
    except IsADirectoryError:
        raise UserError(f"recipe {str(path)!r} is a directory: pass the path of a recipe YAML file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {str(path)!r} is not valid YAML ({type(exc).__name__}): fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {str(path)!r} must be a YAML mapping (target: ..., precision: ...)")
    return data


def parse_recipe(data: Mapping[str, Any], path: Optional[Path] = None) -> Recipe:
    """A recipe mapping as a :class:`Recipe`, its top level checked (its sections are its target's to check)."""
    where = str(path) if path else "recipe"
    for key, value in data.items():
        if key not in TOP_LEVEL:
            raise UserError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(TOP_LEVEL))})")
        if value is not None and (not isinstance(value, TOP_LEVEL[key]) or isinstance(value, bool)):
            raise UserError(f"{where}.{key} = {value!r}: expected {TOP_LEVEL[key].__name__}")
    for key in ("target", "precision"):
        if key not in data:
            raise UserError(f"{where}: missing {key!r}")
    if data.get("merge_impl", "auto") not in MERGE_IMPLS:
        raise UserError(f"{where}.merge_impl = {data['merge_impl']!r}: choose auto, gather or onehot")
    return Recipe(target=data["target"], precision=data["precision"], path=path,
                  description=data.get("description") or "", opset=data.get("opset"), merge_impl=data.get("merge_impl"),
                  sections={s: dict(data.get(s) or {}) for s in SECTIONS})


def load_recipe(path: Path) -> Recipe:
    return parse_recipe(_read(path), Path(path))


def recipe_folder() -> Path:
    """Where the built-in recipes are: the checkout's ``recipes/`` when this package runs from a source tree (also
    through ``PYTHONPATH``), else the installed ``tome_export.recipes``."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "recipes" / "__init__.py").is_file():
        return checkout / "recipes"
    return Path(str(resources.files("tome_export.recipes")))


def builtin_recipe_path(target: str, precision: str) -> Optional[Path]:
    """The built-in recipe file of (target, precision), ``<target>-<precision>.yaml``."""
    path = recipe_folder() / f"{target}-{precision}.yaml"
    return path if path.is_file() else None


def builtin_recipes() -> Dict[Tuple[str, str], Path]:
    """Every built-in recipe by the (target, precision) its content names."""
    found: Dict[Tuple[str, str], Path] = {}
    for entry in sorted(recipe_folder().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            recipe = load_recipe(Path(str(entry)))
            found[(recipe.target, recipe.precision)] = recipe.path
    return found


def recipe_for(target: str, precision: str) -> Recipe:
    """The built-in recipe of (target, precision); a target without a recipe file gets an empty one."""
    path = builtin_recipe_path(target, precision)
    return load_recipe(path) if path is not None else Recipe(target, precision)
