"""The suite's plugins: every helper lives in the ``tome_testing`` package (``tests/support``), so test folders are
never importable by name and cannot shadow an installed package (``tests/test_isolation.py`` checks it)."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tome_testing.export_memo",  # each distinct export once per session (first: it wraps export_onnx)
    "tome_testing.fixtures",  # photos, cached exports, one traced build
    "tome_testing.tiny_builds",  # the default build subject (digits_vit), each artifact once per session
    "tome_testing.cpu_builds",  # CPU recipe builds on one shared export
    "tome_testing.digits",  # the small digits ViT, trained once
    "tome_testing.aoti_builds",  # one tiny AOTInductor CPU package and one GPU-less aoti-cuda build
    "tome_testing.ray_cluster",  # a real two-node Ray cluster on this machine
]


def pytest_configure(config):
    """Artifacts check themselves when loaded and cache the passes: keep the suite's out of the user's cache."""
    import os
    import tempfile

    os.environ.setdefault("TOME_EXPORT_CACHE", tempfile.mkdtemp(prefix="tome-test-cache-"))


# --- the quick selection: `pytest -m "not slow"` -------------------------------------------------------------------
# A test that builds a whole artifact or trains a model is marked `slow` where it is written (`@pytest.mark.slow`,
# or `pytestmark` for a module of them). Tests that take one of these shared builds are marked here, by fixture
# name, since a fixture cannot carry a marker: each costs tens of seconds to minutes on 2 cores.
HEAVY_FIXTURES = {"cpu_build", "traced_artifact", "artifact_variants", "served", "rtx_fp16", "rtx_no_engine",
                  "built", "onnx_artifact", "small_artifact", "tiny_run", "small_digits", "zoo",
                  "exported", "onnx_cache", "ray_cluster", "tiny_build"}


def pytest_collection_modifyitems(config, items):
    """Tests using a heavy shared build are ``slow`` too, so ``pytest -m "not slow"`` is the day-to-day selection;
    CI and a plain ``pytest`` run everything."""
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
