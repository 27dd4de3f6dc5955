"""Running the points of a sweep: in this process, on local worker processes, or on a
dask.distributed cluster (the ``dist`` extra).  Every point carries its own seed, so the
records do not depend on the executor."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from mmuemu.errors import ConfigError

__all__ = ["EXECUTORS", "check_executor", "map_points"]

T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("local", "dask", "dask://HOST:PORT")
#: seconds to wait for an existing dask scheduler
CONNECT_TIMEOUT_S = 10.0


def check_executor(executor: str, jobs: int) -> None:
    """A ConfigError unless ``executor`` and ``jobs`` are usable."""
    if executor not in ("local", "dask") and not executor.startswith("dask://"):
        raise ConfigError(f"--executor {executor!r}: allowed: {', '.join(EXECUTORS)}")
    if executor.startswith("dask://") and ":" not in executor[len("dask://"):]:
        raise ConfigError(f"--executor {executor!r}: give the scheduler as dask://HOST:PORT")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"--jobs {jobs!r}: a positive number of workers")


def _bar(total: int, progress: bool) -> Any:
    from tqdm import tqdm

    show = progress and total > 1 and sys.stderr.isatty()
    return tqdm(total=total, disable=not show, unit="point", file=sys.stderr,
                leave=False, dynamic_ncols=True)


def map_points(fn: Callable[[T], R], items: Sequence[T], *, executor: str = "local", jobs: int = 1,
               progress: bool = False) -> list[R]:
    """``[fn(x) for x in items]``, run by ``executor``, in the order of ``items``."""
    check_executor(executor, jobs)
    if executor == "local":
        return _local(fn, items, jobs, progress)
    return _dask(fn, items, executor, jobs, progress)


def _local(fn: Callable[[T], R], items: Sequence[T], jobs: int, progress: bool) -> list[R]:
    with _bar(len(items), progress) as bar:
        if jobs == 1 or len(items) < 2:
            out = []
            for x in items:
                out.append(fn(x))
                bar.update()
            return out
        with ProcessPoolExecutor(max_workers=min(jobs, len(items))) as pool:
            futures = [pool.submit(fn, x) for x in items]
            for f in futures:
                f.add_done_callback(lambda _: bar.update())
            return [f.result() for f in futures]


def _dask(fn: Callable[[T], R], items: Sequence[T], executor: str, jobs: int, progress: bool) -> list[R]:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError("--executor dask needs dask.distributed: pip install 'mmuemu[dist]'") from None
    cluster = None
    if executor == "dask":
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
        client = Client(cluster)
    else:
        address = "tcp://" + executor[len("dask://"):]
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            raise ConfigError(f"--executor {executor}: cannot reach the scheduler ({e})") from None
    try:
        futures = client.map(fn, list(items), pure=False)
        with _bar(len(items), progress) as bar:
            for _ in as_completed(futures):
                bar.update()
        return list(client.gather(futures))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
