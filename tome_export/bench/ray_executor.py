"""The Ray executor: jobs as Ray tasks, on a local Ray started for the run or on an existing cluster.

The only module of the package that imports Ray (it is an extra: ``tome-export[cluster]``). Scheduling is Ray's:
every node offers one unit of :data:`~.executors.NODE_RESOURCE`; an exclusive job (a timing) asks for all of it, a
shared one (a build) for a sliver, so a timing never shares its node with another job of ours. A job that follows
another goes to that one's node when it is still there (soft node affinity). A worker that dies mid-job is
replaced and the job run again (Ray's task retries, :data:`RETRIES`); a job that raises is not retried (it would
raise again) and comes back as an :class:`~.executors.Outcome` with its error.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .._version import __version__
from ..errors import UserError
from .executors import NODE_RESOURCE, Executor, Job, Outcome

RETRIES = 3  # runs of a job after its worker died (the node died, it was killed, it ran out of memory)
SHARE = 0.001  # of a node's NODE_RESOURCE that a shared job holds: up to 1000 builds, never beside a timing


def _call(fn: Callable[..., Any], args: Tuple[Any, ...]) -> Tuple[Any, Dict[str, Any]]:
    """What runs on the worker: the job, and where it ran."""
    node = {"host": socket.gethostname(), "ray_node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(), "tool_version": __version__}
    return fn(*args), node


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class RayExecutor(Executor):
    kind = "ray"

    def __init__(self, cluster: str, log: Callable[[str], None] = lambda msg: None) -> None:
        super().__init__()
        started = time.perf_counter()
        self.cluster, self.log = cluster, log
        self.started_here = cluster == "ray"
        self._refs: Dict[Any, Job] = {}  # launched, not yet collected
        self._waiting: Dict[str, List[Job]] = {}  # followers of a job not yet done
        self._connect()
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(NODE_RESOURCE, 0) >= 1]
        if not nodes:
            self.close()
            raise UserError(f"no node of the Ray cluster at {cluster!r} offers the resource {NODE_RESOURCE}: start "
                            f"each node with ray start --resources '{{\"{NODE_RESOURCE}\": 1}}'")
        self.nodes = [{"ray_node_id": n["NodeID"], "address": n.get("NodeManagerAddress"),
                       "cpus": n["Resources"].get("CPU", 0)} for n in nodes]
        self._cpus = int(sum(n["cpus"] for n in self.nodes)) or len(nodes)
        self._remote = ray.remote(_call)
        self.start_seconds = round(time.perf_counter() - started, 3)  # connecting (and starting a local Ray)
        log(f"Ray {ray.__version__}: {len(nodes)} node(s) with {NODE_RESOURCE}, {self._cpus} CPUs "
            f"(ready in {self.start_seconds:.1f} s)")

    def _connect(self) -> None:
        options: Dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        try:
            if self.started_here:
                ray.init(num_cpus=os.cpu_count() or 1, resources={NODE_RESOURCE: 1}, include_dashboard=False,
                         **options)
            else:
                ray.init(address=self.cluster, **options)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            raise UserError(f"--cluster {self.cluster}: cannot start or reach Ray ({_first_line(exc)}): check the "
                            f"address, or start a cluster with ray start --head") from None

    @property
    def capacity(self) -> int:
        return len(self.nodes)

    def spare(self) -> int:
        return max(0, self._cpus - len(self._refs))

    def pending(self) -> int:
        return len(self._refs) + sum(len(v) for v in self._waiting.values())

    def submitted(self, key: str) -> bool:
        return (key in self._done or any(j.key == key for j in self._refs.values())
                or any(j.key == key for followers in self._waiting.values() for j in followers))

    def submit(self, job: Job) -> None:
        if self.submitted(job.key):
            return
        if job.follows is not None and job.follows not in self._done:
            self._waiting.setdefault(job.follows, []).append(job)
            return
        before = self._done.get(job.follows) if job.follows else None
        self._launch(job, near=before.node.get("ray_node_id") if before is not None and before.error is None else None)

    def _launch(self, job: Job, near: Optional[str]) -> None:
        options: Dict[str, Any] = {"num_cpus": 1, "resources": {NODE_RESOURCE: 1.0 if job.exclusive else SHARE},
                                   "max_retries": RETRIES, "retry_exceptions": False, "name": job.label or job.key}
        if near is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=near, soft=True)
        self._refs[self._remote.options(**options).remote(job.fn, job.args)] = job

    def _collect(self, ref: Any) -> Tuple[Job, Outcome]:
        job = self._refs.pop(ref)
        try:
            value, node = ray.get(ref)
            outcome = Outcome(value, node=node)
            if node.get("tool_version") != __version__:
                outcome = Outcome(error=f"node {node.get('host')} runs tome-export {node.get('tool_version')} and "
                                        f"this machine {__version__}: install the same version on every node",
                                  node=node)
        except ray.exceptions.RayTaskError as exc:  # the job raised: a retry would raise again
            outcome = Outcome(error=_first_line(exc.cause if exc.cause is not None else exc))
        except ray.exceptions.RayError as exc:  # its worker or node died RETRIES + 1 times
            outcome = Outcome(error=f"its worker died {RETRIES + 1} times ({_first_line(exc)})")
        self._done[job.key] = outcome
        for follower in self._waiting.pop(job.key, []):
            self._launch(follower, outcome.node.get("ray_node_id") if outcome.error is None else None)
        return job, outcome

    def result(self, job: Job) -> Outcome:
        if job.key not in self._done:
            if job.follows is not None and job.follows not in self._done:
                raise ValueError(f"job {job.key} follows {job.follows}, which has not run")
            self.submit(job)
            ref = next(r for r, j in self._refs.items() if j.key == job.key)
            self._collect(ref)
        return self._done[job.key]

    def completed(self) -> Iterator[Tuple[Job, Outcome]]:
        while self._refs:
            ready, _ = ray.wait(list(self._refs), num_returns=1)
            yield self._collect(ready[0])

    def cancel_pending(self) -> None:
        for ref in list(self._refs):
            ray.cancel(ref, force=True, recursive=True)
        self._refs.clear()
        self._waiting.clear()

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "cluster": self.cluster, "started_here": self.started_here,
                "ray_version": ray.__version__, "nodes": self.nodes, "retries": RETRIES,
                "start_seconds": self.start_seconds}

    def close(self) -> None:
        if ray.is_initialized():
            self.cancel_pending()
            ray.shutdown()
