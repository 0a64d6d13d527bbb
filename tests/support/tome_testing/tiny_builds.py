"""The suite's default build subject: ``digits_vit`` (4 blocks, 32 px, 65 tokens), random weights, each artifact
built once per session through the pipeline, as the CLI builds it.

A build test that is not about a model's size takes its artifact from here: an export of this model costs a few
seconds on 2 cores where ViT-Tiny (12 blocks, 224 px) costs most of a minute, and validation runs on 32 px photos.
A test that changes an artifact copies it first (``shutil.copytree``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from tome_export.models import digits_vit
from tome_export.pipeline import BuildRequest, build

TINY_MODEL, TINY_R = digits_vit.ALIAS, 8  # 65 tokens -> 57, 49, 41, 33


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """``tiny_build(target="onnx", precision="fp32", **request) -> artifact directory``.

    ``request``: any other :class:`~tome_export.pipeline.BuildRequest` field (``r``, ``dynamic_batch``, ``task``,
    ``trace_source``, ...); each distinct request is built once per session. Treat the directory as read-only.
    """
    root = tmp_path_factory.mktemp("tiny-builds")
    cache: Dict[Tuple[str, str, str], Path] = {}

    def get(target: str = "onnx", precision: str = "fp32", **request: Any) -> Path:
        request = {"model": TINY_MODEL, "r": TINY_R, "weights": "random", **request}
        key = (target, precision, repr(sorted(request.items())))
        if key not in cache:
            out = root / f"{len(cache)}-{request['model']}-{target}-{precision}"
            cache[key] = build(BuildRequest(target=target, precision=precision, output=out, **request)).path
        return cache[key]

    return get
