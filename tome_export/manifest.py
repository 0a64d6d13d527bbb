"""manifest.json: what an artifact directory holds, how it was built, how it validated, and checksums."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict

from .errors import UserError

MANIFEST = "manifest.json"
FORMAT = "tome-export/1"
SELF_DIGEST = "manifest_sha256"  # digest of the manifest's own content: edits are detected


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def unchanged_since_build(data: Dict[str, Any]) -> bool:
    """Whether a loaded manifest still matches its own digest (manifests from before the digest: True)."""
    return SELF_DIGEST not in data or data[SELF_DIGEST] == _self_digest(data)


def write_manifest(directory: Path, manifest: Dict[str, Any]) -> Path:
    """Write the manifest last, with the checksums of everything else in the directory and of itself."""
    data = {"format": FORMAT, **manifest, "artifacts": artifact_table(directory)}
    data = json.loads(json.dumps(data))  # the digest is of what a reader will load (tuples, int keys)
    data[SELF_DIGEST] = _self_digest(data)
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dumps(data) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: Path, verify: bool = True) -> Dict[str, Any]:
    """Load a manifest; with ``verify``, check every artifact against its sha256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{str(directory)!r} holds no {MANIFEST}: pass a directory written by tome-export")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON: the artifact directory is corrupted; rebuild it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("artifacts"), dict):
        raise UserError(f"{path} is not a {FORMAT} manifest: rebuild the artifact with this version of tome-export")
    if verify:
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
    return data
