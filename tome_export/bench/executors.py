"""Where ``bench`` and ``tune`` run their work: in this process (the default) or on a Ray cluster (``--cluster``).

The harness and the tuner cut their work into :class:`Job` s (a timing group of a benchmark, a candidate's build and
quality pass, the final timing of a tuning run), hand them to an :class:`Executor` and take back each one's
:class:`Outcome`. A job is a module-level function and picklable arguments, so it runs the same in this process and
on a cluster's worker; what it returns is plain data (records, figures, checksums), never an artifact: artifacts stay
on the node that built them.

Two rules keep the measurements honest on a cluster. An *exclusive* job (one that times) holds a whole node: every
node offers one unit of the resource :data:`NODE_RESOURCE`, an exclusive job takes all of it, a shared job (a build)
a sliver, so no timing shares a node with another job of ours. And a job that ``follows`` another runs on that one's
node when it can, where the other's builds already are.

Ray is imported by :mod:`.ray_executor` alone, and only when a cluster is asked for (:func:`.cluster.open_executor`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..errors import UserError

NODE_RESOURCE = "tome_export_node"  # each node offers 1: an exclusive job takes it all
INSTALL_HINT = "pip install 'tome-export[cluster]'"
CLUSTER_CHOICES = ("ray", "auto", "ray://HOST:PORT", "HOST:PORT")
CLUSTER_HELP = ("run the work on Ray: 'ray' starts a local Ray for this run; 'auto' joins the cluster this machine "
                "belongs to; 'ray://HOST:PORT' (Ray Client) or 'HOST:PORT' (a head's GCS address) join that cluster. "
                f"Each node must offer the resource {NODE_RESOURCE} (ray start --resources "
                f"'{{\"{NODE_RESOURCE}\": 1}}') and have tome-export installed")


@dataclass(frozen=True)
class Job:
    """One unit of work: ``fn(*args)`` somewhere, its result sent back."""

    key: str  # unique within a run
    fn: Callable[..., Any]  # a module-level function: it travels to a cluster's workers by name
    args: Tuple[Any, ...]
    exclusive: bool = False  # holds its node alone (it times something)
    follows: Optional[str] = None  # run after the job with this key, on its node when possible (its builds are there)
    label: str = ""  # what progress lines call it


@dataclass
class Outcome:
    """What came back from a job: its value, or why it has none; and where it ran."""

    value: Any = None
    error: Optional[str] = None  # the job raised or its worker died (after the executor's retries)
    node: Dict[str, Any] = field(default_factory=dict)  # executor facts: host, Ray node id


class Executor:
    """Runs jobs in this process, one after another, in the order they were submitted.

    A job submitted here runs when its result is asked for (:meth:`result`) or when :meth:`completed` reaches it,
    so a job submitted only in case it is needed (a tuner's look-ahead) costs nothing unless it is. Exceptions
    propagate, as they did before there were executors.
    """

    kind = "in-process"

    def __init__(self) -> None:
        self._queue: List[Job] = []
        self._done: Dict[str, Outcome] = {}

    @property
    def capacity(self) -> int:
        """How many exclusive jobs can run at once."""
        return 1

    def spare(self) -> int:
        """How many more jobs would start now rather than wait (look-ahead is only worth it when > 0)."""
        return 0

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def pending(self) -> int:
        """Jobs submitted and not yet handed back."""
        return len(self._queue)

    def submitted(self, key: str) -> bool:
        """Whether the job ``key`` was submitted (or has run) already."""
        return key in self._done or any(j.key == key for j in self._queue)

    def result(self, job: Job) -> Outcome:
        """The outcome of ``job`` (submitted before or not), waiting for it."""
        if job.key not in self._done:
            self._queue = [j for j in self._queue if j.key != job.key]
            self._done[job.key] = Outcome(job.fn(*job.args))
        return self._done[job.key]

    def completed(self) -> Iterator[Tuple[Job, Outcome]]:
        """Every submitted job's outcome as it finishes (here: in submission order)."""
        while self._queue:
            job = self._queue[0]
            yield job, self.result(job)

    def cancel_pending(self) -> None:
        """Forget the jobs not yet handed back (a look-ahead that was not needed)."""
        self._queue.clear()

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind}

    def close(self) -> None:
        self.cancel_pending()

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_cluster(cluster: Optional[str]) -> None:
    """A ``--cluster`` value names Ray and Ray is installed; checked before any slow work."""
    if cluster is None:
        return
    if not (cluster in ("ray", "auto") or cluster.startswith("ray://") or _host_port(cluster)):
        raise UserError(f"--cluster {cluster!r}: give one of {', '.join(CLUSTER_CHOICES)}")
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        found = False
    if not found:
        raise UserError(f"--cluster needs Ray, which is not installed: {INSTALL_HINT}")


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit()
