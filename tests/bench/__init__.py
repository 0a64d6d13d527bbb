"""Tests of the benchmark harness (a package, so its conftest does not shadow tests/conftest.py)."""
