"""Declarative build recipes: one YAML file per (target, precision) in ``recipes/``.

A recipe is data the build reads — opset, merge lowering, target settings, quantization, calibration and
validation thresholds — never code. Users run an edited copy with ``--recipe FILE``. Every key is checked
against the schema its target declares, so a typo is an error, not a silently ignored setting.

Shape of a recipe::

    target: onnxruntime        # a registered target
    precision: int8            # one of the target's precisions
    description: ...           # optional, shown by `tome-export --list-recipes` and in manifests
    opset: 18                  # optional
    merge_impl: gather         # optional: auto | gather | onehot
    build: {...}               # target settings          (keys: Target.recipe_schema["build"])
    quantization: {...}        # optional                 (keys: Target.recipe_schema["quantization"])
    calibration: {...}         # optional                 (keys: Target.recipe_schema["calibration"])
    validation: {...}          # thresholds               (keys: Target.recipe_schema["validation"])
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from .errors import UserError

SECTIONS = ("build", "quantization", "calibration", "validation")
TOP_LEVEL = {"target": str, "precision": str, "description": str, "opset": int, "merge_impl": str, **{s: dict for s in SECTIONS}}


@dataclass(frozen=True)
class Recipe:
    target: str
    precision: str
    path: Optional[Path] = None
    description: str = ""
    opset: Optional[int] = None
    merge_impl: Optional[str] = None
    build: Dict[str, Any] = field(default_factory=dict)
    quantization: Dict[str, Any] = field(default_factory=dict)
    calibration: Dict[str, Any] = field(default_factory=dict)
    validation: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """What the manifest records: the recipe's content and where it came from."""
        d = {k: getattr(self, k) for k in ("target", "precision", "description", "opset", "merge_impl", *SECTIONS)}
        d["file"] = self.path.name if self.path else None
        return d


def recipe_dirs() -> List[Path]:
    """Where built-in recipes live: the source tree's ``recipes/``, else the installed data files."""
    dirs = [Path(__file__).resolve().parent.parent / "recipes", Path(sys.prefix) / "share" / "tome-export" / "recipes"]
    return [d for d in dirs if d.is_dir()]


def builtin_recipes() -> Dict[Tuple[str, str], Path]:
    found: Dict[Tuple[str, str], Path] = {}
    for d in reversed(recipe_dirs()):  # the source tree wins
        for path in sorted(d.glob("*.yaml")):
            data = _read(path)
            found[(str(data.get("target")), str(data.get("precision")))] = path
    return found


def _read(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"recipe {str(path)!r} does not exist: pass the path of a recipe YAML file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {str(path)!r} is not valid YAML ({type(exc).__name__}): fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {str(path)!r} must be a YAML mapping (target: ..., precision: ...)")
    return data


def _check_section(where: str, values: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if key not in schema:
            allowed = ", ".join(sorted(schema)) or "none"
            raise UserError(f"{where}: unknown key {key!r} (allowed: {allowed})")
        expected = schema[key]
        if isinstance(expected, tuple) and all(isinstance(e, str) for e in expected):  # an enumeration
            if value not in expected:
                raise UserError(f"{where}.{key} = {value!r}: choose one of {', '.join(map(str, expected))}")
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        elif not isinstance(value, expected) or (isinstance(value, bool) and expected in (int, float)):
            names = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
            raise UserError(f"{where}.{key} = {value!r}: expected {names}")


def parse_recipe(data: Mapping[str, Any], path: Optional[Path] = None) -> Recipe:
    """Validate a recipe mapping against the schema of its target."""
    from .backends import TARGETS

    where = str(path) if path else "recipe"
    _check_section(where, data, TOP_LEVEL)
    for key in ("target", "precision"):
        if key not in data:
            raise UserError(f"{where}: missing {key!r}")
    target = TARGETS.get(data["target"])
    if target is None:
        raise UserError(f"{where}: unknown target {data['target']!r}; available: {', '.join(sorted(TARGETS))}")
    if data["precision"] not in target.precisions:
        raise UserError(f"{where}: precision {data['precision']!r} is not one of {', '.join(target.precisions)}")
    if data.get("merge_impl", "auto") not in ("auto", "gather", "onehot"):
        raise UserError(f"{where}.merge_impl = {data['merge_impl']!r}: choose auto, gather or onehot")
    for section in SECTIONS:
        _check_section(f"{where}.{section}", data.get(section) or {}, target.recipe_schema.get(section, {}))
    return Recipe(
        target=data["target"], precision=data["precision"], path=path, description=data.get("description", ""),
        opset=data.get("opset"), merge_impl=data.get("merge_impl"),
        **{s: dict(data.get(s) or {}) for s in SECTIONS},
    )


def load_recipe(path: Path) -> Recipe:
    return parse_recipe(_read(path), Path(path))


def recipe_for(target: str, precision: str) -> Recipe:
    """The built-in recipe of (target, precision); a target without recipe files gets an empty one."""
    path = builtin_recipes().get((target, precision))
    if path is None:
        return parse_recipe({"target": target, "precision": precision})
    return load_recipe(path)
