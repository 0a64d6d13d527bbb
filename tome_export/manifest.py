"""manifest.json: what an artifact directory holds, how it was built, how it validated, and checksums.

:class:`Manifest` is the typed view every reader uses; the JSON keeps the layout of ``tome-export/1`` manifests
(core fields, then each target's own sections at the top level), so manifests written before this model
existed still load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ._version import __version__
from .errors import UserError
from .files import atomic_write, sha256_file
from .graph_names import SOURCE_NAME
from .manifest_schema import check_schema, warn_if_newer
from .tasks import Task

MANIFEST = "manifest.json"
FORMAT = "tome-export/1"
SELF_DIGEST = "manifest_sha256"  # digest of the manifest's own content: edits are detected
MAX_MANIFEST_BYTES = 64 << 20  # far above any manifest a build writes; a larger file is refused before it is read

__all__ = ["MANIFEST", "FORMAT", "InputSpec", "Manifest", "artifact_table", "dumps", "load_manifest",
           "read_manifest", "refuse_failed", "sha256_file", "unchanged_since_build", "write_manifest"]


@dataclass(frozen=True)
class InputSpec:
    """The artifact's one input: name, shape (batch first; ``"batch"`` when dynamic), dtype."""

    name: str
    shape: Tuple[Any, ...]
    dtype: str = "float32"
    dynamic_batch: bool = False

    @property
    def batch(self) -> Optional[int]:
        """The static batch size; None for a dynamic batch."""
        return None if self.dynamic_batch else int(self.shape[0])

    @property
    def image_shape(self) -> Tuple[int, ...]:
        return tuple(int(v) for v in self.shape[1:])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputSpec":
        return cls(d.get("name", "images"), tuple(d["shape"]), d.get("dtype", "float32"), bool(d.get("dynamic_batch")))

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "dynamic_batch": self.dynamic_batch}


@dataclass(frozen=True)
class Manifest:
    """A build's record. Core fields are typed; what a target adds (its ``sections``) stays as it wrote it."""

    target: str
    precision: str
    input: InputSpec
    preprocessing: Dict[str, Any]
    model: Dict[str, Any] = field(default_factory=dict)  # alias, source, name, family, weights, seed, checkpoint
    outputs: Tuple[str, ...] = ("logits",)
    # what the artifact computes (manifests before tasks: classify) and each output's shape (batch first, "batch"
    # when dynamic; manifests before tasks: none recorded)
    task: Task = Task()
    output_shapes: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)
    runtime: Dict[str, Any] = field(default_factory=dict)  # the runner ("module:Class") and its settings
    validation: Dict[str, Any] = field(default_factory=dict)
    # Where the build validated: the CPU (model, every feature flag, ISA-limiting variables), the runtime
    # libraries' versions and the device, as the artifact's runner describes them (runtime/machine.py).
    validated_on: Dict[str, Any] = field(default_factory=dict)
    # What the artifact checks itself against where it runs (runtime/selfcheck.py): the file holding the views,
    # PyTorch's outputs and the build machine's, the thresholds, and the figures on the build machine.
    self_check: Dict[str, Any] = field(default_factory=dict)
    # Set only in a build that failed validation and was kept for inspection (--keep-failed): why it failed and
    # the output it was meant for. Loaders refuse such a directory (refuse_failed).
    failed: Dict[str, Any] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()
    merge_decisions: Optional[Dict[str, Any]] = None
    r: Any = None
    r_requested: Tuple[int, ...] = ()
    r_schedule: Tuple[int, ...] = ()
    r_capped: bool = False
    tokens_per_block: Tuple[int, ...] = ()
    num_tokens: Optional[int] = None
    num_protected: Optional[int] = None
    patch_size: Optional[Tuple[int, int]] = None
    merge_impl: Optional[str] = None
    prop_attn: Optional[bool] = None
    opset: Optional[int] = None
    num_classes: Optional[int] = None
    flops: Dict[str, Any] = field(default_factory=dict)
    recipe: Dict[str, Any] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)
    tool_version: str = __version__
    build_seconds: Optional[float] = None
    sections: Dict[str, Any] = field(default_factory=dict)  # target-specific: precision_step, tensorrt, ...
    artifacts: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # filled in by write_manifest
    digest: Optional[str] = None  # the manifest's own sha256 as read (write_manifest computes it)
    format: str = FORMAT

    @property
    def upstream_name(self) -> Optional[str]:
        """The model's upstream name (manifests before torchvision support recorded only ``timm_name``)."""
        return self.model.get("name", self.model.get("timm_name"))

    @property
    def identity(self) -> Tuple[Any, ...]:
        """(alias, source, upstream name, target, precision, task): what makes two builds the same build."""
        return (self.model.get("alias"), self.model.get("source", "timm"), self.upstream_name, self.target,
                self.precision, self.task.name)

    @property
    def task_outputs(self) -> Tuple[str, ...]:
        """The outputs a deployment uses: the task's (``source``, where traced, is for inspection)."""
        return tuple(name for name in self.outputs if name != SOURCE_NAME)

    def to_dict(self) -> Dict[str, Any]:
        """The JSON layout: core fields, the target's sections at the top level, then the build time."""
        data: Dict[str, Any] = {"tool_version": self.tool_version, "versions": dict(self.versions)}
        for name in _CORE:
            value = getattr(self, name)
            data[name] = value.to_dict() if name in ("input", "task") else _plain(value)
        for key, value in self.sections.items():
            if key in data or key in _FIELDS:
                raise ValueError(f"a target section may not replace the manifest's {key!r}")
            data[key] = value
        data.update(runtime=dict(self.runtime), validation=dict(self.validation))
        data.update({key: dict(value) for key, value in (("validated_on", self.validated_on),
                                                          ("self_check", self.self_check), ("failed", self.failed))
                     if value})
        data["notes"] = list(self.notes)
        if self.merge_decisions is not None:
            data["merge_decisions"] = self.merge_decisions
        data["build_seconds"] = self.build_seconds
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        known = {k: v for k, v in data.items() if k in _FIELDS}
        sections = {k: v for k, v in data.items() if k not in _FIELDS and k != SELF_DIGEST}
        known["input"] = InputSpec.from_dict(known["input"])
        known["task"] = Task.from_dict(known.get("task"))
        known["output_shapes"] = {k: tuple(v) for k, v in (known.get("output_shapes") or {}).items()}
        known["digest"] = data.get(SELF_DIGEST)
        for name in ("outputs", "notes", "r_requested", "r_schedule", "tokens_per_block", "patch_size"):
            if known.get(name) is not None:
                known[name] = tuple(known[name])
        return cls(**known, sections=sections)

    def section(self, key: str, default: Any = None) -> Any:
        """A target-specific section (``precision_step``, ``tensorrt``, ...)."""
        return self.sections.get(key, default)


_FIELDS = {f.name for f in dataclasses.fields(Manifest)} - {"sections"}
# Written first, in this order (the layout manifests always had).
_CORE = ("model", "target", "precision", "r", "r_requested", "r_schedule", "r_capped", "tokens_per_block",
         "num_tokens", "num_protected", "patch_size", "merge_impl", "prop_attn", "opset", "recipe", "input",
         "outputs", "task", "output_shapes", "num_classes", "preprocessing", "flops")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def artifact_table(directory: Path) -> Dict[str, Dict[str, Any]]:
    """sha256 and size of every file in ``directory`` (recursively) except the manifest."""
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def dumps(data: Any) -> str:
    """JSON with indentation, but lists of numbers and strings kept on one line."""
    text = json.dumps(data, indent=2)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)


def _self_digest(data: Dict[str, Any]) -> str:
    """sha256 of the manifest's content (without this digest), independent of formatting."""
    content = {k: v for k, v in data.items() if k != SELF_DIGEST}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def unchanged_since_build(data: Mapping[str, Any]) -> bool:
    """Whether a loaded manifest still matches its own digest. Every tome-export/1 manifest a release wrote has
    one, so a manifest without it counts as edited (removing the key must not let an edit pass)."""
    return SELF_DIGEST in data and data[SELF_DIGEST] == _self_digest(dict(data))


def write_manifest(directory: Path, manifest: Union[Manifest, Mapping[str, Any]]) -> Dict[str, Any]:
    """Write the manifest last, with the checksums of everything else in the directory and of itself.

    ``manifest``: a :class:`Manifest`, or its JSON content (without format, artifacts and digest). Returns the
    JSON content written.
    """
    content = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    data = {"format": FORMAT, **content, "artifacts": artifact_table(directory)}
    data = json.loads(json.dumps(data))  # the digest is of what a reader will load (tuples, int keys)
    data[SELF_DIGEST] = _self_digest(data)
    atomic_write(Path(directory) / MANIFEST, dumps(data) + "\n")
    return data


def read_manifest(directory: Path, verify: bool = True) -> Dict[str, Any]:
    """The manifest's JSON content; with ``verify``, every artifact checked against its sha256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{str(directory)!r} holds no {MANIFEST}: pass a directory written by tome-export")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{path} is {path.stat().st_size / 1e6:.0f} MB, larger than any manifest tome-export writes: "
                        f"the artifact directory is corrupted; rebuild it")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path} is not valid JSON: the artifact directory is corrupted; rebuild it") from None
    _check_format(path, data)
    check_schema(path, data)
    _check_paths(directory, path, data)
    if verify:
        _verify(directory, path, data)
    return data


def _check_format(path: Path, data: Any) -> None:
    found = data.get("format") if isinstance(data, dict) else None
    if found != FORMAT:
        what = f"a {found} manifest" if isinstance(found, str) else "not a tome-export manifest"
        raise UserError(f"{path} is {what}; tome-export {__version__} reads {FORMAT} manifests: rebuild the "
                        f"artifact with this version of tome-export")


def confined(directory: Path, rel: Any) -> Optional[Path]:
    """``directory / rel`` when ``rel`` names a place inside ``directory``, else None.

    Refused: anything but a non-empty relative path string, ``..`` parts, backslashes, drive letters, and paths
    whose symlinks (followed) lead out of the directory.
    """
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return None
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or ".." in parts:
        return None
    path = directory / rel
    root, target = directory.resolve(), path.resolve()
    return path if target != root and target.is_relative_to(root) else None


def _check_paths(directory: Path, path: Path, data: Dict[str, Any]) -> None:
    """Every file the manifest names (its artifacts, the runtime's file) stays inside the artifact directory."""
    runtime = data.get("runtime")
    named = list(data["artifacts"]) + ([runtime["file"]] if isinstance(runtime, dict) and "file" in runtime else [])
    for rel in named:
        if confined(directory, rel) is None:
            raise UserError(f"{path} names {rel!r}, which is not a file inside {str(directory)!r}: an artifact "
                            f"directory only refers to its own files; rebuild it")


def _verify(directory: Path, path: Path, data: Dict[str, Any]) -> None:
    if SELF_DIGEST not in data:
        raise UserError(f"{path} has no {SELF_DIGEST}, which every {FORMAT} manifest carries: it was edited after "
                        f"the build; rebuild the artifact")
    if not unchanged_since_build(data):
        raise UserError(f"{path} was edited after the build ({SELF_DIGEST} does not match): rebuild the artifact")
    for rel, entry in data["artifacts"].items():
        if not isinstance(entry, dict):
            raise UserError(f"{path} lists {rel!r} without a checksum: the manifest is corrupted; rebuild it")
        file = directory / rel
        if not file.is_file():
            raise UserError(f"artifact {rel!r} listed in {path} is missing: the directory is incomplete; rebuild it")
        if sha256_file(file) != entry.get("sha256"):
            raise UserError(f"artifact {rel!r} does not match its sha256 in {path}: it was modified; rebuild it")


def load_manifest(directory: Path, verify: bool = True) -> Manifest:
    """The typed :class:`Manifest` of an artifact directory (see :func:`read_manifest`); a manifest written by a
    newer tome-export is reported (:class:`~tome_export.manifest_schema.NewerManifestWarning`); with ``verify``, a
    build kept after failing validation is refused (:func:`refuse_failed`)."""
    data = read_manifest(directory, verify)
    warn_if_newer(data)
    manifest = Manifest.from_dict(data)
    if verify:
        refuse_failed(directory, manifest)
    return manifest


def refuse_failed(directory: Path, manifest: Manifest) -> None:
    """A UserError for a build that failed validation and was kept only to be looked at (``--keep-failed``)."""
    if manifest.failed:
        raise UserError(f"{str(directory)!r} is a build that FAILED validation, kept for inspection (--keep-failed): "
                        f"{manifest.failed.get('reason', 'see tome-export inspect')}; it cannot be loaded or served: "
                        f"inspect it with `tome-export inspect {directory}`, fix the build, and build again")
