"""A real two-node Ray cluster on this machine, shared by the session's cluster tests (``ray_cluster``).

A head and a second node, each its own ``ray start --block`` process with one CPU and one unit of the node resource
the executor schedules by. Both advertise the loopback address 127.0.0.2: Ray 2.60 turns 127.0.0.1 into the
machine's network address for a cluster of more than one node (and refuses a second node in its loopback-only mode),
while any other loopback address is kept. Ray's servers still listen on every interface in cluster mode, so the
cluster takes a token made for the session (token authentication). Workers import the package under test and find
the small digits model where ``small_digits`` trained it. Teardown kills the processes the fixture started (each
node runs in a session of its own) and nothing else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

import tome_export
from tome_export.bench.executors import NODE_RESOURCE

HOST = "127.0.0.2"
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> List[str]:
    """Every port a node opens, chosen free, so two nodes on one machine never collide."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [arg for name in names for arg in (name, str(free_port()))]


@dataclass
class RayCluster:
    address: str  # the head's GCS address (a driver on this machine)
    client: str  # ray://HOST:PORT (Ray Client)
    env: Dict[str, str]  # what a driver needs: the token, the package under test, the digits cache
    temp_dir: Path
    nodes: List[subprocess.Popen] = field(default_factory=list)

    def processes(self) -> Dict[int, str]:
        """pid -> command line of every live process the cluster's nodes started (their sessions)."""
        sessions = {p.pid for p in self.nodes}
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getsid(int(entry.name)) in sessions:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except (OSError, ProcessLookupError):
                continue
        return found

    def workers_running(self, title: str) -> List[int]:
        """The cluster's worker processes whose title starts with ``ray::TITLE`` (a job running now)."""
        return [pid for pid, cmd in self.processes().items() if cmd.startswith(f"ray::{title}")]

    def stop(self) -> None:
        for _ in range(3):  # a worker may be starting while we kill: look again
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        for node in self.nodes:
            node.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start_node(args: List[str], env: Dict[str, str], log: Path) -> subprocess.Popen:
    common = ["--block", "--node-ip-address", HOST, "--num-cpus", "1", "--resources",
              json.dumps({NODE_RESOURCE: 1}), "--disable-usage-stats", "--temp-dir", str(log.parent)]
    return subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", *args, *common, *_node_ports()],
                            env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for_port(cluster: RayCluster, port: int) -> None:
    """The head answers (the second node gives up if it does not, soon)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and cluster.nodes[0].poll() is None:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)


def _wait_for_nodes(cluster: RayCluster, count: int) -> None:
    probe = (f"import ray; ray.init(address={cluster.address!r}, logging_level='ERROR'); "
             f"print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get({NODE_RESOURCE!r})))")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in cluster.nodes):
            break
        done = subprocess.run([sys.executable, "-c", probe], env=cluster.env, capture_output=True, text=True,
                              timeout=START_TIMEOUT_S)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1.0)
    logs = "\n".join(p.read_text()[-2000:] for p in cluster.temp_dir.glob("*.log"))
    cluster.stop()
    raise RuntimeError(f"the Ray test cluster did not come up with {count} nodes:\n{logs}")


@pytest.fixture(scope="session")
def ray_cluster(small_digits) -> Iterator[RayCluster]:
    """A head and a second node on this machine (one CPU each); stopped when the session ends."""
    pytest.importorskip("ray")
    temp = Path(tempfile.mkdtemp(prefix="tray", dir="/tmp"))  # Ray's socket paths must stay short
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    package_root = str(Path(tome_export.__file__).resolve().parents[1])
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_enable_metrics_collection": "0", "XDG_CACHE_HOME": str(small_digits.xdg),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    port, client = free_port(), free_port()
    cluster = RayCluster(f"{HOST}:{port}", f"ray://{HOST}:{client}", env, temp)
    cluster.nodes.append(_start_node(["--head", "--port", str(port), "--ray-client-server-port", str(client),
                                      "--include-dashboard", "false", "--dashboard-port", str(free_port())],
                                     env, temp / "head.log"))
    try:
        _wait_for_port(cluster, port)
        cluster.nodes.append(_start_node(["--address", cluster.address], env, temp / "node2.log"))
        _wait_for_nodes(cluster, 2)
        yield cluster
    finally:
        cluster.stop()
