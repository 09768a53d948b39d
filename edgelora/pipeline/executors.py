"""Who runs the cells: local worker processes (``--jobs N``, the default) or Ray tasks (``--executor ray``, on the
cluster at ``--ray-address``, or a local one). Both run :func:`cells.run_cell` on the same job dicts; the build
hands them one stage at a time (a stage's cells depend only on earlier stages)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from ..errors import EdgeloraError
from .cells import run_cell

Job = dict[str, Any]


class LocalExecutor:
    """``jobs`` worker processes (spawned: a forked torch is not safe), started on the first cell to build and
    kept for the stages after it."""

    name = "local"

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.pool: ProcessPoolExecutor | None = None

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        futures = {self.pool.submit(run_cell, job): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class RayExecutor:
    """Each cell a Ray task of one CPU. The cache and the pipeline's files must be at the same paths on every
    node (a shared file system); ``address=None`` starts a local Ray instance of ``jobs`` CPUs."""

    name = "ray"

    def __init__(self, jobs: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise EdgeloraError("--executor ray needs Ray: pip install 'edgelora[ray]'") from None
        self.ray = ray
        if address:
            probe_ray_address(address)
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # Ray raises many kinds (ConnectionError, RuntimeError, ValueError)
            raise EdgeloraError(f"cannot start or reach Ray ({type(exc).__name__}: {str(exc)[:200]}); check "
                                "--ray-address (ray://HOST:10001 or auto)") from None
        self.remote = ray.remote(num_cpus=1)(run_cell)

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, dict[str, Any]]]:
        refs = {self.remote.remote(job): job for job in jobs}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield refs[done[0]], self.ray.get(done[0])

    def close(self) -> None:
        self.ray.shutdown()


PROBE_SECONDS = 5.0


def probe_ray_address(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Refuse an address nothing listens on within ``timeout`` seconds: ``ray.init`` retries an unreachable
    cluster for minutes before it gives up. ``HOST:PORT`` (a cluster's GCS, default port 6379) and
    ``ray://HOST[:PORT]`` (Ray Client, default 10001) are probed with one TCP connect; ``auto`` and ``local``
    (resolved by Ray itself) are passed through."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    client = address.startswith("ray://")
    try:
        parts = urlsplit(address if client else f"//{address}")
        host, port, path = parts.hostname, parts.port or (10001 if client else 6379), parts.path
    except ValueError:  # a port that is not a number
        host, port, path = None, None, ""
    if not host or (path and not client):
        raise EdgeloraError(f"--ray-address {address!r:.80} is not HOST:PORT, ray://HOST:PORT, auto or local")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise EdgeloraError(f"--ray-address {address}: nothing answers at {host}:{port} within {timeout:g} s "
                            f"({exc.strerror or type(exc).__name__}); start the cluster (ray start --head) or "
                            "fix the address") from None


def make_executor(kind: str, jobs: int, address: str | None) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor(jobs)
    if kind == "ray":
        return RayExecutor(jobs, address)
    raise EdgeloraError(f"--executor {kind}: use local or ray")


Runner = Callable[[Sequence[Job]], Iterator[tuple[Job, dict[str, Any]]]]
