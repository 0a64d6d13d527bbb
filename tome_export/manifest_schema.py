"""The manifest's schema: what each field a reader relies on must hold (types, ranges, known dtypes), checked
when a manifest is read, so an edited or damaged manifest is one error line instead of a traceback later.

Fields are checked where present; only the fields every reader needs are required. Fields this version does not
know are accepted (targets add their own sections at the top level); a manifest written by a newer tome-export
is reported with the fields it added (:func:`newer_version_note`), never silently taken as this version's.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ._version import __version__
from .errors import UserError

Check = Callable[[Any], Optional[str]]  # a value -> what it should have been (None: it is fine)

# Element types an artifact's input may have (numpy names), and the image preprocessing's choices.
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
CROP_MODES = ("center", "squash")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
MAX_SIDE = 8192  # the largest image side a manifest may claim (a ViT input; more is an edit or an accident)
MAX_CHANNELS = 4
_SHA256 = re.compile(r"[0-9a-f]{64}")


class NewerManifestWarning(UserWarning):
    """An artifact written by a newer tome-export: what that version added is not read by this one."""


# --- checks -----------------------------------------------------------------------------------------------------


def _text(value: Any) -> Optional[str]:
    return None if isinstance(value, str) and value and value.isprintable() else "a non-empty, printable string"


def _flag(value: Any) -> Optional[str]:
    return None if isinstance(value, bool) else "true or false"


def _mapping(value: Any) -> Optional[str]:
    return None if isinstance(value, dict) else "an object"


def _integer(low: int, high: float = math.inf) -> Check:
    def check(value: Any) -> Optional[str]:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return None if ok else f"an integer from {low}" + ("" if high == math.inf else f" to {high}")
    return check


def _number(low: float = -math.inf, high: float = math.inf) -> Check:
    def check(value: Any) -> Optional[str]:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return None if ok and low <= value <= high else f"a finite number in [{low:g}, {high:g}]"
    return check


def _choice(options: Sequence[str]) -> Check:
    return lambda value: None if value in options else f"one of {', '.join(options)}"


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _either(*checks: Check) -> Check:
    def check(value: Any) -> Optional[str]:
        problems = [c(value) for c in checks]
        return None if None in problems else " or ".join(p for p in problems if p)
    return check


def _list(item: Check, length: Optional[int] = None, min_length: int = 0) -> Check:
    def check(value: Any) -> Optional[str]:
        what = f"a list of {length if length is not None else ''} values, each {item(object())}".replace("  ", " ")
        if not isinstance(value, list) or (length is not None and len(value) != length) or len(value) < min_length:
            return what
        return what if any(item(v) is not None for v in value) else None
    return check


def _fields(checks: Mapping[str, Check], required: Sequence[str] = ()) -> Check:
    """An object whose listed keys (where present) pass their checks; ``required`` keys must be present."""
    def check(value: Any) -> Optional[str]:
        if not isinstance(value, dict):
            return "an object"
        for key in required:
            if key not in value:
                return f"an object with {key!r}"
        for key, sub in checks.items():
            problem = sub(value[key]) if key in value else None
            if problem is not None:
                return f"an object whose {key!r} is {problem}"
        return None
    return check


def _digest(value: Any) -> Optional[str]:
    return None if isinstance(value, str) and _SHA256.fullmatch(value) else "a sha256 (64 lowercase hex digits)"


def _r(value: Any) -> Optional[str]:
    """r as requested: an int, one int per block, or {r, inflect}."""
    if _integer(0)(value) is None or _list(_integer(0))(value) is None:
        return None
    return _fields({"r": _integer(0), "inflect": _number(-1, 1)}, ("r",))(value) and "an int, a list of ints or {r, inflect}"


def _batch(value: Any) -> Optional[str]:
    return None if value == "batch" or _integer(1)(value) is None else "a batch size >= 1 or \"batch\""


def _input(value: Any) -> Optional[str]:
    base = _fields({"name": _text, "dtype": _choice(DTYPES), "dynamic_batch": _flag}, ("shape",))(value)
    if base is not None:
        return base
    shape = value["shape"]
    if not isinstance(shape, list) or len(shape) != 4 or _batch(shape[0]) is not None or \
            _integer(1, MAX_CHANNELS)(shape[1]) is not None or any(_integer(1, MAX_SIDE)(v) for v in shape[2:]):
        return f"an object whose 'shape' is [batch, channels (1-{MAX_CHANNELS}), height, width (1-{MAX_SIDE})]"
    if (shape[0] == "batch") != bool(value.get("dynamic_batch", False)):
        return "an object whose 'shape' starts with \"batch\" exactly when 'dynamic_batch' is true"
    return None


def _preprocessing(value: Any) -> Optional[str]:
    checks = {"input_size": _list(_integer(1, MAX_SIDE), length=3), "mean": _list(_number(-1e6, 1e6), min_length=1),
              "std": _list(_number(1e-9, 1e6), min_length=1), "crop_pct": _number(0.05, 4.0),
              "crop_mode": _choice(CROP_MODES), "interpolation": _choice(INTERPOLATIONS)}
    problem = _fields(checks, tuple(checks))(value)
    if problem is None and not len(value["mean"]) == len(value["std"]) == value["input_size"][0]:
        return "an object whose 'mean' and 'std' have one value per channel of 'input_size'"
    return problem


def _numbers(value: Any) -> Optional[str]:
    """An object of numbers (limits, figures)."""
    ok = isinstance(value, dict) and all(_number()(v) is None for v in value.values())
    return None if ok else "an object of finite numbers"


_ARTIFACT = _fields({"sha256": _digest, "bytes": _integer(0)}, ("sha256",))
_SCALARS = _list(_integer(0))
_ENGINE = _fields({"file": _text, "bytes": _integer(0), "device": _optional(_mapping),
                   "build_seconds": _optional(_number(0))})
_ENGINE_VALIDATION = _fields({"run": _flag, "passed": _flag, "images": _integer(0), "min_cosine": _number(),
                              "top1_agreement": _number()})
_AGREEMENT = _fields({"agreement": _number(0, 1), "decisions": _integer(0)}, ("agreement",))
_BUILT = _fields({"agreement": _number(0, 1), "decisions": _integer(0)}, ("agreement", "decisions"))
_DECISIONS = _fields({"as_built": _optional(_either(_BUILT, _text)), "without_protection": _either(_AGREEMENT, _text)})
_PROFILE = _fields({"min": _integer(1), "opt": _integer(1), "max": _integer(1)}, ("min", "opt", "max"))

# The fields readers use, by name. Targets' sections are open objects; those that readers take numbers from are
# checked like the core fields.
FIELDS: Dict[str, Check] = {
    "tool_version": _text, "target": _text, "precision": _text, "input": _input, "preprocessing": _preprocessing,
    "outputs": _list(_text, min_length=1), "runtime": _fields({"runner": _text, "file": _text, "install": _text,
                                                               "config": _mapping}),
    "validation": _fields({"thresholds": _numbers, "top1_interval_95": _list(_number(0, 1), length=2),
                           "images": _integer(0), "runs": _integer(0), "passed": _flag,
                           **{k: _optional(_number()) for k in ("max_abs_diff", "min_cosine", "top1_agreement")}}),
    "notes": _list(_text), "model": _fields({k: _optional(_text) for k in ("alias", "source", "name", "timm_name",
                                                                        "family", "weights", "checkpoint")}),
    "merge_decisions": _optional(_DECISIONS), "r": _optional(_r), "r_requested": _SCALARS, "r_schedule": _SCALARS,
    "r_capped": _flag, "tokens_per_block": _SCALARS, "num_tokens": _optional(_integer(1)),
    "num_protected": _optional(_integer(0)), "num_classes": _optional(_integer(1)), "opset": _optional(_integer(1)),
    "patch_size": _optional(_list(_integer(1), length=2)), "merge_impl": _optional(_text),
    "prop_attn": _optional(_flag), "flops": _mapping, "recipe": _mapping, "versions": _mapping,
    "build_seconds": _optional(_number(0)), "manifest_sha256": _digest,
    "tensorrt": _fields({"profile": _optional(_PROFILE), "engine": _optional(_ENGINE),
                         "engine_validation": _optional(_ENGINE_VALIDATION)}),
}
REQUIRED = ("artifacts", "input", "preprocessing", "target", "precision")
# Top-level keys this version writes beyond FIELDS (targets' sections): a newer manifest's others are reported.
KNOWN_SECTIONS = ("format", "artifacts", "saved_optimization", "saved_optimization_reason", "precision_step",
                  "precision_ran", "backend_versions", "cpu_capabilities", "tune")


def schema_problem(data: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with a manifest's content (one phrase naming the field), or None when it fits the schema."""
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        return f"it has no {missing[0]!r}"
    artifacts = data["artifacts"]
    if not isinstance(artifacts, dict):
        return "'artifacts' should be an object"
    for rel, entry in artifacts.items():
        if _ARTIFACT(entry) is not None:
            return f"'artifacts' lists {rel!r} as {_shown(entry)}, not {_ARTIFACT(entry)}"
    for key, check in FIELDS.items():
        problem = check(data[key]) if key in data else None
        if problem is not None:
            return f"{key!r} is {_shown(data[key])}; it should be {problem}"
    return None


def check_schema(path: Any, data: Mapping[str, Any]) -> None:
    """Raise a one-line UserError when the manifest at ``path`` does not fit the schema."""
    problem = schema_problem(data)
    if problem is not None:
        raise UserError(f"{path} does not fit the manifest schema ({problem}): the manifest was edited or damaged; "
                        f"rebuild the artifact")


def _shown(value: Any, limit: int = 40) -> str:
    """A value for a message: its JSON type and a short repr (control characters escaped)."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= limit else text[:limit] + '...'}"


# --- versions ---------------------------------------------------------------------------------------------------


def version_tuple(text: Any) -> Optional[Tuple[int, ...]]:
    """``"0.2.1"`` -> (0, 2, 1); None for what is not a release number."""
    match = re.match(r"(\d+(?:\.\d+)*)", text) if isinstance(text, str) else None
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def newer_fields(data: Mapping[str, Any]) -> List[str]:
    """The top-level keys of a manifest that this version of tome-export does not know."""
    return sorted(k for k in data if k not in FIELDS and k not in KNOWN_SECTIONS)


def newer_version_note(data: Mapping[str, Any]) -> Optional[str]:
    """One line when the manifest was written by a newer tome-export than this one (None otherwise)."""
    theirs, ours = version_tuple(data.get("tool_version")), version_tuple(__version__)
    if theirs is None or ours is None or theirs <= ours:
        return None
    unknown = newer_fields(data)
    added = f"; fields this version does not read: {', '.join(unknown)}" if unknown else ""
    return (f"the artifact was written by tome-export {data['tool_version']}, newer than this {__version__}: what "
            f"that version added is ignored here{added} (upgrade tome-export to use it)")


def warn_if_newer(data: Mapping[str, Any]) -> None:
    """Report a manifest written by a newer tome-export (a :class:`NewerManifestWarning`)."""
    note = newer_version_note(data)
    if note is not None:
        warnings.warn(note, NewerManifestWarning, stacklevel=3)
