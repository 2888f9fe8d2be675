"""Get a Dask Client: a local cluster or an existing scheduler.

Every option of a local cluster is checked (:func:`check_local`) before
anything starts, so a bad one is one line, not a traceback from distributed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from fruitdask.cancel import StopToken
from fruitdask.config import ClusterSpec
from fruitdask.errors import ClusterError, InputError

__all__ = [
    "MIN_WORKER_MEMORY",
    "check_address",
    "check_local",
    "check_memory_limit",
    "check_scheduler",
    "connect",
    "dashboard_link",
    "exposure",
    "gather_as_completed",
    "local_layout",
    "n_threads",
    "warm_up",
]


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


#: The least a local worker may be given: an idle worker process holds ~240 MB
#: (distributed, pandas, pyarrow, OpenCV), distributed pauses it at 80% of its
#: limit, and a 1,000-image partition needs ~100 MB more; below this a run
#: would wait forever on a paused worker.
MIN_WORKER_MEMORY = 512 * 2**20


def check_memory_limit(value: Any) -> Any:
    """Dask's forms ("auto", a size like "4GiB", bytes, a fraction of the machine's
    memory), and at least :data:`MIN_WORKER_MEMORY`."""
    if value is None or value == "auto":
        return value
    from dask.utils import parse_bytes

    try:
        n = float(value) if isinstance(value, int | float) else parse_bytes(str(value))
    except (TypeError, ValueError):
        raise InputError(
            f"--memory-limit: expected 'auto' or a size like 4GiB, got {value!r}"
        ) from None
    if 0 < n <= 1:  # a fraction of the machine's memory
        import psutil

        n *= psutil.virtual_memory().total
    if n < MIN_WORKER_MEMORY:
        raise InputError(
            f"--memory-limit {value}: a worker needs at least {MIN_WORKER_MEMORY // 2**20} MiB "
            "(an idle worker holds ~240 MB and pauses at 80% of its limit)"
        )
    return value


def check_address(value: Any, what: str, port: bool) -> str | None:
    """A host (``port=False``) or ``[host]:port`` that a local cluster can bind;
    returns it with a bare port bound to loopback (``8799`` -> ``127.0.0.1:8799``)."""
    if value is None or value == "":
        return None
    text = str(value)
    host = text
    if port:
        host, sep, p = text.rpartition(":")
        if not sep:
            host, p = "", text
        if not p.isdigit() or int(p) > 65535:
            raise InputError(f"{what}: expected [host]:port, like 127.0.0.1:8787, got {text!r}")
        if not host:
            return f"127.0.0.1:{p}"
        if ":" in host:  # distributed's dashboard splits the address on ':'
            raise InputError(
                f"{what} {text}: an IPv6 address is not supported here; "
                f"give an IPv4 one, like 127.0.0.1:{p}"
            )
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if re.fullmatch(r"[0-9.]+", host):
            raise InputError(f"{what}: not an IP address: {host!r}") from None
        try:
            socket.getaddrinfo(host, None)
        except OSError:
            raise InputError(f"{what}: cannot resolve {host!r}") from None
    _check_bindable(host.strip("[]"), what)
    if not port and ":" in host and not host.startswith("["):
        return f"[{host}]"  # an IPv6 address: distributed needs it in brackets
    return text


def _check_bindable(host: str, what: str) -> None:
    """An address that is not this machine's cannot be bound: say so now, not
    as distributed's 70-line traceback after a minute of retries."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
    except OSError as exc:
        raise InputError(f"{what} {host}: cannot bind here ({exc.strerror or exc})") from None


def exposure(spec: ClusterSpec) -> str | None:
    """A warning line when the local scheduler or dashboard binds beyond loopback."""
    exposed = []
    for what, addr in (("scheduler", spec.host), ("dashboard", spec.dashboard_address)):
        host = str(addr or "127.0.0.1").rpartition(":")[0] if what == "dashboard" else str(addr)
        host = host.strip("[]") or "127.0.0.1"
        try:
            if not ipaddress.ip_address(host).is_loopback:
                exposed.append(f"the {what} on {host}")
        except ValueError:
            if host != "localhost":
                exposed.append(f"the {what} on {host}")
    if not exposed:
        return None
    return (f"warning: {' and '.join(exposed)} can be reached from the network, without "
            "authentication (the dashboard shows file names and can run code)")  # fmt: skip


def check_scheduler(address: str) -> str:
    """A scheduler address distributed can dial (``tcp://host:8786``), or an
    :class:`InputError` naming it (``tcp://`` used to be an internal error)."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme)
        host, port = parse_host_port(location)
        if not host or not 0 < int(port) <= 65535:
            raise ValueError("expected a host and a port between 1 and 65535")
    except (ValueError, TypeError) as exc:
        raise InputError(
            f"--cluster {address}: not a scheduler address like tcp://host:8786 "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    return address


def check_local(spec: ClusterSpec) -> ClusterSpec:
    """Validate a local cluster's options before anything starts; the spec with
    its addresses normalised."""
    from dataclasses import replace

    check_memory_limit(spec.memory_limit)
    host = check_address(spec.host, "--host", port=False)
    dashboard = check_address(spec.dashboard_address, "--dashboard-address", port=True)
    return replace(spec, host=host, dashboard_address=dashboard)


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
def connect(spec: ClusterSpec) -> Iterator[tuple[Any, float]]:
    """Yield ``(client, startup_seconds)`` for a local cluster or a running
    scheduler; the cluster is closed on exit, error or stop.

    (``ec2`` clusters come from :mod:`fruitdask.aws.ec2`; the CLI picks.)
    """
    t0 = time.perf_counter()
    if spec.kind == "local":
        with _local(check_local(spec)) as client:
            yield client, time.perf_counter() - t0
    elif "://" in spec.kind:
        from distributed import Client

        check_scheduler(spec.kind)
        try:
            client = Client(spec.kind, timeout=spec.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {spec.kind}: {exc}") from None
        try:
            yield client, time.perf_counter() - t0
        finally:
            client.close()
    else:
        raise InputError(f"--cluster {spec.kind}: not a local cluster or a scheduler address")


@contextlib.contextmanager
def _local(spec: ClusterSpec) -> Iterator[Any]:
    import dask
    from distributed import Client, LocalCluster

    n_workers, threads = local_layout(spec.workers, spec.threads_per_worker)
    settings = {
        "distributed.nanny.pre-spawn-environ": _SINGLE_THREAD_ENV,
        # One task per thread at a time, the rest queued on the scheduler: with
        # the default 1.1 a worker holds two ~0.5 s partitions, and the last
        # wave ends with one core idle while the other works through its queue.
        "distributed.scheduler.worker-saturation": 1.0,
    }
    with dask.config.set(settings), warnings.catch_warnings():
        # A busy dashboard port: distributed picks another and warns in 4 lines;
        # the CLI prints the address actually used.
        warnings.filterwarnings("ignore", message=".*[Pp]ort .* is already in use")
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            memory_limit=spec.memory_limit,
            host=spec.host,
            dashboard_address=spec.dashboard_address,
            silence_logs=40,
        )
    try:
        with Client(cluster) as client:
            warm_up(client)
            try:
                yield client
            except BaseException:
                # Leaving mid-run (a stop, an error): the in-process scheduler
                # logs CRITICAL tracebacks about the client's closed comm while it
                # winds down; the CLI says what happened in one line.
                logging.getLogger("distributed").setLevel(logging.CRITICAL + 1)
                raise
    finally:
        cluster.close()


def n_threads(client) -> int:
    """Worker threads of the cluster behind ``client`` (at least 1)."""
    return max(1, sum(client.nthreads().values()))


def gather_as_completed(
    client, futures: list, stop: StopToken, on_result: Callable[[int, Any], None] | None = None
) -> list[Any]:
    """Results of ``futures`` in their order, handled as they finish; a stop
    request cancels them all and raises :class:`Cancelled`."""
    from distributed import as_completed

    unregister = stop.on_stop(lambda: client.cancel(futures, force=True))
    index_of = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    try:
        for fut in as_completed(futures):
            stop.check()
            try:
                value = fut.result()
            except Exception:
                stop.check()  # a future cancelled by the stop: say so, not "cancelled"
                raise
            i = index_of[fut.key]
            results[i] = value
            if on_result is not None:
                on_result(i, value)
        stop.check()
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        unregister()
    return results
