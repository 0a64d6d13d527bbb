"""A real ``tritonserver`` for the tests: found in the ``nvidia-pytriton`` wheel, run on loopback ports, always stopped.

Where the server comes from, first match wins: ``$TOME_EXPORT_TRITON`` (a ``pip install --target`` directory),
``.triton/`` in the repository (what ``.ci/run`` installs), or an installed ``pytriton`` package. The wheel ships
Python-backend stubs per Python version; the one for the running Python is copied into a private backend
directory, and the stub's embedded interpreter uses this test run's environment (its ``python`` first on PATH).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import List, Optional, Tuple

from . import REPO_ROOT
INSTALL = 'pip install --no-deps --target .triton "nvidia-pytriton==0.7.0" (as .ci/run does)'


def triton_home() -> Tuple[Optional[Path], str]:
    """(directory holding ``pytriton/tritonserver``, '') or (None, why not)."""
    candidates = [Path(os.environ["TOME_EXPORT_TRITON"])] if os.environ.get("TOME_EXPORT_TRITON") else []
    candidates.append(REPO_ROOT / ".triton")
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]).parent)
    for home in candidates:
        if (home / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file():
            stub = stub_path(home)
            if not stub.is_file():
                return None, f"the nvidia-pytriton wheel in {home} has no Python backend stub for Python {_version()}"
            return home, ""
    return None, f"no tritonserver found (looked in {', '.join(map(str, candidates))}): {INSTALL}"


def _version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def stub_path(home: Path) -> Path:
    return home / "pytriton" / "tritonserver" / "python_backend_stubs" / _version() / "triton_python_backend_stub"


def free_ports(count: int) -> List[int]:
    """Ports the kernel reports free on 127.0.0.1 (released just before the server binds them)."""
    sockets = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class TritonServer:
    """``with TritonServer(home, repository, workdir) as server: server.url`` -- stopped on exit, even on failure."""

    def __init__(self, home: Path, repository: Path, workdir: Path, start_timeout: float = 180.0) -> None:
        self.home, self.repository, self.workdir = Path(home), Path(repository), Path(workdir)
        self.start_timeout = start_timeout
        self.process: Optional[subprocess.Popen] = None
        self.log_path = self.workdir / "tritonserver.log"
        self.http_port = 0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _backends(self) -> Path:
        """A backend directory with the wheel's Python backend and the stub for this Python."""
        backends = self.workdir / "backends"
        shutil.copytree(self.home / "pytriton" / "tritonserver" / "backends" / "python", backends / "python",
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        shutil.copy2(stub_path(self.home), backends / "python" / "triton_python_backend_stub")
        return backends

    def _command(self, grpc_port: int) -> List[str]:
        return [str(self.home / "pytriton" / "tritonserver" / "bin" / "tritonserver"),
                "--model-repository", str(self.repository), "--backend-directory", str(self._backends()),
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port), "--allow-metrics", "false",
                "--disable-auto-complete-config", "--exit-on-error", "true", "--strict-readiness", "true",
                "--exit-timeout-secs", "5"]

    def _environment(self) -> dict:
        env = dict(os.environ)
        # the stub's RPATH points into the wheel; a copied stub finds the wheel's libraries through this
        libs = str(self.home / "nvidia_pytriton.libs")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, env.get("LD_LIBRARY_PATH")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def start(self) -> "TritonServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, grpc_port = free_ports(2)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self._command(grpc_port), stdout=log, stderr=subprocess.STDOUT,
                                            env=self._environment(), start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and its backend stubs: our own group
            self.process.wait(timeout=10)

    def __enter__(self) -> "TritonServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


@functools.lru_cache(maxsize=None)  # protobuf registers a schema file once per process
def model_config_schema():
    """Triton's ``ModelConfig`` protobuf message class, from the ``tritonclient`` package.

    Loaded from its file: ``tritonclient.grpc``'s package init imports grpcio, which the schema does not need.
    Returns None when tritonclient is not installed.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelConfig


def parse_model_config(text: str):
    """``config.pbtxt`` parsed strictly (unknown fields or enum values raise) into Triton's ModelConfig."""
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_schema()())
