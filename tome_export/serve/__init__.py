"""Serving packages over a finished artifact: ``serve_artifact(DIR)`` writes a Triton model repository entry.

One function backs both ``tome-export serve DIR`` (an existing artifact) and ``tome-export ... --serve triton``
(the artifact a build just wrote). Torch-free: it reads the manifest and the graph, copies and configures.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import UserError
from ..manifest import MANIFEST, Manifest, load_manifest, read_manifest
from .readme import render_readme, validation_line
from .repository import check_destination, install, stage_files, staging_dir, write_checksums, write_texts
from .triton import VERSION, ModelPlan, TritonOptions, check_options, model_name, plan_model, render_config

FORMATS = ("triton",)
REPOSITORY = "model_repository"
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")


@dataclass(frozen=True)
class ServeResult:
    repository: Path
    model_dir: Path
    plan: ModelPlan
    checksums: Dict[str, str]  # path in the model directory -> sha256


def default_repository(artifact: Path) -> Path:
    """``model_repository/`` beside the artifact, so several builds share one repository."""
    return Path(os.path.abspath(artifact)).parent / REPOSITORY


def check_request(artifact: Path, fmt: str, repository: Optional[Path], options: TritonOptions, force: bool) -> None:
    """Checks that need no artifact yet (a build runs them before it starts)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: supported formats are {', '.join(FORMATS)}")
    check_options(options)
    name = model_name(artifact, options.name)
    check_destination(Path(repository) if repository else default_repository(artifact), name, force)


def _config_header(artifact: Path, manifest: Manifest, plan: ModelPlan) -> List[str]:
    model = manifest.model
    header = [f"Written by tome-export from {Path(os.path.abspath(artifact)).name} ({model.get('alias')}: {model.get('source', 'timm')} "
              f"{manifest.upstream_name}, {manifest.target} {manifest.precision}, r {list(manifest.r_schedule)}).",
              f"Validated when built: {validation_line(manifest)}.", "README.md beside this file: serving, preprocessing, client."]
    return header + [f"NOTE: {note}" for note in plan.notes]


def serve_artifact(artifact: Path, fmt: str = "triton", repository: Optional[Path] = None,
                   options: TritonOptions = TritonOptions(), force: bool = False) -> ServeResult:
    """Write ``<repository>/<name>/`` (config.pbtxt, README.md, SHA256SUMS, ``1/``) for the artifact directory."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise UserError(f"{str(artifact)!r} is not a directory: pass a directory written by tome-export")
    check_request(artifact, fmt, repository, options, force)
    repository = Path(repository) if repository else default_repository(artifact)
    manifest = load_manifest(artifact)  # every file against its sha256
    plan = plan_model(artifact, manifest, options)
    tables = manifest.artifacts
    files = [(artifact / src, f"{VERSION}/{dest}", tables.get(src, {}).get("sha256")) for src, dest in plan.files]
    if plan.variant == "native":
        files.append((artifact / MANIFEST, MANIFEST, None))  # provenance; the python variant has it in 1/artifact
    texts = {"config.pbtxt": render_config(plan, _config_header(artifact, manifest, plan)),
             "README.md": render_readme(plan, manifest, artifact, repository)}
    if plan.variant == "python":
        texts[f"{VERSION}/model.py"] = PYTHON_MODEL.read_text()
    staged = staging_dir(repository, plan.name)
    try:
        stage_files(tuple(files), staged)
        if plan.variant == "python":
            read_manifest(staged / VERSION / "artifact")  # the copy verifies as the server will load it
        write_texts(texts, staged)
        checksums = write_checksums(staged)
        model_dir = install(staged, repository, plan.name, force)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return ServeResult(repository, model_dir, plan, checksums)


__all__ = ["FORMATS", "ServeResult", "TritonOptions", "check_request", "default_repository", "serve_artifact"]
