"""The distribution: the base install is the torch-free runtime, every imported package is declared, the build
stack is an extra, and what ships as data (recipes, photos) is found from the installed package."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tome_export.errors import BUILD_STACK
from tome_testing.blocked_imports import BLOCK_MODULES

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "cuda": "cuda-python"}
# imported only through a declared distribution (triton comes with CUDA builds of torch), or not from PyPI
# (tensorrt: NVIDIA's index; triton_python_backend_utils: provided by Triton server's Python backend)
INDIRECT = {"triton", "tensorrt", "tensorrt_rtx", "triton_python_backend_utils"}


def requirement_names(requirements) -> set:
    names = set()
    for req in requirements:
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


def imported_packages(root: Path) -> dict:
    """Top-level third-party imports of every module under ``root`` -> the files that import them."""
    found: dict = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "tome_export":
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def dist_name(module: str) -> str:
    return DISTRIBUTION.get(module, module).lower().replace("_", "-")


def test_base_install_is_the_runtime():
    assert requirement_names(PYPROJECT["dependencies"]) == {"numpy", "pillow"}
    runtime_imports = set(imported_packages(ROOT / "tome_export" / "runtime")) - INDIRECT
    extras = PYPROJECT["optional-dependencies"]
    backends = requirement_names(extras["onnxruntime"] + extras["openvino"] + extras["cuda"])
    # onnx: only for exposing intermediate outputs (visualize --artifact), a build-side use
    assert {dist_name(m) for m in runtime_imports} - {"torch", "onnx"} <= {"numpy", "pillow"} | backends


def test_every_imported_package_is_declared():
    extras = PYPROJECT["optional-dependencies"]
    declared = requirement_names(PYPROJECT["dependencies"])
    for requirements in extras.values():
        declared |= requirement_names(requirements)
    missing = {m: sorted(files)[:2] for m, files in imported_packages(ROOT / "tome_export").items()
               if m not in INDIRECT and dist_name(m) not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_build_stack_is_the_build_extra():
    build_extra = requirement_names(PYPROJECT["optional-dependencies"]["build"])
    assert {dist_name(m) for m in BUILD_STACK} <= build_extra
    test_extra = PYPROJECT["optional-dependencies"]["test"]
    assert any(req.startswith("tome-export[all]") for req in test_extra)  # CI installs everything


def test_install_hints_name_real_extras():
    extras = set(PYPROJECT["optional-dependencies"])
    hints = set()
    for path in (ROOT / "tome_export").rglob("*.py"):
        text = path.read_text()
        start = 0
        while (i := text.find("tome-export[", start)) >= 0:
            end = text.index("]", i)
            hints.update(e.strip() for e in text[i + len("tome-export["):end].split(","))
            start = end
    hints = {h for h in hints if h and "{" not in h}  # f-string placeholders are filled from the registry below
    from tome_export.targets import targets

    hints |= {e for target in targets().values() for e in target.runtime_extra.split(",")}
    assert hints and hints <= extras, f"hints name extras that do not exist: {hints - extras}"


def test_package_data_found_through_the_package():
    from tome_export.images import sample_photo_paths
    from tome_export.recipe import recipe_for

    assert len(sample_photo_paths()) == 8
    assert recipe_for("onnxruntime", "int8").target == "onnxruntime"


@pytest.fixture(scope="module")
def small_artifact(tiny_build) -> Path:
    """The suite's shared digits_vit build (onnx, fp32, r=8; 10 classes): read here, never changed."""
    return tiny_build()


# Runs the runtime and the CLI with every build-stack module made unimportable.
BLOCKED_RUN = BLOCK_MODULES + """
import numpy as np
from tome_export.runtime import load
from tome_export.images import sample_photo_paths
with load(sys.argv[1], threads=1) as runner:
    logits = runner(runner.preprocess_batch(sample_photo_paths()[:1]))
assert logits.shape == (1, 10) and np.isfinite(logits).all()
from tome_export.cli import main
assert main(["--version"]) == 0
assert main(["--model", "vit_t16", "--weights", "random"]) == 2
try:
    import tome_export
    tome_export.build
except ModuleNotFoundError as exc:
    assert "tome-export[build]" in str(exc), exc
else:
    raise AssertionError("tome_export.build imported without the build stack")
assert not BLOCKED & {m.split(".")[0] for m in sys.modules}
"""


def test_runtime_and_cli_without_the_build_stack(small_artifact):
    blocked = ",".join(sorted(BUILD_STACK | {"timm", "transformers", "nncf"}))
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, str(small_artifact), blocked],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'tome-export[build]'" in proc.stderr


@pytest.mark.slow
def test_torch_free_venv_installs_and_runs(small_artifact, tmp_path):
    """`pip install '.[onnxruntime]'` from the repository's own files into a venv without site packages: the
    runtime loads and runs the artifact, and neither torch nor the rest of the build stack is installed."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".ci-venv", "*.egg-info", "build", "tome-out", "__pycache__", ".pytest_cache", "benchmarks",
        "docs"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{source}[onnxruntime]"],
                             capture_output=True, text=True, env=env, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import importlib.util, sys\n"
            "from tome_export.runtime import load\n"
            "from tome_export.images import sample_photo_paths\n"
            "with load(sys.argv[1]) as r: print(r(r.preprocess_batch(sample_photo_paths()[:1])).shape)\n"
            "assert not [m for m in ('torch', 'timm', 'onnx', 'yaml') if importlib.util.find_spec(m)]\n"
            "from tome_export.recipe import recipe_folder\n"
            "print('recipes', recipe_folder(), sorted(p.name for p in recipe_folder().glob('*.yaml')))\n")
    run = subprocess.run([str(python), "-c", code, str(small_artifact)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and "(1, 10)" in run.stdout, run.stderr
    # the top-level recipes/ folder ships inside the wheel, as tome_export/recipes
    shipped = run.stdout.split("recipes ", 1)[1]
    assert "site-packages/tome_export/recipes" in shipped
    assert str(sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))) in shipped
    cli = subprocess.run([str(venv / "bin" / "tome-export"), "--version"], capture_output=True, text=True, env=env)
    assert cli.returncode == 0 and cli.stdout.startswith("tome-export ")
    # the deployment-side tools run in this runtime-only venv (no torch, no onnx, no PyYAML)
    for args in (["inspect", str(small_artifact)], ["verify", str(small_artifact)],
                 ["serve", str(small_artifact), "-o", str(tmp_path / "repo")]):
        tool = subprocess.run([str(venv / "bin" / "tome-export"), *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert tool.returncode == 0, (args[0], tool.stderr)
