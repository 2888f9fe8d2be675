"""Get a Dask Client: a local cluster or an existing scheduler.

Every option of a local cluster is checked (:func:`check_local`) before
anything starts, so a bad one is one line, not a traceback from distributed.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from fruitdask.cancel import StopToken
from fruitdask.config import ClusterSpec
from fruitdask.errors import ClusterError, InputError, one_line

__all__ = [
    "MIN_WORKER_MEMORY",
    "MemoryWatch",
    "STRICT_PACKAGES",
    "WAIT_FOR_WORKERS_S",
    "check_address",
    "check_local",
    "check_memory_limit",
    "check_remote_paths",
    "check_scheduler",
    "check_versions",
    "connect",
    "dashboard_link",
    "exposure",
    "gather_as_completed",
    "is_remote",
    "local_layout",
    "n_threads",
    "package_files",
    "package_fingerprint",
    "usage",
    "warm_up",
]


#: With ``--workers N`` and a scheduler address, how long to wait for N workers.
WAIT_FOR_WORKERS_S = 600.0


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

    Either given alone fills the cores with the other. With neither, one
    single-threaded worker process per core. Decode and ORB release the GIL, but
    the Python around them (reading, rows, Arrow) does not: on this project's
    2-core machine, 20,000 images extract in 3.5 s on two workers of one thread
    and in 4.8 s on one worker of two threads, which outweighs the ~0.4 s more
    CPU a second worker process costs to start (whole command 7.0-7.3 s against
    7.5-7.7 s).
    """
    cores = cores or os.cpu_count() or 1
    if workers is None and threads is None:
        threads = 1
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


def check_scheduler(spec: ClusterSpec) -> None:
    """A scheduler address distributed can dial (``tcp://host:8786``) and that
    answers one TCP connection, checked before the input is listed: a typo is
    one line, at once (``tcp://`` alone used to be an internal error)."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    address = spec.kind
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
    try:
        socket.create_connection((host.strip("[]"), int(port)), spec.connect_timeout).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address}: {exc.strerror or exc}"
        ) from None


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

        check_scheduler(spec)
        try:
            client = Client(spec.kind, timeout=spec.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"cannot reach the Dask scheduler at {spec.kind}: {exc}") from None
        try:
            if spec.workers:  # a scheduler whose workers are still starting (EMR)
                try:
                    client.wait_for_workers(spec.workers, timeout=WAIT_FOR_WORKERS_S)
                except TimeoutError:
                    raise ClusterError(
                        f"{spec.kind}: fewer than {spec.workers} workers after "
                        f"{WAIT_FOR_WORKERS_S:.0f}s"
                    ) from None
            check_versions(client)
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


class MemoryWatch:
    """Watches the workers' memory while a command waits on them.

    A worker whose memory passes distributed's pause threshold (80% of its
    limit by default) stops running tasks until it falls back, and a run that
    waits on it may wait for good. One paused for ``patience`` seconds in a row
    stops the run (:meth:`StopToken.fail` with a :class:`ClusterError` naming
    it, then the stop's cancel callbacks); :meth:`note` is the memory pressure
    for the progress line. Polls the scheduler every ``every`` seconds (one
    small request), in a thread, from ``__enter__`` to ``__exit__``.
    """

    def __init__(self, client, stop: StopToken, patience: float, every: float = 1.0) -> None:
        self.client, self.stop, self.patience, self.every = client, stop, patience, every
        self.paused_since: dict[str, float] = {}
        self.pressure = ""
        self.polls = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fruitdask-memory", daemon=True)

    def __enter__(self) -> MemoryWatch:
        if self._poll():  # the first at once: the progress line has its note from the start
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def note(self) -> str:
        """e.g. ``memory: busiest worker at 63% of its limit``; ``""`` before a poll."""
        return self.pressure

    def _watch(self) -> None:
        while not self._done.wait(self.every) and self._poll():
            pass

    def _poll(self) -> bool:
        """One look; False when there is nothing more to watch."""
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:  # noqa: BLE001 - a closing client: the run says why
            return self.client.status not in ("closing", "closed")
        self.polls += 1
        error = self.check(workers, time.monotonic())
        if error is not None:
            self.stop.fail(error)
            self.stop.fire()
            return False
        return True

    def check(self, workers: Mapping[str, Any], now: float) -> ClusterError | None:
        """Update the pressure note from the scheduler's ``workers`` info; the
        error to stop with when one has been paused ``patience`` s."""
        import dask

        busiest, paused = 0.0, []
        for address, w in workers.items():
            limit = float(w.get("memory_limit") or 0)
            used = float((w.get("metrics") or {}).get("memory") or 0)
            if limit:
                busiest = max(busiest, used / limit)
            if w.get("status") == "paused":
                paused.append(
                    (address, now - self.paused_since.setdefault(address, now), used, limit)
                )
            else:
                self.paused_since.pop(address, None)
        self.pressure = f"memory: busiest worker at {busiest:.0%} of its limit" + (
            f", {len(paused)} paused" if paused else ""
        )
        for address, held, used, limit in paused:
            if held >= self.patience:
                pause = dask.config.get("distributed.worker.memory.pause", 0.8)
                return ClusterError(
                    f"worker {address} has been paused for {held:.0f} s: its memory "
                    f"({used / 2**20:,.0f} MiB) is over the pause threshold ({pause:.0%} "
                    f"of its {limit / 2**20:,.0f} MiB limit), so it runs nothing; give "
                    "workers more memory (--memory-limit) or fewer threads each, or "
                    "raise --pause-timeout"
                )
        return None


# ---------------------------------------------------------------- remote clusters
def _this_machine() -> set[str]:
    import psutil

    found = {"127.0.0.1", "::1"}
    for addresses in psutil.net_if_addrs().values():
        found.update(a.address.split("%")[0] for a in addresses if a.family in
                     (socket.AF_INET, socket.AF_INET6))  # fmt: skip
    return found


def is_remote(kind: str) -> bool:
    """True when the workers of ``--cluster kind`` may run on another machine:
    ``ec2``, or a scheduler address that does not resolve to this one."""
    if kind == "local":
        return False
    if "://" not in kind:
        return True
    host = urlsplit(kind).hostname
    if not host:
        return True
    try:
        resolved = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return True
    mine = _this_machine()
    return not all(ipaddress.ip_address(a).is_loopback or a in mine for a in resolved)


def check_remote_paths(kind: str, paths: Mapping[str, str | None]) -> None:
    """Refuse, before anything is created, a path on this machine for a cluster
    whose workers run elsewhere: they would read nothing, or write where no one
    looks while this machine writes the manifest and ``_SUCCESS``.

    ``paths`` maps a flag (``--input``) to its value; None means "not given",
    which is refused too: a remote run has no default input or output.
    """
    if not is_remote(kind):
        return
    given = {k: v for k, v in paths.items() if v}
    for flag, value in paths.items():
        if not value:
            hint = ""
            source = next((v for k, v in given.items() if "://" in v), None)
            if flag in ("--output", "--dst") and source:
                hint = f", e.g. {source.rstrip('/')}-features"
            raise InputError(
                f"{flag} is required with --cluster {kind}: a URL its workers can reach "
                f"(s3://...); a remote run has no default{hint}"
            )
        if "://" not in value or value.startswith(("file://", "local://")):
            raise InputError(
                f"{flag} {value}: a path on this machine, but the workers of --cluster "
                f"{kind} run elsewhere and cannot read or write it; give a URL they can "
                "reach (s3://...)"
            )


# ---------------------------------------------------------------- versions
#: Compared exactly between this machine and every scheduler and worker: what
#: pickles functions and data between them (Python's minor version is compared,
#: and fruitdask's own files, by :func:`package_fingerprint`).
STRICT_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack")


def package_files() -> list[tuple[str, str]]:
    """``(path inside a wheel, file on disk)`` of the fruitdask and spark_parity
    packages as imported here (sources and package data, no caches)."""
    import importlib

    out = []
    for name in ("fruitdask", "spark_parity"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        root = os.path.dirname(os.path.abspath(module.__file__ or ""))
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for f in sorted(files):
                if f.endswith((".pyc", ".pyo")) or f.startswith("."):
                    continue
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(root)).replace(os.sep, "/")
                out.append((rel, path))
    return sorted(out)


def package_fingerprint() -> str:
    """A short hash of fruitdask's files as imported in this process: two
    processes with the same one run the same code."""
    h = hashlib.sha256()
    for rel, path in package_files():
        with open(path, "rb") as fh:
            data = fh.read()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:12]


def _minor(python: str | None) -> str | None:
    return ".".join(str(python).split(".")[:2]) if python else None


def check_versions(client) -> None:
    """Compare this machine with the cluster: Python's minor version,
    :data:`STRICT_PACKAGES` and fruitdask's files must be the same everywhere.

    Raises
    ------
    ClusterError
        One line naming what differs and where.
    """
    versions = client.get_versions()
    mine = versions["client"]["packages"]
    where: dict[str, dict[str, Any]] = {"the scheduler": versions["scheduler"]["packages"]}
    for addr, info in (versions.get("workers") or {}).items():
        where[f"worker {addr}"] = (info or {}).get("packages") or {}
    problems = []
    for name in ("python", *STRICT_PACKAGES):
        want = _minor(mine.get(name)) if name == "python" else mine.get(name)
        off: dict[str, list[str]] = {}
        for who, pkgs in where.items():
            got = _minor(pkgs.get(name)) if name == "python" else pkgs.get(name)
            if got != want:
                off.setdefault(str(got), []).append(who)
        for got, whom in off.items():
            problems.append(f"{name} {want} here, {got} on {_whom(whom)}")
    if not problems:
        try:
            prints = client.run(package_fingerprint)
        except Exception as exc:  # noqa: BLE001 - the workers cannot import fruitdask
            raise ClusterError(
                f"fruitdask is not importable on the cluster's workers ({one_line(exc)}): "
                "install the same fruitdask there"
            ) from None
        want = package_fingerprint()
        off_fp = sorted(a for a, fp in prints.items() if fp != want)
        if off_fp:
            problems.append(
                f"fruitdask's files differ from this machine's (fingerprint {want}) on "
                f"{_whom([f'worker {a}' for a in off_fp])}"
            )
    if problems:
        raise ClusterError(
            "this machine and the cluster run different versions: "
            + "; ".join(problems)
            + " (they exchange pickled code and data: use the same versions on both)"
        )


def _whom(names: list[str]) -> str:
    workers = [n for n in names if n.startswith("worker ")]
    others = [n for n in names if not n.startswith("worker ")]
    if len(workers) > 1:
        others.append(f"{len(workers)} workers")
    else:
        others += workers
    return " and ".join(others)


def usage(client) -> dict[str, Any] | None:
    """What the cluster behind ``client`` has cost so far, when it can tell (an
    EC2 cluster of :mod:`fruitdask.aws.ec2`: instance-hours and the estimated
    price); None for a local cluster or a bare scheduler address."""
    report = getattr(getattr(client, "cluster", None), "fruitdask_usage", None)
    if report is None:
        return None
    try:
        return report()
    except Exception:  # an estimate must never fail a run
        logging.getLogger(__name__).warning("cluster usage not recorded", exc_info=True)
        return None
