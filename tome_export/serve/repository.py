"""Writing one model into a model repository: all or nothing, checksummed, never over another without force.

The model directory is assembled in a hidden directory beside the repository and renamed into place, so a
server polling the repository never sees a half-copied model, and a failed or interrupted write leaves the
previous one untouched. Replacing a model (``--force``) replaces only the files its ``SHA256SUMS`` lists: what
else is in the model directory (another version, a user's notes) is kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Set, Tuple

from ..errors import UserError
from ..files import carry_entries, deferred_signals
from ..manifest import sha256_file
from ..ownership import foreign_entries

CHECKSUMS = "SHA256SUMS"


def check_destination(repository: Path, name: str, force: bool) -> None:
    """Refuse before any work: a repository that is not a writable directory, or a model that exists."""
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise UserError(f"{str(repository)!r} exists and is not a directory: choose another repository (-o)")
    probe = repository
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {str(probe)!r}: choose another repository (-o)")
    target = repository / name
    if (target.exists() or target.is_symlink()) and not force:
        raise UserError(f"{str(target)!r} already exists: pass --force to replace it, or choose another --name or -o")
    if target.exists() and not target.is_dir():
        raise UserError(f"{str(target)!r} exists and is not a directory: remove it or choose another --name")


def copy_verified(source: Path, destination: Path, expected_sha256: Optional[str]) -> str:
    """Copy one file and return the copy's sha256; it must equal ``expected_sha256`` when one is given."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    digest = sha256_file(destination)
    if expected_sha256 is not None and digest != expected_sha256:
        raise UserError(f"{source} changed while it was copied (sha256 {digest[:12]}... is not the manifest's "
                        f"{expected_sha256[:12]}...): rebuild the artifact")
    return digest


def write_checksums(model_dir: Path) -> Dict[str, str]:
    """``SHA256SUMS`` (``sha256sum -c`` format) of every file in ``model_dir``; returns path -> digest."""
    digests = {path.relative_to(model_dir).as_posix(): sha256_file(path)
               for path in sorted(model_dir.rglob("*")) if path.is_file() and path.name != CHECKSUMS}
    (model_dir / CHECKSUMS).write_text("".join(f"{digest}  {rel}\n" for rel, digest in digests.items()))
    return digests


def staging_dir(repository: Path, name: str) -> Path:
    """A new hidden directory beside the repository (same file system, outside what Triton scans)."""
    repository = Path(repository)
    repository.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{repository.name}.{name}.tmp-", dir=repository.parent))


def install(staged: Path, repository: Path, name: str, force: bool) -> Path:
    """Move the staged model directory to ``repository/name``, replacing an existing one only with ``force``."""
    target = Path(repository) / name
    check_destination(repository, name, force)  # again: another writer may have finished meanwhile
    target.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staged, 0o777 & ~umask)  # mkdtemp makes directories private; a served model should not be
    if target.exists():
        carry_entries(target, staged, foreign_entries(target, recorded_files(target)))
        retired = staging_dir(repository, name + ".old")
        with deferred_signals(f"{target} was already replaced"):
            os.replace(target, retired / name)
            os.replace(staged, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, target)
    return target


def recorded_files(model_dir: Path) -> Set[str]:
    """What tome-export wrote into a model directory: its ``SHA256SUMS`` and the files listed there."""
    path = Path(model_dir) / CHECKSUMS
    if not path.is_file() or path.is_symlink():
        return set()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return set()
    listed = {line.split("  ", 1)[1] for line in lines if len(line) > 66 and line[64:66] == "  "}
    return listed | {CHECKSUMS}


def stage_files(files: Tuple[Tuple[Path, str, Optional[str]], ...], root: Path) -> None:
    """Copy (source, relative destination, expected sha256 or None) into ``root``."""
    for source, rel, expected in files:
        copy_verified(source, root / rel, expected)


def write_texts(texts: Mapping[str, str], root: Path) -> None:
    for rel, text in texts.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
