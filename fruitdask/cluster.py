"""Get a Dask Client: a local cluster, an existing scheduler, or EC2.

Optional heavy dependencies (dask-cloudprovider) are imported inside the
function that needs them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fruitdask.config import as_number, config_get

__all__ = ["ClusterError", "ClusterSpec", "connect", "dashboard_link", "local_layout"]


class ClusterError(Exception):
    """The cluster could not be started or reached (one-line message)."""


@dataclass(frozen=True)
class ClusterSpec:
    """Which cluster to use.

    ``kind`` is ``"local"``, a scheduler address (``tcp://host:port``,
    ``tls://...``) or ``"ec2"``.
    """

    kind: str = "local"
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = None
    host: str | None = None
    dashboard_address: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"threads per worker must be >= 1, got {self.threads_per_worker}")
        known = self.kind in ("local", "ec2") or "://" in self.kind
        if not known:
            raise ValueError(
                f"cluster must be 'local', 'ec2' or a scheduler address like tcp://host:8786, "
                f"got {self.kind!r}"
            )


def dashboard_link(client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing) is not an error
        return None


# Each worker runs one task per thread; BLAS/OpenMP thread pools inside it would
# oversubscribe the cores (OpenCV's is switched off in fruitdask.features).
_SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def local_layout(
    workers: int | None, threads: int | None, cores: int | None = None
) -> tuple[int, int]:
    """``(workers, threads per worker)`` of a local cluster on ``cores`` cores.

    Either given alone fills the cores with the other. With neither, two threads
    per worker when the cores are even: decode and ORB release the GIL (two
    threads in one process run the kernel 1.94x as fast as one), and every
    worker process costs ~2 s of CPU to start (imports) and its own memory, so
    on this project's 2-core machine one worker of two threads finishes the
    20,000-image job ~1 s sooner than two of one (benchmarks/compare.py).
    """
    cores = cores or os.cpu_count() or 1
    if workers is None and threads is None:
        threads = 2 if cores % 2 == 0 else 1
    if workers is None:
        workers = max(1, cores // int(threads or 1))
    if threads is None:
        threads = max(1, cores // int(workers))
    return int(workers), int(threads)


def _count(value: Any, what: str) -> int | None:
    if value is None:
        return None
    try:
        n = as_number(value, int, what)
    except ValueError:
        raise ClusterError(f"{what}: expected a positive integer, got {value!r}") from None
    if n < 1:
        raise ClusterError(f"{what}: expected a positive integer, got {value!r}")
    return n


def _memory_limit(value: Any) -> Any:
    """Dask's forms: "auto", a size ("4GiB"), bytes, or a fraction of the machine's memory."""
    if value is None or value == "auto" or isinstance(value, int | float):
        return value
    from dask.utils import parse_bytes

    try:
        parse_bytes(str(value))
    except (TypeError, ValueError):
        raise ClusterError(
            f"memory limit: expected 'auto' or a size like 4GiB, got {value!r}"
        ) from None
    return value


def _check_address(value: Any, what: str, port: bool) -> None:
    """A host (``port=False``) or ``[host]:port`` that a local cluster can bind."""
    if value is None or value == "":
        return
    text = str(value)
    host = text
    if port:
        host, sep, p = text.rpartition(":")
        if not sep:
            host, p = "", text
        if not p.isdigit() or int(p) > 65535:
            raise ClusterError(f"{what}: expected [host]:port, like 127.0.0.1:8787, got {text!r}")
    if not host:
        return
    try:
        ipaddress.ip_address(host.strip("[]"))
        return
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):
        raise ClusterError(f"{what}: not an IP address: {host!r}")
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        raise ClusterError(f"{what}: cannot resolve {host!r}") from None


# Imported once per worker at start-up, so the first partition of every worker
# does not pay ~0.5 s of imports inside the timed extraction.
_WARM_MODULES = ("cv2", "pyarrow.parquet", "fruitdask.pipeline")


def _import_modules(names: tuple[str, ...]) -> None:
    import importlib
    import signal
    import threading

    for name in names:
        importlib.import_module(name)
    # Ctrl-C in a terminal signals the whole process group: the client closes the
    # cluster; a worker that also took the SIGINT would print a traceback on the way.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def warm_up(client) -> None:
    """Import the job's modules on every worker (part of start-up, not of the job);
    local workers leave SIGINT to the client."""
    client.run(_import_modules, _WARM_MODULES)


@contextlib.contextmanager
def connect(spec: ClusterSpec, timeout: float | None = None) -> Iterator[tuple[Any, float]]:
    """Yield ``(client, startup_seconds)``; the cluster is closed on exit, error or Ctrl-C.

    ``timeout``: seconds to wait for an existing scheduler (``cluster.connect-timeout``).
    """
    timeout = float(config_get("cluster.connect-timeout", timeout))
    from distributed import Client

    t0 = time.perf_counter()
    if spec.kind == "local":
        import dask
        from distributed import LocalCluster

        n_workers, threads = local_layout(
            _count(config_get("cluster.workers", spec.workers), "workers"),
            _count(config_get("cluster.threads-per-worker", spec.threads_per_worker), "threads"),
        )
        memory_limit = _memory_limit(config_get("cluster.memory-limit", spec.memory_limit))
        host = config_get("cluster.host", spec.host)
        dashboard = config_get("cluster.dashboard-address", spec.dashboard_address)
        _check_address(host, "host", port=False)
        _check_address(dashboard, "dashboard address", port=True)
        settings = {
            "distributed.nanny.pre-spawn-environ": _SINGLE_THREAD_ENV,
            # One task per thread at a time, the rest queued on the scheduler: with
            # the default 1.1 a worker holds two ~0.5 s partitions, and the last
            # wave ends with one core idle while the other works through its queue.
            "distributed.scheduler.worker-saturation": 1.0,
        }
        with dask.config.set(settings):
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads,
                processes=True,
                memory_limit=memory_limit,
                host=host,
                dashboard_address=dashboard,
                silence_logs=40,
            )
        try:
            with Client(cluster) as client:
                warm_up(client)
                try:
                    yield client, time.perf_counter() - t0
                except BaseException:
                    # Leaving mid-run (Ctrl-C, SIGTERM, an error): the in-process
                    # scheduler logs CRITICAL tracebacks about the client's closed
                    # comm while it winds down; the CLI says what happened in one line.
                    logging.getLogger("distributed").setLevel(logging.CRITICAL + 1)
                    raise
        finally:
            cluster.close()
    elif spec.kind == "ec2":
        from fruitdask.aws.ec2 import ec2_cluster

        with ec2_cluster(spec) as cluster, Client(cluster) as client:
            yield client, time.perf_counter() - t0
    else:
        try:
            client = Client(spec.kind, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {spec.kind}: {exc}") from None
        try:
            yield client, time.perf_counter() - t0
        finally:
            client.close()
