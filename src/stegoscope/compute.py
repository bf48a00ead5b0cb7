"""Where dask work runs: the local threaded scheduler, a local dask.distributed cluster, or a
running cluster at ``tcp://host:port``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dask

SCHEDULERS = ("threads", "synchronous", "local-cluster")


@contextmanager
def dask_scheduler(spec: str = "threads", workers: int = 2) -> Iterator[None]:
    """Run the ``.compute()`` calls inside on ``spec``.

    ``local-cluster`` starts a LocalCluster of ``workers`` processes (one thread each) for the
    duration; ``tcp://…`` connects to a running scheduler. The workers must see the cache path.
    """
    if spec in ("threads", "synchronous"):
        with dask.config.set(scheduler=spec):
            yield
        return
    from dask.distributed import Client, LocalCluster

    if spec == "local-cluster":
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            with Client(cluster):
                yield
        return
    if spec.startswith(("tcp://", "tls://", "ucx://")):
        with Client(spec):
            yield
        return
    raise ValueError(f"--scheduler must be one of {SCHEDULERS} or a tcp:// address, not {spec!r}")


def distributed_workers() -> int:
    """Worker threads of the active dask.distributed client (0: none is active)."""
    try:
        from dask.distributed import get_client

        return sum(get_client().nthreads().values())
    except (ImportError, ValueError):
        return 0
