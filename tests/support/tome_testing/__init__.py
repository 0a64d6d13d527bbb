"""Helpers shared by the test suite: seeded small models, the independent reference ToMe, shared builds, a real
Triton server. One uniquely named package on pytest's ``pythonpath`` (``tests/support``), so no test folder can
shadow an installed package; its fixture modules are loaded as plugins from ``tests/conftest.py``."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
