"""One lifecycle for every output fruitdask writes: check, lock, run state, publish, cleanup.

``fruitdask run`` (Dask), ``spark_parity run``, ``train``, ``evaluate`` and
``pack`` all write through :class:`OutputDir`, so the commit protocol exists
once. Layout::

    OUT/_SUCCESS                            "<run id>": the commit point
    OUT/manifest.json                       the manifest of the run in force (a copy)
    OUT/<table>/part-00000-<run>.parquet    data files: every name carries its run id
    OUT/_fruitdask/manifests/<run>.json     the manifest of a committed run
    OUT/_fruitdask/runs/<run>/state.json    a run in flight: settings, plan, planned files
    OUT/_fruitdask/runs/<run>/listing.parquet   the input listing it planned from
    OUT/_fruitdask/runs/<run>/done/00000.json   its finished partitions
    OUT/_fruitdask/lock.json                the lease of the run writing here

Readers follow ``_SUCCESS`` -> ``_fruitdask/manifests/<run>.json`` -> its file
list (:func:`read_committed`). A run writes its data files beside the old
run's (different names), then its manifest, then swaps ``_SUCCESS``: until
that single write the old result is complete and in force, after it the new one
is; ``manifest.json`` and the other copies at the top follow it. Only then
are the files of older runs deleted, and only files that a manifest or a run
state lists, never whatever a folder happens to hold. A crash at any step leaves a complete result in force, and the
next commit finishes the cleanup. S3 has no rename; none is needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from fruitdask import io
from fruitdask.cancel import StopToken
from fruitdask.errors import (
    FruitdaskError,
    InputError,
    LockedError,
    OutputExistsError,
    StorageError,
)

__all__ = [
    "MANIFEST",
    "STATE_DIR",
    "SUCCESS",
    "Lease",
    "OutputDir",
    "RunState",
    "check_apart",
    "listing_changes",
    "library_versions",
    "new_run_id",
    "part_name",
    "read_committed",
    "recordable_options",
]

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
STATE_DIR = "_fruitdask"
_LOCK = f"{STATE_DIR}/lock.json"
_MANIFESTS = f"{STATE_DIR}/manifests"
_RUNS = f"{STATE_DIR}/runs"


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def part_name(index: int, run_id: str) -> str:
    """File name of partition ``index`` of a run: ``part-00000-<run>.parquet``."""
    return f"part-{index:05d}-{run_id}.parquet"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_json(url: str, so: dict[str, Any]) -> dict[str, Any] | None:
    text = io.read_text(url, so)
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def read_committed(url: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The manifest of the run in force at ``url`` (``_SUCCESS`` -> its manifest),
    or None when no run has committed there."""
    so = dict(storage_options or {})
    success = io.read_text(io.join(url, SUCCESS), so)
    if success is None:
        return None
    run_id = success.strip()
    manifest = _read_json(io.join(url, _MANIFESTS, f"{run_id}.json"), so)
    if manifest is None:  # an output of fruitdask 0.1's first round: manifest.json only
        manifest = _read_json(io.join(url, MANIFEST), so)
    if manifest is None or manifest.get("run_id") != run_id:
        return None
    return manifest


def check_apart(output: str, inputs: dict[str, str], so: dict[str, Any], iso: dict) -> None:
    """Refuse an output that is an input, inside one, or holds one.

    Parameters
    ----------
    inputs : dict
        ``{what: url}``, e.g. ``{"input": ...}``; ``what`` names it in the error.
    """
    out_scheme, out_path = io.location(output, so)
    for what, url in inputs.items():
        scheme, path = io.location(url, iso)
        if scheme != out_scheme:
            continue
        a, b = out_path.rstrip("/") + "/", path.rstrip("/") + "/"
        if a == b:
            problem = f"is the {what}"
        elif a.startswith(b):
            problem = f"is inside the {what} {url}"
        elif b.startswith(a):
            problem = f"holds the {what} {url}"
        else:
            continue
        raise InputError(
            f"{output}: the output {problem}; writing there could mix results with "
            "images or delete them: choose another output"
        )


# ---------------------------------------------------------------- the lease
def _host() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


#: Run ids whose lease this process holds or is taking now (a lease of this
#: process that is not among them was left by a run that failed to delete it:
#: the store was down).
_HELD: set[str] = set()


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except psutil.Error:
        return None


class Lease:
    """A lock on an output: an object holding the run id and a heartbeat.

    Taken with a create-only write (``If-None-Match`` on S3, a hard link on
    disk), renewed every ``heartbeat`` seconds with a compare-and-swap
    (``If-Match``), released by deleting it. A lock whose heartbeat is older
    than ``stale_after`` seconds, or whose holder is a dead process on this
    host, is taken over with the same compare-and-swap: of two takers, one wins.
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any],
        run_id: str,
        stale_after: float = 60.0,
        heartbeat: float = 10.0,
        stop: StopToken | None = None,
    ) -> None:
        self.url = url
        self.so = storage_options
        self.run_id = run_id
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.stop = stop
        self.lost: str | None = None
        self._version: str | None = None
        self._pid = os.getpid()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        doc = {
            "run_id": self.run_id,
            "host": _host(),
            "pid": self._pid,
            "pid_started": _process_started(self._pid),
            "heartbeat": time.time(),
            "stale_after": self.stale_after,
        }
        return json.dumps(doc).encode()

    def _stale(self, holder: dict[str, Any]) -> bool:
        age = time.time() - float(holder.get("heartbeat") or 0)
        if age > float(holder.get("stale_after") or self.stale_after):
            return True
        if holder.get("host") == _host():
            pid = int(holder.get("pid") or 0)
            if pid == self._pid:  # this process: stale unless one of its runs holds it now
                return holder.get("run_id") not in _HELD
            return _process_started(pid) != holder.get("pid_started")
        return False

    def acquire(self) -> Lease:
        # Marked as held *before* the create: another thread of this process that
        # loses the create must not find our fresh lock "ours, not held" and take it.
        _HELD.add(self.run_id)
        try:
            self._take()
        except BaseException:
            _HELD.discard(self.run_id)
            raise
        self._thread = threading.Thread(target=self._beat, name="fruitdask-lease", daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        if io.put_if_absent(self.url, self._doc(), self.so):
            _, self._version = io.read_versioned(self.url, self.so)
        else:
            text, version = io.read_versioned(self.url, self.so)
            try:
                holder = json.loads(text) if text else {}
            except json.JSONDecodeError:
                holder = {}
            if not isinstance(holder, dict):
                holder = {}
            if text is None:  # released between our two calls
                return self._take()
            if not self._stale(holder) or version is None:
                raise LockedError(self._held_message(holder))
            if not io.replace_if(self.url, self._doc(), version, self.so) and not self._mine():
                raise LockedError(self._held_message(holder))
            _, self._version = io.read_versioned(self.url, self.so)

    def _mine(self) -> bool:
        """Whether the lock holds this lease's document now. A compare-and-swap
        that failed may have been applied all the same (the reply was lost and
        the request retried): then the lock is ours, under a newer version."""
        text, version = io.read_versioned(self.url, self.so)
        try:
            holder = json.loads(text) if text else {}
        except json.JSONDecodeError:
            return False
        if not isinstance(holder, dict) or holder.get("run_id") != self.run_id:
            return False
        if holder.get("pid") != self._pid or holder.get("host") != _host():
            return False
        self._version = version
        return True

    def _held_message(self, holder: dict[str, Any]) -> str:
        out = self.url.rsplit("/" + _LOCK, 1)[0]
        age = time.time() - float(holder.get("heartbeat") or 0)
        wait = max(0.0, float(holder.get("stale_after") or self.stale_after) - age)
        return (
            f"{out}: locked by run {holder.get('run_id', '?')} (pid {holder.get('pid', '?')} "
            f"on {str(holder.get('host', '?')).split('/')[0]}, heartbeat {age:.0f}s ago); "
            f"another run is writing there: wait for it, or if it is gone retry in "
            f"{wait:.0f}s or delete {self.url}"
        )

    def _beat(self) -> None:
        while not self._done.wait(self.heartbeat):
            try:
                ok = io.replace_if(self.url, self._doc(), self._version or "", self.so)
                if ok:
                    _, self._version = io.read_versioned(self.url, self.so)
                else:
                    ok = self._mine()
            except FruitdaskError:
                continue  # the store hiccuped: the next beat tries again
            if not ok:
                self.lost = f"{self.url}: this run's lock was taken over by another run"
                if self.stop is not None:
                    self.stop.fail(LockedError(self.lost))
                return

    def check(self) -> None:
        """Raise :class:`LockedError` if the lease was lost (taken over)."""
        if self.lost:
            raise LockedError(self.lost)

    def release(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.discard(self.run_id)
        if self.lost:
            return
        with contextlib.suppress(FruitdaskError, ValueError, AttributeError):
            text, version = io.read_versioned(self.url, self.so)
            if text is not None and version and json.loads(text).get("run_id") == self.run_id:
                io.delete_if(self.url, version, self.so)


# ---------------------------------------------------------------- a run's files
@dataclass(frozen=True)
class RunState:
    """A run's place in its output; small and picklable, so tasks carry it.

    Attributes
    ----------
    url : str
        The output.
    storage_options : dict
    run_id : str
    """

    url: str
    storage_options: dict[str, Any]
    run_id: str

    def part(self, table: str, index: int) -> str:
        """Relative name of a partition's file of ``table``."""
        return f"{table}/{part_name(index, self.run_id)}"

    def url_of(self, rel: str) -> str:
        return io.join(self.url, rel)

    def write_table(self, rel: str, table: pa.Table, **kw: Any) -> int:
        return io.write_table(table, self.url_of(rel), self.storage_options, **kw)

    def write_bytes(self, rel: str, data: bytes) -> None:
        io.write_bytes(self.url_of(rel), data, self.storage_options)

    @property
    def folder(self) -> str:
        return f"{_RUNS}/{self.run_id}"

    def marker(self, index: int) -> str:
        return f"{self.folder}/done/{index:05d}.json"

    def mark_done(self, index: int, info: dict[str, Any]) -> None:
        """Record partition ``index`` as finished (written last by its task)."""
        self.write_bytes(self.marker(index), json.dumps(info).encode())

    def done(self, n_partitions: int) -> dict[int, dict[str, Any]]:
        """The finished partitions' markers, by index."""
        names = set(io.ls(io.join(self.url, self.folder, "done"), self.storage_options))
        out = {}
        for i in range(n_partitions):
            if f"{i:05d}.json" in names:
                doc = _read_json(self.url_of(self.marker(i)), self.storage_options)
                if doc is not None:
                    out[i] = doc
        return out


def recordable_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The storage options a manifest may record: an allow-list.

    Settings that only shape requests are kept; credentials show as ``***``
    under their (harmless) names; everything else is dropped, since an unknown
    option may carry a secret (a proxy URL with a password, a header).
    """
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if k in _KEEP:
            out[k] = _no_userinfo(v) if k == "endpoint_url" else v
        elif k in _SECRET_NAMES:
            out[k] = "***"
        elif k in _NESTED and isinstance(v, dict):
            kept = {kk: _no_userinfo(vv) for kk, vv in v.items() if kk in _NESTED[k]}
            if kept:
                out[k] = kept
    return out


_KEEP = {"anon", "endpoint_url", "region", "region_name", "use_ssl", "requester_pays",
         "max_concurrency", "s3_client", "default_block_size", "version_aware"}  # fmt: skip
_SECRET_NAMES = {"key", "secret", "token", "session_token", "password", "profile"}
_NESTED = {
    "client_kwargs": {"endpoint_url", "region_name"},
    "config_kwargs": {"max_pool_connections", "connect_timeout", "read_timeout", "retries",
                      "signature_version", "s3"},
}  # fmt: skip


def _no_userinfo(value: Any) -> Any:
    if isinstance(value, str) and "@" in value and "://" in value:
        scheme, rest = value.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return value


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes a result: the kernel's
    always, the engines' and fitters' when this process has loaded them
    (importing dask-ml only to name its version would cost ~2 s)."""
    import sys

    import cv2
    import fsspec
    import numpy as np

    import fruitdask

    versions = {
        "fruitdask": fruitdask.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "fsspec": fsspec.__version__,
        "opencv": cv2.__version__,
    }
    optional = {"dask": "dask", "distributed": "distributed", "scikit-learn": "sklearn",
                "dask-ml": "dask_ml", "pyspark": "pyspark"}  # fmt: skip
    for name, module in optional.items():
        if module in sys.modules:
            versions[name] = str(getattr(sys.modules[module], "__version__", "?"))
    return versions


# ---------------------------------------------------------------- the output
@dataclass
class OutputDir:
    """An output folder or prefix and its lifecycle.

    Parameters
    ----------
    url : str
    storage_options : dict
    kind : str
        The manifest format this output holds (``fruitdask-output/1``, ...).
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    kind: str = "fruitdask-output/1"
    lease: Lease | None = None
    committed: str | None = None
    #: Why the cleanup after the last commit stopped short (the next one finishes it).
    cleanup_error: str | None = None
    #: Whether :meth:`check` found no folder there (local): :meth:`release` removes
    #: it if it is still empty (a run refused, or abandoned, after the lock).
    created: bool = False

    @property
    def so(self) -> dict[str, Any]:
        return self.storage_options

    def _url(self, rel: str) -> str:
        return io.join(self.url, rel)

    # -- before anything starts
    def check(self, mode: str, inputs: dict[str, tuple[str, dict]] | None = None) -> str:
        """Decide whether a run may write here; writes nothing.

        Parameters
        ----------
        mode : {"new", "overwrite", "resume"}
        inputs : dict, optional
            ``{what: (url, storage_options)}`` that the output must stay apart from.

        Returns
        -------
        str
            ``"empty"``, ``"complete"`` (a committed result) or ``"interrupted"``.

        Raises
        ------
        OutputExistsError, InputError, StorageError
        """
        io.check_writable(self.url, self.so)
        for what, (url, iso) in (inputs or {}).items():
            check_apart(self.url, {what: url}, self.so, iso)
        entries = set(io.ls(self.url, self.so))
        if not entries:
            self.created = not io.exists(self.url, self.so)
            return "empty"
        committed = read_committed(self.url, self.so)
        if not self._ours(entries):
            shown = ", ".join(sorted(entries)[:3])
            raise OutputExistsError(
                f"{self.url}: holds files that fruitdask did not write ({shown}); "
                "give an empty folder or a fruitdask output"
            )
        if committed is not None and committed.get("format", self.kind) != self.kind:
            raise OutputExistsError(
                f"{self.url}: holds a {committed.get('format')} output, not a {self.kind} one"
            )
        state = "complete" if committed is not None and not self.resumable() else "interrupted"
        if mode == "new":
            raise OutputExistsError(
                f"{self.url}: output already exists (use --overwrite to replace it"
                + (", or --resume to finish the interrupted run)" if state != "complete" else ")")
            )
        return state

    def _ours(self, entries: set[str]) -> bool:
        """Whether a folder holding ``entries`` is a fruitdask output: it has
        fruitdask's state folder, or (round 1 wrote no state folder) a
        ``manifest.json`` of a ``fruitdask-*`` format. A ``_SUCCESS`` alone, as
        Spark and Hadoop write, or someone else's ``manifest.json``, is not."""
        if STATE_DIR in entries:
            return True
        if MANIFEST not in entries:
            return False
        doc = _read_json(self._url(MANIFEST), self.so) or {}
        return str(doc.get("format", "")).startswith("fruitdask-")

    def lock(self, run_id: str, stop: StopToken | None = None, **kw: Any) -> Lease:
        """Take the output's lease (:class:`LockedError` naming the holder if taken)."""
        self.lease = Lease(self._url(_LOCK), self.so, run_id, stop=stop, **kw).acquire()
        return self.lease

    # -- run state
    def start(
        self,
        run_id: str,
        settings: dict[str, Any],
        plan: list[tuple[int, int]],
        listing: pd.DataFrame | None = None,
        files: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> RunState:
        """Record a new run: its settings, partitions, input listing and the
        files it plans to write (so the next commit can delete them if this
        run never commits)."""
        run = RunState(self.url, self.so, run_id)
        previous = read_committed(self.url, self.so)
        state = {
            "run_id": run_id,
            "format": self.kind,
            "started": _now(),
            "settings": settings,
            "partitions": [list(r) for r in plan],
            "files": sorted(files or []),
            # what a commit of this run replaces (round-1 outputs have no run states)
            "replaces": sorted(_all_files(previous)) if previous else [],
            **(extra or {}),
        }
        if listing is not None:
            cols = [c for c in listing.columns if c != "source"]
            run.write_table(f"{run.folder}/listing.parquet", pa.Table.from_pandas(
                listing[cols], preserve_index=False))  # fmt: skip
            state["has_listing"] = True
        run.write_bytes(f"{run.folder}/state.json", json.dumps(state).encode())
        return run

    def expect(self, run: RunState, files: list[str]) -> None:
        """Add ``files`` to the run's planned files (before writing them), so an
        abandoned run's files are known to the next commit's cleanup."""
        state = self.state_of(run.run_id)
        if state is None:
            raise StorageError(f"{self.url}: cannot read run {run.run_id}'s state")
        state["files"] = sorted(set(state.get("files", [])) | set(files))
        run.write_bytes(f"{run.folder}/state.json", json.dumps(state).encode())

    def state_of(self, run_id: str) -> dict[str, Any] | None:
        return _read_json(self._url(f"{_RUNS}/{run_id}/state.json"), self.so)

    def runs(self) -> dict[str, dict[str, Any]]:
        """Every recorded run state here, by run id."""
        out = {}
        for run_id in io.ls(self._url(_RUNS), self.so):
            state = self.state_of(run_id)
            if state is not None:
                out[run_id] = state
        return out

    def resumable(self) -> dict[str, Any] | None:
        """The newest run state that never committed, or None."""
        committed = (io.read_text(self._url(SUCCESS), self.so) or "").strip()
        done = set(io.ls(self._url(_MANIFESTS), self.so))
        open_runs = [
            s for rid, s in self.runs().items() if rid != committed and f"{rid}.json" not in done
        ]
        return max(open_runs, key=lambda s: s.get("started", ""), default=None)

    def resume(self, settings: dict[str, Any], listing: pd.DataFrame) -> tuple[RunState, dict]:
        """Continue the newest interrupted run, if it is the same job.

        Returns its :class:`RunState` and recorded state. Raises
        :class:`InputError` naming what changed when the settings or the listed
        input files (path, size, modification time) differ: a partition is
        reused only when its inputs are the ones it was made from.
        """
        state = self.resumable()
        if state is None:
            raise InputError(f"{self.url}: nothing to resume (no interrupted run there)")
        changed = sorted(
            k for k in set(settings) | set(state.get("settings", {}))
            if settings.get(k) != state.get("settings", {}).get(k)
        )  # fmt: skip
        if changed:
            was = state.get("settings", {})
            what = ", ".join(f"{k} was {was.get(k)!r}, now {settings.get(k)!r}" for k in changed)
            raise InputError(
                f"{self.url}: cannot resume run {state['run_id']} with other settings "
                f"({what}); give the same settings, or --overwrite to start over"
            )
        before = self.listing_of(state["run_id"])
        if before is None:
            raise InputError(
                f"{self.url}: the interrupted run's listing is missing; use --overwrite"
            )
        diff = listing_changes(before, listing)
        if diff:
            raise InputError(
                f"{self.url}: cannot resume run {state['run_id']}: the input changed since "
                f"({diff}); use --overwrite to start over"
            )
        return RunState(self.url, self.so, state["run_id"]), state

    def listing_of(self, run_id: str) -> pd.DataFrame | None:
        try:
            table = io.read_table(self._url(f"{_RUNS}/{run_id}/listing.parquet"), self.so)
        except StorageError:
            return None
        return table.to_pandas()

    # -- commit
    def publish(
        self,
        run: RunState,
        manifest: dict[str, Any],
        aliases: dict[str, bytes] | None = None,
        stop: StopToken | None = None,
    ) -> None:
        """Commit ``run``: its manifest under ``_fruitdask/manifests/``, then
        ``_SUCCESS`` (the commit itself), then the aliases at the top
        (``manifest.json``, a model's ``.zip`` ...), then the cleanup of older
        runs' files.

        Readers go through ``_SUCCESS`` (:func:`read_committed`), never through
        an alias; the aliases are written after the commit so that one never
        names a run that did not commit. ``_SUCCESS`` and the aliases are written
        in one critical section (a stop request waits for them).

        ``manifest["files"]`` lists every data file of the run, by table.
        """
        manifest = {**manifest, "format": self.kind, "run_id": run.run_id, "created": _now()}
        doc = json.dumps(manifest, indent=1).encode()
        run.write_bytes(f"{_MANIFESTS}/{run.run_id}.json", doc)
        stop = stop or StopToken()
        with stop.critical():
            if self.lease is not None:
                self.lease.check()
            run.write_bytes(SUCCESS, f"{run.run_id}\n".encode())
            self.committed = stop.committed = run.run_id
            for name, data in {MANIFEST: doc, **(aliases or {})}.items():
                run.write_bytes(name, data)
        try:
            self.cleanup(run.run_id)
        except Exception as exc:  # noqa: BLE001 - committed all the same; the next commit finishes it
            self.cleanup_error = str(exc) if isinstance(exc, FruitdaskError) else repr(exc)
            logging.getLogger(__name__).warning(
                "%s: committed run %s; the old runs' files stay until the next commit (%s)",
                self.url, run.run_id, self.cleanup_error,
            )  # fmt: skip

    def cleanup(self, keep: str) -> None:
        """Delete what older runs left: files listed in their manifests or run
        states (never a folder's unlisted content), then their records.

        Idempotent: a cleanup cut short is finished by the next commit's.
        """
        kept = _read_json(self._url(f"{_MANIFESTS}/{keep}.json"), self.so)
        if kept is None or kept.get("run_id") != keep:  # never guess what to keep
            raise StorageError(f"{self.url}: cannot read run {keep}'s manifest; nothing deleted")
        keep_files = _all_files(kept)
        doomed: set[str] = set()
        records: list[str] = []
        for name in io.ls(self._url(_MANIFESTS), self.so):
            rid = name.removesuffix(".json")
            if rid == keep:
                continue
            doomed |= _all_files(_read_json(self._url(f"{_MANIFESTS}/{name}"), self.so) or {})
            records.append(f"{_MANIFESTS}/{name}")
        for rid, state in self.runs().items():
            doomed |= set(state.get("replaces", []))
            # planned files: an abandoned run's all, the kept run's unpublished ones
            doomed |= set(state.get("files", []))
            records += self._state_files(rid)
        doomed = {f for f in doomed - keep_files if _safe(f)}
        io.remove([self._url(f) for f in sorted(doomed)], self.so)
        io.remove([self._url(f) for f in records], self.so)
        folders = {f.rsplit("/", 1)[0] for f in doomed | set(records) if "/" in f}
        parents = {p for f in folders for p in _parents(f)}
        io.remove_empty_folders(self.url, folders | parents)

    def abandon(self, run_id: str) -> None:
        """Delete a run that can never commit (its settings or its data are at
        fault, so ``--resume`` could not finish it either): the files its run
        state plans and its records, then the folders left empty (the output's
        own goes with :meth:`release`). Nothing of any other run is touched.
        """
        state = self.state_of(run_id) or {}
        files = [f for f in state.get("files", []) if _safe(str(f))]
        records = self._state_files(run_id)
        io.remove([self._url(f) for f in files], self.so)
        io.remove([self._url(f) for f in records], self.so)
        folders = {f.rsplit("/", 1)[0] for f in files + records if "/" in f}
        io.remove_empty_folders(self.url, folders | {p for f in folders for p in _parents(f)})

    def _state_files(self, run_id: str) -> list[str]:
        """A run's own records: its markers (the run folder is fruitdask's alone,
        named by its random id, so listing it finds nothing of anyone else's)."""
        folder = f"{_RUNS}/{run_id}"
        names = [
            f"{folder}/{sub}/{n}" for sub in ("done", "errors")
            for n in io.ls(self._url(f"{folder}/{sub}"), self.so)
        ]  # fmt: skip
        return [*names, f"{folder}/listing.parquet", f"{folder}/state.json"]

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
            io.remove_empty_folders(self.url, [STATE_DIR])
        if self.created:
            io.remove_empty_folders(self.url, [""])  # the output folder itself, if empty


#: The listing's columns that identify an input file's content.
_KEYED = ("path", "size", "mtime", "shard", "row_group", "row")


def listing_changes(before: pd.DataFrame, now: pd.DataFrame) -> str:
    """What differs between two listings, in words ("" when nothing does)."""
    cols = [c for c in _KEYED if c in now]
    # the same columns, in whatever order each listing holds them
    if set(cols) != set(before.columns) & set(_KEYED):
        return "the listing's columns differ"
    a = before[cols].astype(str).agg("\x1f".join, axis=1)
    b = now[cols].astype(str).agg("\x1f".join, axis=1)
    if len(a) == len(b) and (a.to_numpy() == b.to_numpy()).all():
        return ""
    old, new = dict(zip(before["path"], a, strict=True)), dict(zip(now["path"], b, strict=True))
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    modified = sorted(p for p in set(old) & set(new) if old[p] != new[p])
    parts = []
    for word, paths in (("modified", modified), ("added", added), ("removed", removed)):
        if paths:
            parts.append(f"{len(paths)} {word}, e.g. {paths[0]}")
    return "; ".join(parts) or "the order of the files changed"


def _safe(rel: str) -> bool:
    # Names come from JSON in the output itself: never follow one out of it.
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts


def _all_files(manifest: dict[str, Any]) -> set[str]:
    files = manifest.get("files") or {}
    if isinstance(files, list):  # evaluation manifests of round 1 list names only
        return {str(f) for f in files if f != MANIFEST}
    return {str(f) for fs in files.values() for f in fs}


def _parents(folder: str) -> Iterator[str]:
    while "/" in folder:
        folder = folder.rsplit("/", 1)[0]
        yield folder
