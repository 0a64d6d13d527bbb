"""Deployment-side tools in a runtime-only install: inspect, verify and serve with the build stack unimportable
(torch, onnx, PyYAML, ...), as tests/test_packaging.py runs the runtime (its slow test installs such a venv)."""

import subprocess
import sys

import pytest

from tome_export.errors import BUILD_STACK
from tome_export.pipeline import BuildRequest, build
from tome_testing.blocked_imports import BLOCK_MODULES

pytestmark = pytest.mark.slow

TOOLS_BLOCKED = BLOCK_MODULES + """
from tome_export.cli import main
codes = [main(["inspect", sys.argv[1]]), main(["verify", sys.argv[1]]), main(["serve", sys.argv[1], "-o", sys.argv[3]])]
print("codes", codes)
assert not BLOCKED & {m.split(".")[0] for m in sys.modules}, BLOCKED & set(sys.modules)
"""


@pytest.fixture(scope="module")
def tiny_ort(tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime-only") / "tiny"
    return build(BuildRequest(model="vit_t16", r=4, target="onnxruntime", weights="random", output=out, img_size=64,
                              model_kwargs={"depth": 2})).path


def test_inspect_verify_and_serve_run_without_the_build_stack(tiny_ort, tmp_path):
    blocked = ",".join(sorted(BUILD_STACK | {"timm", "transformers", "nncf"}))
    proc = subprocess.run([sys.executable, "-c", TOOLS_BLOCKED, str(tiny_ort), blocked, str(tmp_path / "repo")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "codes [0, 0, 0]" in proc.stdout, proc.stderr
    assert "validated on" in proc.stdout and f"verified {tiny_ort}" in proc.stdout
    assert "the graph's details need the Python package 'onnx'" in proc.stdout  # said, not refused
    assert (tmp_path / "repo" / tiny_ort.name / "config.pbtxt").is_file()
