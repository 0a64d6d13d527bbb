"""The executor a ``--cluster`` value asks for: this process (none), or Ray (:mod:`.ray_executor`, imported only
then, so that an install without the ``cluster`` extra never needs Ray)."""

from __future__ import annotations

from typing import Callable, Optional

from .executors import Executor, check_cluster


def open_executor(cluster: Optional[str], log: Callable[[str], None] = lambda msg: None) -> Executor:
    """In this process (``cluster`` None) or on the Ray cluster ``cluster`` names (see
    :data:`~.executors.CLUSTER_HELP`)."""
    check_cluster(cluster)
    if cluster is None:
        return Executor()
    from .ray_executor import RayExecutor

    return RayExecutor(cluster, log)
