"""Which entries of an output directory are tome-export's to replace: the files its manifest records.

tome-export deletes only what it wrote and recorded: ``manifest.json`` (when it verifies against its own digest),
the files its ``artifacts`` table lists, and the runtime file it names (an engine built later on the GPU machine).
Everything else in an output directory is foreign: a build refuses such a directory, naming the first foreign
entry, and with ``--force`` it replaces only its own files and keeps the foreign ones (:func:`survey`; the swap
itself is :func:`tome_export.files.staged_output`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional, Set, Tuple

from .errors import UserError
from .manifest import MANIFEST, Manifest, read_manifest, unchanged_since_build

__all__ = ["OutputDir", "foreign_entries", "owned_paths", "survey"]


@dataclass(frozen=True)
class OutputDir:
    """An output directory as a build finds it."""

    path: Path
    manifest: Optional[Manifest]  # the build it holds, when its manifest is tome-export's and verifies
    foreign: Tuple[str, ...]  # top-most entries (relative POSIX paths) tome-export did not write, sorted

    @property
    def empty(self) -> bool:
        return self.manifest is None and not self.foreign

    def foreign_text(self, limit: int = 3) -> str:
        """The foreign entries for a message: the first few, then how many more."""
        shown = ", ".join(repr(rel) for rel in self.foreign[:limit])
        more = len(self.foreign) - limit
        return shown + (f" and {more} more" if more > 0 else "")


def owned_paths(manifest: Manifest) -> Set[str]:
    """The relative paths a build recorded as its own (``manifest.json`` included)."""
    owned = {MANIFEST, *manifest.artifacts}
    runtime_file = manifest.runtime.get("file") if isinstance(manifest.runtime, dict) else None
    if isinstance(runtime_file, str) and runtime_file:
        owned.add(PurePosixPath(runtime_file).as_posix())
    return owned


def _verified_manifest(out: Path) -> Optional[Manifest]:
    """The directory's manifest when it is tome-export's, unedited; else None (then nothing there is ours)."""
    if not (out / MANIFEST).is_file() or (out / MANIFEST).is_symlink():
        return None
    try:
        data = read_manifest(out, verify=False)
    except UserError:
        return None
    return Manifest.from_dict(data) if unchanged_since_build(data) else None


def foreign_entries(out: Path, owned: Set[str]) -> Tuple[str, ...]:
    """The top-most entries under ``out`` that are neither in ``owned`` nor a directory leading to one."""
    ancestors = {parent.as_posix() for rel in owned for parent in PurePosixPath(rel).parents} - {"."}
    foreign = []
    for root, dirs, files in os.walk(out):
        base = PurePosixPath(Path(root).relative_to(out).as_posix())
        for name in sorted(dirs):
            rel = (base / name).as_posix()
            if rel not in ancestors or os.path.islink(os.path.join(root, name)):
                foreign.append(rel)
        dirs[:] = [d for d in dirs if (base / d).as_posix() in ancestors and not os.path.islink(os.path.join(root, d))]
        foreign += [(base / name).as_posix() for name in files if (base / name).as_posix() not in owned]
    return tuple(sorted(foreign))


def survey(out: Path) -> OutputDir:
    """What an output directory holds: the build recorded in it (if any) and the entries that are not its own.

    A path that is not a directory, or a directory this user cannot write to, is refused.
    """
    out = Path(out)
    if not (out.exists() or out.is_symlink()):
        return OutputDir(out, None, ())
    if not out.is_dir():
        raise UserError(f"--output {str(out)!r} exists and is not a directory: choose another --output")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {str(out)!r}: choose another --output")
    manifest = _verified_manifest(out)
    owned = owned_paths(manifest) if manifest is not None else set()
    return OutputDir(out, manifest, foreign_entries(out, owned))
