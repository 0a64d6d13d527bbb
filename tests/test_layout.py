"""The package's layout: imports point down the layers (and never in a circle), the registries and data layers
import no torch, and no function grows past 60 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

import tome_export

ROOT = Path(tome_export.__file__).resolve().parent
# Lowest first. A module may import modules of its own layer or of a lower one, never of a higher one.
LAYERS: List[Tuple[str, ...]] = [
    ("errors", "_version", "files", "onnx_files", "info", "graph_names", "tasks", "schedule", "devices", "preprocess", "images", "manifest",
     "manifest_schema", "ownership",
     "recipe", "flops", "resources"),
    ("runtime",),
    ("merge", "kernels", "models", "export"),
    ("quality", "quantization", "float_precision"),
    ("targets",),
    ("pipeline", "inspection", "visualize", "serve"),
    ("bench",),
    ("tuning",),
    ("cli",),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> List[str]:
    """The tome_export modules an ``from ... import`` names (a submodule where the name is one)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("tome_export"):
        return []
    names = [f"{target}.{alias.name}" for alias in node.names]
    return [n for n in names if n in MODULES] or [target]


def _imports(path: Path) -> Set[str]:
    """Every tome_export module ``path`` imports: at module level, inside functions (lazy) and under
    ``if TYPE_CHECKING:`` alike, since each is a dependency a reader has to follow."""
    tree = ast.parse(path.read_text())
    module, is_package = _module_name(path), path.name == "__init__.py"
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tome_export"))
        elif isinstance(node, ast.ImportFrom):
            found.update(_resolve(module, is_package, node))
    return found


FILES = sorted(ROOT.rglob("*.py"))
MODULES = {_module_name(p) for p in FILES}
GRAPH: Dict[str, Set[str]] = {_module_name(p): _imports(p) for p in FILES}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER[parts[1]] if len(parts) > 1 else -1  # the package root re-exports lazily: no layer


def test_every_module_has_a_layer():
    assert sorted({m.split(".")[1] for m in MODULES if "." in m} - set(LAYER)) == []


def test_imports_only_point_down():
    upward = [f"{m} imports {i}" for m, every in GRAPH.items() for i in every
              if _layer(m) >= 0 and _layer(i) > _layer(m)]
    assert upward == []


def test_no_import_cycle():
    cycles = []

    def walk(module: str, path: List[str], done: Set[str]) -> None:
        for nxt in GRAPH.get(module, set()):
            if nxt == module or module.startswith(nxt + "."):  # a module's own package is imported first anyway
                continue
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in done:
                walk(nxt, path + [nxt], done)
        done.add(module)

    done: Set[str] = set()
    for module in sorted(GRAPH):
        walk(module, [module], done)
    assert cycles == []


@pytest.mark.parametrize("module", ["tome_export.recipe", "tome_export.schedule", "tome_export.bench.config",
                                    "tome_export.runtime", "tome_export.targets", "tome_export.inspection",
                                    "tome_export.serve",
                                    "tome_export.tuning.request", "tome_export.tuning.search"])
def test_data_layers_and_registries_import_no_torch_and_no_yaml(module):
    """Deployment-side tools and the registries run in a runtime-only install (no torch, no PyYAML; bench and tune
    read YAML configs by nature)."""
    code = (f"import sys, importlib; m = importlib.import_module({module!r}); "
            "getattr(m, 'targets', lambda: None)(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'yaml' not in sys.modules or m.__name__.split('.')[1] in ('bench', 'tuning'), 'yaml was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_function_over_60_lines():
    long = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_only_the_ray_executor_imports_ray():
    """Ray is an extra (``cluster``): one module imports it, and only when a cluster is asked for."""
    importers = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.append(_module_name(path))
    assert sorted(set(importers)) == ["tome_export.bench.ray_executor"]
