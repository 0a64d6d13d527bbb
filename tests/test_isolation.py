"""No test folder or test module can stand in for an installed package.

Pytest's default import mode puts test folders on ``sys.path``; ``tests/kernels`` then hid the ``kernels`` package
that transformers imports, and 96 tests failed on a fresh install. The suite runs in importlib mode, with its helpers
in one uniquely named package (``tome_testing``); this checks the result in the running test session itself.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import tome_testing

TESTS = tome_testing.REPO_ROOT / "tests"
SUPPORT = TESTS / "support"


def _inside_tests(spec) -> bool:
    places = [spec.origin] if spec.origin else []
    places += list(spec.submodule_search_locations or [])
    return any(Path(p).resolve().is_relative_to(TESTS) for p in places if p and p != "namespace")


def _names_in_tests() -> set:
    """Every name a file or folder of the test tree could be imported by."""
    names = set()
    for path in TESTS.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        if path.is_dir() or path.suffix == ".py":
            names.add(path.stem)
    return names


def _installed_top_level_names() -> set:
    names = set()
    for dist in importlib.metadata.distributions():
        top = dist.read_text("top_level.txt")
        names.update(top.split() if top else [])
        names.update(Path(f.parts[0]).stem for f in (dist.files or []) if len(f.parts) > 1 and f.parts[0].isidentifier())
    return names


def test_only_the_support_folder_of_the_tests_is_on_sys_path():
    on_path = [p for p in sys.path if p and Path(p).resolve().is_relative_to(TESTS)]
    assert [Path(p).resolve() for p in on_path] == [SUPPORT]
    assert sorted(p.name for p in SUPPORT.iterdir() if p.name != "__pycache__") == ["tome_testing"]


def test_no_name_resolves_into_the_test_tree_except_the_helpers():
    shadowed = []
    # "tests" itself is importable wherever the checkout is the working directory (``python -m pytest``); only a
    # folder inside it could hide a package that installed code imports.
    for name in sorted((_names_in_tests() | _installed_top_level_names()) - {"tome_testing", "tests"}):
        if not name.isidentifier():
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and _inside_tests(spec):
            shadowed.append(f"{name} -> {spec.origin or list(spec.submodule_search_locations)}")
    assert shadowed == []


def test_an_installed_package_named_like_a_test_folder_is_the_installed_one():
    spec = importlib.util.find_spec("kernels")  # transformers imports Hugging Face's kernel hub by this name
    if spec is not None:
        assert not _inside_tests(spec)
        assert "site-packages" in (spec.origin or "")
