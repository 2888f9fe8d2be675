"""The only module that talks to storage: list files, read and write objects.

Everything goes through fsspec with the caller's ``storage_options`` (local
paths, ``file://``, ``s3://`` and anything else fsspec knows). Every failure
leaves this module as a typed :mod:`fruitdask.errors` exception whose one line
names the URL: raised from the calls that act on one object, yielded in the
object's place from the calls that read many (one bad file never stops a run).

S3 has two back-ends, chosen from the storage options: pyarrow's C++ client
(the default whenever the options map onto it: about half the CPU per small
object of s3fs/botocore) and s3fs (any other option: a profile, requester
pays, a custom botocore config). The fruitdask-only option
``s3_client="s3fs"`` forces s3fs; it is never passed to fsspec.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io as _io
import json
import os
import posixpath
import socket
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from fruitdask.errors import (
    AccessDeniedError,
    FruitdaskError,
    InputError,
    NotFoundError,
    StorageError,
    TransientError,
    one_line,
    s3_error_code,
    translate,
)
from fruitdask.fetch import Window, fetch_ordered

__all__ = [
    "IMAGE_EXTENSIONS",
    "LISTING_COLUMNS",
    "READ_WINDOW",
    "S3_CLIENTS",
    "check_reachable",
    "check_writable",
    "display_name",
    "exists",
    "filesystem",
    "is_local",
    "is_s3",
    "iter_objects",
    "join",
    "label_split",
    "list_files",
    "location",
    "ls",
    "put_if_absent",
    "read_bytes",
    "read_row_groups",
    "read_table",
    "read_text",
    "read_versioned",
    "remove",
    "remove_empty_folders",
    "replace_if",
    "delete_if",
    "parse_storage_options",
    "write_bytes",
    "write_table",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Columns of a listing; ``source`` (the raw name, bytes) only where it differs from ``path``.
LISTING_COLUMNS = ("path", "label", "split", "size", "mtime")
SPLITS = {"training": "Training", "test": "Test"}
#: Values of the fruitdask-only storage option ``s3_client``.
S3_CLIENTS = ("arrow", "s3fs")
_S3_PROTOCOLS = ("s3", "s3a")


# ---------------------------------------------------------------- URLs and file systems
def is_s3(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in _S3_PROTOCOLS


def _strip(url: str) -> str:
    return url.rstrip("/") if len(url) > 1 else url


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/`` (works for local paths and URLs)."""
    return posixpath.join(_strip(url), *parts)


def _s3_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs settings for many small objects.

    ``max_concurrency=1`` stops ``cat_file`` sending a HEAD before every GET
    (measured: ~1.5 ms of client CPU per object); a bigger botocore pool (its
    default is 10) lets the concurrent GETs of a task share connections; short
    connect timeouts make an unreachable endpoint fail in seconds.
    """
    opts = dict(options)
    opts.setdefault("max_concurrency", 1)
    ck = dict(opts.get("config_kwargs") or {})
    ck.setdefault("max_pool_connections", 64)
    ck.setdefault("connect_timeout", 5)
    ck.setdefault("read_timeout", 30)
    # 3 attempts with standard backoff (~1.5 s): longer outages are the task
    # retries' job (fruitdask.errors.RETRY_WAITS)
    ck.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
    opts["config_kwargs"] = ck
    return opts


def _split_options(url: str, storage_options: dict[str, Any] | None) -> tuple[dict, str]:
    options = dict(storage_options or {})
    client = str(options.pop("s3_client", "arrow"))
    if client not in S3_CLIENTS:
        raise InputError(f"storage option s3_client must be one of {S3_CLIENTS}, got {client!r}")
    return options, client


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """``(fs, path)`` for a URL, with fruitdask's defaults for S3.

    fsspec caches instances per process, so calling this inside every task is
    cheap and avoids shipping (non fork-safe) filesystem objects between processes.
    """
    options, _ = _split_options(url, storage_options)
    s3 = is_s3(url)
    if s3:
        options = _s3_defaults(options)
    try:
        fs, path = url_to_fs(url, **options)
    except (ImportError, ValueError, TypeError) as exc:
        raise InputError(f"cannot open {url}: {one_line(exc)}") from None
    problem = _unaddressable(_strip(path)) if s3 else None
    if problem:  # it would list or write under another prefix than the one given
        raise InputError(f"{url}: {problem}")
    if s3:
        _check_endpoint(options)
        # One layer of retries per request, botocore's: s3fs's own 5 around it,
        # and the task retries around those, multiplied into ~3 minutes before
        # an unreachable endpoint was reported.
        fs.retries = 1
    return fs, _strip(path)


def _check_endpoint(options: dict[str, Any]) -> None:
    """Refuse an S3 endpoint URL holding a user or password: S3 signs requests
    with the key and secret, and the HTTP clients either refuse to combine the
    two (aiohttp: 'Cannot combine AUTHORIZATION header with ... credentials
    encoded in URL', which looked like an outage and was retried for 31 s) or
    send them along. The message never shows the password."""
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
        "endpoint_url"
    )
    parsed = urlparse(str(endpoint or ""))
    if "@" in parsed.netloc:
        shown = f"{parsed.scheme}://***@{parsed.netloc.rsplit('@', 1)[1]}"
        raise InputError(
            f"--endpoint-url {shown}: an S3 endpoint URL takes no user or password "
            "(give the credentials as key and secret, or in the environment)"
        )


def parse_storage_options(
    pairs: Sequence[str] | None, endpoint_url: str | None = None, anon: bool = False
) -> dict[str, Any]:
    """fsspec storage options from ``KEY=VALUE`` strings (a value is JSON when it
    parses as JSON: numbers, booleans, nested options), an endpoint URL and
    anonymous access, as the command lines give them."""
    so: dict[str, Any] = {}
    for item in pairs or []:
        if "=" not in item:
            raise InputError(f"--storage-option expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            so[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            so[key.strip()] = value
    if endpoint_url:
        so["endpoint_url"] = endpoint_url
    if anon:
        so["anon"] = True
    return so


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def location(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str]:
    """``(scheme, canonical path)`` of a URL, to compare two locations: a local
    path made absolute with symlinks resolved, ``bucket/key`` for S3."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        return "file", os.path.realpath(path)
    endpoint = str((storage_options or {}).get("endpoint_url") or "")
    return f"{fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]}:{endpoint}", path


# ---------------------------------------------------------------- pyarrow's S3 client
# s3fs options that map one to one onto pyarrow's S3FileSystem; any other
# option keeps the s3fs path.
_ARROW_S3_KEYS = {"key", "secret", "token", "anon", "endpoint_url", "region", "client_kwargs"}
_arrow_s3_cache: dict[str, Any] = {}


def _arrow_s3(root: str, storage_options: dict[str, Any] | None):
    """A pyarrow ``S3FileSystem`` for these s3fs-style options, or None.

    pyarrow's C++ client costs ~0.7 ms of CPU per small object against ~1.4 ms
    for s3fs/botocore (measured on SeaweedFS: 1,300-1,400 vs 700 objects/s in one
    process); with the S3 server on the same cores that CPU is the bottleneck.
    """
    options, client = _split_options(root, storage_options)
    if client != "arrow":
        return None
    if set(options) - _ARROW_S3_KEYS - {"max_concurrency", "config_kwargs"}:
        return None
    ck = dict(options.get("client_kwargs") or {})
    if set(ck) - {"endpoint_url", "region_name"}:
        return None
    cache_key = json.dumps([root.split("/", 1)[0], options], sort_keys=True, default=str)
    if cache_key in _arrow_s3_cache:
        return _arrow_s3_cache[cache_key]
    from pyarrow import fs as pafs

    endpoint = options.get("endpoint_url") or ck.get("endpoint_url")
    region = (
        options.get("region")
        or ck.get("region_name")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    kw: dict[str, Any] = {
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        scheme, _, host = str(endpoint).partition("://")
        kw["endpoint_override"] = host or scheme
        kw["scheme"] = scheme if host else "https"
        kw["region"] = region or "us-east-1"
    else:
        try:
            kw["region"] = region or pafs.resolve_s3_region(root.split("/", 1)[0])
        except OSError as exc:
            raise translate(exc, f"s3://{root}", "open") from None
    if options.get("anon"):
        kw["anonymous"] = True
    elif options.get("key"):
        kw["access_key"] = options["key"]
        kw["secret_key"] = options.get("secret")
        if options.get("token"):
            kw["session_token"] = options["token"]
    if pa.io_thread_count() < _ARROW_IO_THREADS:
        pa.set_io_thread_count(_ARROW_IO_THREADS)  # before the pool of this client is sized
    fs = pafs.S3FileSystem(**kw)
    _arrow_s3_cache[cache_key] = fs
    return fs


# ---------------------------------------------------------------- listing
def label_split(rel: str) -> tuple[str, str | None]:
    """(label, split) of a relative image path: the parent folder's name, and the
    ``Training``/``Test`` ancestor (any case) or None."""
    parts = rel.split("/")
    label = parts[-2] if len(parts) >= 2 else ""
    split = None
    for p in parts[:-1]:
        if p.lower() in SPLITS:
            split = SPLITS[p.lower()]
    return label, split


def display_name(raw: str | bytes) -> str:
    """A file name as a UTF-8 string, one-to-one: a backslash becomes ``\\\\`` and
    a byte that is not UTF-8 becomes ``\\xNN`` (``caf\\xe9``).

    Two distinct names never map to one string: a folder literally named
    ``caf\\xe9`` in UTF-8 is shown as ``caf\\\\xe9``.
    """
    data = raw if isinstance(raw, bytes) else os.fsencode(raw)
    return data.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _find_local(root: str) -> tuple[list[tuple[str, int, int]], list[tuple[str, str]]]:
    """(relative path, size, mtime_ns) of image files under a local folder, and
    the folders that could not be listed with the reason.

    ``os.scandir`` directly: fsspec's local ``find`` builds an info dict per
    file (~90 us each, 8 s for Fruits-360); this is ~10x cheaper. Symlinked
    folders are not followed (no cycles). An entry with an image name that is
    not a regular file (a FIFO, a socket, a device, a symlink loop or a broken
    link) is listed with size 0: reading it gives its image an error row. So is
    a sub-folder that cannot be listed, as ``its/path/`` (its read says why).
    """
    out: list[tuple[str, int, int]] = []
    unlisted: list[tuple[str, str]] = []
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            it = os.scandir(abs_dir)
        except OSError as exc:
            if not rel_dir:
                raise
            unlisted.append((rel_dir.rstrip("/"), one_line(exc)))
            out.append((rel_dir, 0, 0))
            continue
        with it:
            for e in it:
                rel = f"{rel_dir}{e.name}"
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append((rel + "/", e.path))
                        continue
                except OSError:
                    pass
                if not _is_image_name(e.name):
                    continue
                try:
                    st = e.stat()  # follows a link to a file
                    size = st.st_size if stat.S_ISREG(st.st_mode) else 0
                    out.append((rel, size, st.st_mtime_ns))
                except OSError:  # a loop, a broken link, vanished: its read says why
                    out.append((rel, 0, 0))
    return out, unlisted


def _find_arrow(fs, root: str) -> list[tuple[str, int, int]]:
    """(relative key, size, mtime_ns) of image objects under an S3 prefix, via pyarrow.

    The same ListObjectsV2 pages as s3fs, parsed in C++: ~5x faster (90k keys
    in ~2 s instead of ~13 s against SeaweedFS on loopback).
    """
    from pyarrow import fs as pafs

    prefix = root.rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), recursive=True))
    return [
        (i.path[len(prefix) :], int(i.size or 0), int(i.mtime_ns or 0))
        for i in infos
        if i.type == pafs.FileType.File and _is_image_name(i.path)
    ]


def _find_fsspec(fs, root: str) -> list[tuple[str, int, int]]:
    prefix = root.rstrip("/") + "/"
    out = []
    for full, info in fs.find(root, detail=True, withdirs=False).items():
        if not _is_image_name(full):
            continue
        rel = full[len(prefix) :] if full.startswith(prefix) else posixpath.basename(full)
        mtime = info.get("LastModified") or info.get("mtime") or 0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        out.append((rel, int(info.get("size") or 0), int(float(mtime) * 1e9)))
    return out


def list_files(url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """List the image files under a folder or prefix, recursively, sorted by path.

    Parameters
    ----------
    url : str
        A local folder or fsspec URL (``s3://bucket/prefix``).
    storage_options : dict, optional
        Passed to fsspec.

    Returns
    -------
    DataFrame with columns ``path`` (relative to ``url``, ``/``-separated, see
    :func:`display_name`), ``label`` (the parent folder's name), ``split``
    (``Training``/``Test`` ancestor or None), ``size`` (bytes), ``mtime``
    (nanoseconds; what tells a rewritten file on resume), and ``source`` (the
    raw name as bytes, only when some name is not shown as it is). Folders
    that could not be listed are in ``.attrs["unlisted"]`` as (path, reason).
    Only the listing is fetched, never the bytes.

    Raises
    ------
    StorageError
        The URL does not exist, cannot be reached, access is denied, or it holds
        no image files.
    """
    fs, root = filesystem(url, storage_options)
    unlisted: list[tuple[str, str]] = []
    try:
        if is_local(fs):
            if not os.path.exists(root):
                raise NotFoundError(f"{url}: not found (no such file or folder)")
            if not os.path.isdir(root):
                raise InputError(f"{url}: is a file; give the folder that holds the images")
            found, unlisted = _find_local(root)
        else:
            if not fs.exists(root):
                raise NotFoundError(f"{url}: not found (no such file, folder, bucket or prefix)")
            if fs.isfile(root):
                raise InputError(f"{url}: is a file; give the folder that holds the images")
            arrow = _arrow_s3(root, storage_options) if is_s3(url) else None
            found = _find_arrow(arrow, root) if arrow is not None else _find_fsspec(fs, root)
    except FruitdaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated into one line at the boundary
        raise translate(exc, url, "list") from None
    if not found:
        raise InputError(f"{url}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    df = _listing_frame(found)
    df.attrs["unlisted"] = unlisted
    return df


def _listing_frame(found: list[tuple[str, int, int]]) -> pd.DataFrame:
    paths, sources, labels, splits, sizes, mtimes = [], [], [], [], [], []
    for rel, size, mtime in found:
        shown = display_name(rel)
        label, split = label_split(shown)
        paths.append(shown)
        sources.append(rel)
        labels.append(label)
        splits.append(split)
        sizes.append(size)
        mtimes.append(mtime)
    columns = {
        "path": pd.array(paths, dtype="string"),
        "label": pd.array(labels, dtype="string"),
        "split": pd.array(splits, dtype="string"),
        "size": pd.array(sizes, dtype="int64"),
        "mtime": pd.array(mtimes, dtype="int64"),
    }
    if sources != paths:
        # Read by the real name, show the escaped one (as bytes: a pandas column
        # of str becomes Arrow strings, which cannot hold the surrogates).
        columns["source"] = pd.Series([os.fsencode(x) for x in sources], dtype=object)
    df = pd.DataFrame(columns)
    return df.sort_values("path", kind="stable", ignore_index=True)


# ---------------------------------------------------------------- reading many objects
#: Requests in flight for loose objects, one window per worker process: each
#: task starts at the size the last one found for this store.
READ_WINDOW = Window(low=4, high=128, initial=16)
# pyarrow sizes its S3 connection pool by its IO thread count (25 by default),
# whatever the threads asking: at 50 ms per request 16, 64 and 128 reading
# threads got 146, 181 and 209 objects/s through 25 connections, and 503 with
# 64 threads once the pool allowed 64. Threads are only started when used.
_ARROW_IO_THREADS = 256


def _unaddressable(key: str) -> str | None:
    """Why an S3 key cannot be fetched exactly, or None.

    HTTP clients remove ``.`` and ``..`` path segments and some fold ``//``
    before the request is signed, so such a key would fetch *another*
    object's bytes (measured: ``Pear/../x.jpg`` read as ``x.jpg``). S3 itself
    keeps keys byte-exact; these get an error row instead.
    """
    parts = key.split("/")
    if any(p in (".", "..") for p in parts) or "" in parts[:-1] or key.startswith("/"):
        return "key has a '.', '..' or empty path segment, which S3 clients cannot fetch exactly"
    return None


_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | _CLOEXEC
# A name is stat'ed before it is opened, so a link to a device is refused
# without opening the device (opening one can act: a watchdog arms, a tape
# rewinds); the opened descriptor must then be the same inode, so a swap in
# between is caught rather than read.


def _open_local(path: str | bytes, max_bytes: int | None) -> bytes:
    """A local file's bytes, refusing what is not a regular file without
    opening it, and without blocking (``O_NONBLOCK``: a FIFO swapped in).

    ``stat`` first, so a link to a device or a FIFO is refused unopened; then
    the opened descriptor must be the same regular file (a swap between the
    two calls is caught). Five system calls, about what ``open().read()`` costs.
    """
    try:
        before = os.stat(path)
        if not stat.S_ISREG(before.st_mode):
            raise _not_regular(path, before)
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        raise _open_error(path, exc) from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_dev) != (before.st_ino, before.st_dev):
            raise (
                _not_regular(path, st)
                if not stat.S_ISREG(st.st_mode)
                else StorageError(f"{display_name(path)}: changed while it was being opened")
            )
        if max_bytes is not None and st.st_size > max_bytes:
            raise StorageError(_too_large(st.st_size, max_bytes))
        if max_bytes is None:
            data = f.read()  # readall: reads until the end
        else:  # one read is short on some file systems (NFS, FUSE): to the end, or one over
            chunks, n = [], 0
            while n <= max_bytes and (chunk := f.read(max_bytes + 1 - n)):
                chunks.append(chunk)
                n += len(chunk)
            data = b"".join(chunks)  # one chunk: the same object, no copy
        if max_bytes is not None and len(data) > max_bytes:
            raise StorageError(_too_large(len(data), max_bytes))
        return data


def _not_regular(path: str | bytes, st: os.stat_result) -> StorageError:
    shown = display_name(path)
    if stat.S_ISDIR(st.st_mode):
        try:
            os.close(os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC))
        except OSError as exc:
            why = (exc.strerror or one_line(exc)).lower()
            return StorageError(f"{shown}: a folder that cannot be listed ({why})")
    return StorageError(f"{shown}: not a regular file ({_kind_of(st)})")


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def _kind_of(st: os.stat_result) -> str:
    return _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")


def _open_error(path: str | bytes, exc: OSError) -> FruitdaskError:
    """A failed ``open`` in words that name what the entry is: a symbolic link
    loop, a broken link, a socket (``ENXIO``), a folder that cannot be listed."""
    shown = display_name(path)
    if exc.errno == errno.ELOOP:
        return StorageError(f"{shown}: symbolic link loop")
    try:
        st = os.stat(path)
    except OSError:
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return NotFoundError(f"{shown}: broken symbolic link (its target does not exist)")
        return translate(exc, shown)
    if not stat.S_ISREG(st.st_mode):
        return _not_regular(path, st)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return AccessDeniedError(f"{shown}: permission denied")
    return translate(exc, shown)


#: Seconds a task waits for one local file (a hung network or FUSE file system
#: blocks a read in the kernel, where no timeout reaches it): the file gets an
#: error row and the reads go on in a new thread; the blocked one is abandoned.
LOCAL_READ_DEADLINE = 60.0
#: Local files read ahead of the consumer (decoding overlaps the reads).
_LOCAL_AHEAD = 32


def _read_one(path: bytes, max_bytes: int | None) -> bytes | FruitdaskError:
    try:
        return _open_local(path, max_bytes)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the partition
        return translate(exc, display_name(path))


class _LocalReader(threading.Thread):
    """Reads ``paths`` in order ahead of their consumer, at most ``ahead`` files
    ahead. The consumer takes results from ``done`` without a lock while the
    reader is ahead (local reads are far quicker than decoding), so a file
    costs no thread hand-off; it waits on ``cond`` only when it is ahead."""

    def __init__(self, paths: list[bytes], max_bytes: int | None, ahead: int) -> None:
        super().__init__(name="fruitdask-read", daemon=True)
        self.paths, self.max_bytes, self.ahead = paths, max_bytes, ahead
        self.done: list[bytes | FruitdaskError] = []
        self.consumed = 0
        self.stopped = False
        self.cond = threading.Condition()

    def run(self) -> None:
        for path in self.paths:
            if len(self.done) - self.consumed >= self.ahead:
                with self.cond:
                    self.cond.wait_for(
                        lambda: self.stopped or len(self.done) - self.consumed < self.ahead
                    )
            if self.stopped:
                return
            item = _read_one(path, self.max_bytes)
            with self.cond:
                self.done.append(item)
                self.cond.notify_all()

    def take(self, i: int, deadline: float) -> bytes | FruitdaskError | None:
        """Result ``i``, or None when it did not come within ``deadline`` seconds."""
        if i >= len(self.done):
            with self.cond:
                if not self.cond.wait_for(lambda: len(self.done) > i, deadline):
                    return None
        self.consumed = i + 1
        if (i + 1) % 8 == 0:  # make room now and then, not at every file
            with self.cond:
                self.cond.notify_all()
        return self.done[i]

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def _iter_local(
    paths: list[bytes], max_bytes: int | None, deadline: float
) -> Iterator[bytes | FruitdaskError]:
    """The files' bytes in order, read ahead by a thread; a file not read within
    ``deadline`` seconds is yielded as an error and a new thread reads the rest
    (the stuck one is abandoned: a hung network or FUSE read cannot be cut)."""
    start = 0
    while start < len(paths):
        reader = _LocalReader(paths[start:], max_bytes, _LOCAL_AHEAD)
        reader.start()
        try:
            for i in range(len(paths) - start):
                item = reader.take(i, deadline)
                if item is None:
                    yield StorageError(
                        f"{display_name(paths[start + i])}: read did not finish within "
                        f"{deadline:g} s (a hung file system?)"
                    )
                    start += i + 1
                    break
                yield item
            else:
                return
        finally:
            reader.stop()


def _too_large(size: int, limit: int) -> str:
    return f"file too large: {size:,} bytes (over {limit:,})"


def iter_objects(
    url: str,
    names: Sequence[str | bytes],
    storage_options: dict[str, Any] | None = None,
    max_bytes: int | None = None,
) -> Iterator[bytes | FruitdaskError]:
    """Yield the bytes of the objects ``url/name`` in order, fetching ahead.

    A failure is yielded in the object's place as a typed error naming it, never
    raised: :class:`TransientError` when the store failed as a whole, else a
    :class:`StorageError` (not found, denied, not a regular file, too large ...).

    Parameters
    ----------
    names : sequence of str or bytes
        Relative names; bytes are raw local file names (not UTF-8).
    max_bytes : int, optional
        Larger objects are refused without reading their bytes.
    """
    fs, root = filesystem(url, storage_options)
    if is_local(fs):
        broot = os.fsencode(root)
        paths = [
            os.path.join(broot, name if isinstance(name, bytes) else os.fsencode(name))
            for name in names
        ]
        yield from _iter_local(paths, max_bytes, LOCAL_READ_DEADLINE)
        return
    keys = [n.decode() if isinstance(n, bytes) else n for n in names]
    arrow = _arrow_s3(root, storage_options) if is_s3(url) else None
    yield from _iter_remote(fs, arrow, root, keys, max_bytes)


def _iter_remote(fs, arrow, root: str, keys: list[str], max_bytes: int | None):
    def get(key: str) -> bytes | FruitdaskError:
        full = f"{root}/{key}"
        shown = f"{root}/{display_name(key)}"
        problem = _unaddressable(key)
        if problem:
            return StorageError(f"{shown}: {problem}")
        try:
            if arrow is not None:
                with arrow.open_input_stream(full, compression=None) as f:
                    data = f.read()
            else:
                data = fs.cat_file(full)
        except Exception as exc:  # noqa: BLE001 - one bad object must not stop the partition
            return translate(exc, shown)
        if max_bytes is not None and len(data) > max_bytes:
            return StorageError(_too_large(len(data), max_bytes))
        return data

    # The requests release the GIL: threads overlap the round trips, results
    # come in order, and the caller's decoding overlaps the rest of the
    # downloads. As many requests are kept in flight as the store's latency
    # calls for (fruitdask.fetch): a fixed 16 kept 64% of the 0 ms rate at
    # 20 ms per request, the adaptive window ~100% (benchmarks/s3_latency.py).
    yield from fetch_ordered(get, keys, READ_WINDOW)


def read_row_groups(
    url: str, groups: list[int], columns: list[str], storage_options: dict[str, Any] | None = None
) -> tuple[pa.Table, dict[int, int]]:
    """Columns of some row groups of a Parquet file, and the row where each group
    starts in the result; one coalesced ranged read on S3.

    On S3 the file's handle and footer are kept per process (:func:`_shard`), so
    a later read of the same shard is its data GET alone: a cold read waits for
    three round trips (HEAD, footer, data) before its first image."""
    fs, path = filesystem(url, storage_options)
    arrow = _arrow_s3(path, storage_options) if is_s3(url) else None
    try:
        with contextlib.ExitStack() as stack:
            if arrow is not None:
                handle, metadata = _shard(arrow, path)
                f = pq.ParquetFile(handle, metadata=metadata, pre_buffer=True)
            else:
                f = pq.ParquetFile(stack.enter_context(fs.open(path, "rb")))
            table = f.read_row_groups(groups, columns=columns)
            starts, n = {}, 0
            for g in groups:
                starts[g] = n
                n += f.metadata.row_group(g).num_rows
    except Exception as exc:  # noqa: BLE001 - translated at the boundary
        raise translate(exc, url) from None
    return table, starts


_SHARDS: dict[str, tuple[Any, Any]] = {}
_SHARDS_LOCK = threading.Lock()
_MAX_SHARDS = 64


def _shard(arrow, path: str) -> tuple[Any, Any]:
    """An open random-access handle and the footer of a shard on S3, kept per
    process (a pack is immutable once committed: its names carry its run id)."""
    with _SHARDS_LOCK:
        if path in _SHARDS:
            return _SHARDS[path]
    handle = arrow.open_input_file(path)
    metadata = pq.ParquetFile(handle).metadata
    with _SHARDS_LOCK:
        if len(_SHARDS) >= _MAX_SHARDS:
            _SHARDS.pop(next(iter(_SHARDS)))
        _SHARDS[path] = (handle, metadata)
    return handle, metadata


# ---------------------------------------------------------------- one object
def read_bytes(
    url: str, storage_options: dict[str, Any] | None = None, max_bytes: int | None = None
) -> bytes:
    """The bytes of one object or file (refused unread when over ``max_bytes``)."""
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            return _open_local(path, max_bytes)
        if max_bytes is not None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise StorageError(f"{url}: {_too_large(size, max_bytes)}")
        data = fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url) from None
    if max_bytes is not None and len(data) > max_bytes:
        raise StorageError(f"{url}: {_too_large(len(data), max_bytes)}")
    return data


def read_text(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Text of a small object, or None when it does not exist."""
    text, _ = read_versioned(url, storage_options)
    return text


def read_versioned(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[str | None, str | None]:
    """Text of a small object and its version token (for :func:`replace_if`), or
    ``(None, None)`` when it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            with open(path, "rb") as f:
                data = f.read()
            return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
        fs.invalidate_cache(path)
        info = fs.info(path)
        data = fs.cat_file(path)
        etag = str(info.get("ETag") or info.get("etag") or hashlib.sha256(data).hexdigest())
        return data.decode("utf-8"), etag
    except FileNotFoundError:
        return None, None
    except UnicodeDecodeError:
        raise StorageError(f"{url}: not a text file") from None
    except Exception as exc:  # noqa: BLE001
        if isinstance(translate(exc, url), NotFoundError):
            return None, None
        raise translate(exc, url) from None


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole object; atomic on local disk (temp file + rename), one PUT on S3."""
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            fs.pipe_file(path, data)
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url, "write") from None


def put_if_absent(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> bool:
    """Create an object only if it does not exist; True when this call created it.

    Atomic: a hard link of a complete temp file locally, ``If-None-Match: *`` on S3.
    """
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        bucket, _, key = path.partition("/")
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except FileExistsError:
        return False
    except Exception as exc:  # noqa: BLE001
        if _precondition_failed(exc):
            return False
        raise translate(exc, url, "write") from None


@contextlib.contextmanager
def _guarded(path: str) -> Iterator[str | None]:
    """Hold an exclusive ``flock`` on a local object's sidecar guard file
    (cooperating processes on one host) and give its version, as
    :func:`read_versioned` makes it, or None when it does not exist."""
    import fcntl

    with open(f"{path}.guard", "a+b") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                current: str | None = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            current = None
        yield current


def replace_if(
    url: str, data: bytes, version: str, storage_options: dict[str, Any] | None = None
) -> bool:
    """Replace an object only if it is still at ``version`` (from :func:`read_versioned`);
    True when replaced. ``If-Match`` on S3; locally a compare-and-swap under an
    exclusive ``flock`` on a sidecar file (cooperating processes on one host)."""
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            with _guarded(path) as current:
                if current is None or current != version:
                    return False
                write_bytes(url, data, storage_options)
                return True
        bucket, _, key = path.partition("/")
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
        return True
    except FruitdaskError:
        raise
    except Exception as exc:  # noqa: BLE001
        if _precondition_failed(exc) or isinstance(translate(exc, url), NotFoundError):
            return False
        raise translate(exc, url, "write") from None


def delete_if(url: str, version: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Delete an object only if it is still at ``version``; True when deleted.

    Locally under the same ``flock`` as :func:`replace_if`, whose sidecar file
    goes too, unlinked while still locked: a process waiting on it then finds
    the object gone and fails its swap. On S3 the check and the delete are two
    requests (a lock is deleted only by its holder, so nothing races them).
    """
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            with _guarded(path) as current:
                if current is not None and current != version:
                    return False  # someone else's now: their guard stays
                if current is not None:
                    os.remove(path)
                # gone, or gone already: no swap can succeed now, so the guard goes
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"{path}.guard")
                return current is not None
        _, current = read_versioned(url, storage_options)
        if current != version:
            return False
        fs.rm_file(path)
        return True
    except FileNotFoundError:
        return False
    except FruitdaskError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url, "delete") from None


def _precondition_failed(exc: BaseException) -> bool:
    code, status = s3_error_code(exc)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def write_table(
    table: pa.Table,
    url: str,
    storage_options: dict[str, Any] | None = None,
    compression: str = "snappy",
    row_group_size: int | None = None,
) -> int:
    """Write a pyarrow Table as one Parquet file (snappy); returns bytes written.

    Snappy, Parquet's usual default: ORB bytes and PCA floats barely compress
    (zstd saves ~8% of size here) and zstd costs 3x the CPU, ~10% of the job.
    """
    buf = _io.BytesIO()
    # Dictionary-encode only the strings (path/label/split repeat per keypoint):
    # pyarrow otherwise tries it on every column, and on PCA floats and ORB bytes
    # the attempt costs half the write time and then falls back.
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    pq.write_table(
        table, buf, compression=compression, use_dictionary=strings, row_group_size=row_group_size
    )
    data = buf.getvalue()
    write_bytes(url, data, storage_options)
    return len(data)


def read_table(url: str, storage_options: dict[str, Any] | None = None, columns=None) -> pa.Table:
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh, columns=columns)
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url) from None


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    try:
        fs.invalidate_cache(path)
        return bool(fs.exists(path))
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url) from None


def ls(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names (not paths) directly under a folder URL; empty when it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url, "list") from None
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def remove(urls: Iterable[str], storage_options: dict[str, Any] | None = None) -> None:
    """Delete the given files, and nothing else (missing ones are ignored)."""
    urls = list(urls)
    if not urls:
        return
    fs, _ = filesystem(urls[0], storage_options)
    paths = [filesystem(u, storage_options)[1] for u in urls]
    try:
        if is_local(fs):
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
        else:
            fs.rm(paths)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, urls[0], "delete") from None


def remove_empty_folders(url: str, names: Iterable[str]) -> None:
    """Remove the given local sub-folders of ``url`` if they are empty (S3 has none)."""
    if "://" in url and not url.startswith("file://"):
        return
    root = url.removeprefix("file://")
    for name in sorted(names, key=lambda n: -n.count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(root, name))


def check_writable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail early, with one line, when the output location cannot be written."""
    fs, path = filesystem(url, storage_options)
    try:
        if is_local(fs):
            _check_local_folder(path)
        else:
            bucket, _, key = path.partition("/")
            # One ListObjectsV2 under the output's own prefix (MaxKeys=1): an IAM
            # policy may allow listing that prefix only, not the bucket's root.
            # Not fs.exists(): s3fs answers False for a bucket it may not read.
            prefix = key.rstrip("/") + "/" if key else ""
            try:
                fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
            except FileNotFoundError:
                raise NotFoundError(f"{url}: bucket {bucket} does not exist") from None
    except FruitdaskError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url, "write") from None


def _check_local_folder(path: str) -> None:
    """Raise unless a folder could be created at (or exists as) ``path``.

    The nearest existing ancestor must be a folder in which this process can
    create entries: a probe folder is made there and removed (permission bits
    say nothing for root, nor for file systems like /proc)."""
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    parent = parent or "."
    if not os.path.isdir(parent):
        raise InputError(f"{path}: cannot write here ({parent} is a file, not a folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fruitdask-write-check-", dir=parent))
    except OSError as exc:
        raise StorageError(f"{path}: cannot write in {parent} ({one_line(exc)})") from None


def check_reachable(
    url: str, storage_options: dict[str, Any] | None = None, timeout: float = 2.0
) -> None:
    """One TCP connection to a custom S3 endpoint, so that a wrong or dead
    endpoint is reported in about ``timeout`` seconds, not after the clients'
    retries (a refused connection: at once)."""
    endpoint = (storage_options or {}).get("endpoint_url") or (
        (storage_options or {}).get("client_kwargs") or {}
    ).get("endpoint_url")
    if not is_s3(url) or not endpoint:
        return
    _check_endpoint(storage_options or {})  # a password in it is refused, never shown
    parsed = urlparse(str(endpoint))
    if not parsed.hostname:
        raise InputError(f"--endpoint-url {endpoint}: expected a URL like http://host:port")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise TransientError(
            f"{endpoint}: cannot reach the storage endpoint ({one_line(exc)})"
        ) from None
