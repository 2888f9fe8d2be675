"""The only module that talks to storage: list images, read bytes, write files.

Everything goes through fsspec with the caller's ``storage_options`` (local
paths, ``file://``, ``s3://`` and anything else fsspec knows). Storage errors are
translated once, here, into :class:`StorageError` with one line naming the URL.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import os
import posixpath
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from fruitdask import fetch

__all__ = [
    "IMAGE_EXTENSIONS",
    "LISTING_COLUMNS",
    "StorageError",
    "filesystem",
    "join",
    "label_split",
    "list_images",
    "read_bytes",
    "read_table",
    "write_bytes",
    "write_table",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LISTING_COLUMNS = ("path", "label", "split", "size")
SPLITS = {"training": "Training", "test": "Test"}


class StorageError(Exception):
    """A storage failure, with a one-line message that names the URL at fault."""


class TransientStorageError(StorageError):
    """The store itself failed (unreachable, timing out, throttling, 5xx), not one
    object: retry the whole task, never record the images as bad files."""


# Messages of s3fs/botocore and pyarrow/AWS SDK errors that mean "the store
# failed". Matched on the message, which may also hold a key name: the markers
# are chosen so that a file name cannot plausibly contain them.
_TRANSIENT_TEXT = (
    "NETWORK_CONNECTION",
    "Couldn't connect to server",
    "Could not connect to the endpoint",
    "Connection refused",
    "Connection reset by peer",
    "SlowDown",
    "ServiceUnavailable",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "THROTTLING",
)
_TRANSIENT_STATUS = re.compile(r"(HTTP status|response code:?|status code:?) 5\d\d")


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the store (not the object) failed; see TransientStorageError."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if "EndpointConnectionError" in name or "ConnectTimeout" in name or "ReadTimeout" in name:
        return True
    text = str(exc)
    return any(t in text for t in _TRANSIENT_TEXT) or bool(_TRANSIENT_STATUS.search(text))


def _strip(url: str) -> str:
    return url.rstrip("/") if len(url) > 1 else url


def _s3_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs settings for many small objects (see shared/NOTES.md).

    ``max_concurrency=1`` stops ``cat_file`` sending a HEAD before every GET
    (~1.5 ms of client CPU per object); a bigger botocore pool lets the
    concurrent GETs of one task share connections; short connect timeouts make an
    unreachable endpoint fail in seconds rather than minutes.
    """
    opts = dict(options)
    opts.setdefault("max_concurrency", 1)
    ck = dict(opts.get("config_kwargs") or {})
    ck.setdefault("max_pool_connections", 64)
    ck.setdefault("connect_timeout", 5)
    ck.setdefault("read_timeout", 30)
    # 3 attempts with standard backoff (~1.5 s): outages longer than that are the
    # task retries' job (fruitdask.pipeline.RETRY_WAITS)
    ck.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
    opts["config_kwargs"] = ck
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """``(fs, path)`` for a URL, with fruitdask's defaults for S3.

    fsspec caches instances per process, so calling this inside every task is
    cheap and avoids shipping (non fork-safe) filesystem objects between processes.
    """
    options = dict(storage_options or {})
    protocol = fsspec.utils.get_protocol(url)
    tuned_s3 = protocol in ("s3", "s3a") and os.environ.get("FRUITDASK_S3_CLIENT") != "s3fs-plain"
    if tuned_s3:
        options = _s3_defaults(options)
    try:
        fs, path = url_to_fs(url, **options)
    except (ImportError, ValueError, TypeError) as exc:
        raise StorageError(f"cannot open {url}: {_one_line(exc)}") from None
    if tuned_s3:
        # One layer of retries per request, botocore's (see _s3_defaults): s3fs's
        # own 5 around it, and fruitdask's task retries around those, multiplied
        # into ~3 minutes before an unreachable endpoint was reported.
        fs.retries = 1
    return fs, _strip(path)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/`` (works for local paths and URLs)."""
    return posixpath.join(_strip(url), *parts)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def translate(exc: BaseException, url: str, action: str = "read") -> StorageError:
    """One clear message for a storage exception (cf. ``s3fs.errors.translate_boto_error``)."""
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
        what = "bucket" if "NoSuchBucket" in text or "bucket" in text.lower() else "path"
        return StorageError(f"{url}: not found ({what} does not exist)")
    if isinstance(exc, PermissionError) or any(
        s in text
        for s in (
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "Forbidden",
            "ACCESS_DENIED",
            "INVALID_ACCESS_KEY_ID",
            "SIGNATURE_DOES_NOT_MATCH",
        )
    ):
        return StorageError(f"{url}: access denied (check credentials and permissions)")
    if (
        "EndpointConnectionError" in name
        or "ConnectTimeout" in name
        or "Could not connect" in text
        or "NETWORK_CONNECTION" in text
        or isinstance(exc, (ConnectionError, TimeoutError))
    ):
        return StorageError(f"{url}: cannot reach the storage endpoint ({_one_line(exc)})")
    return StorageError(f"cannot {action} {url}: {_one_line(exc)}")


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


def _find_local(root: str) -> list[tuple[str, int]]:
    """(relative path, size) of image files under a local folder.

    ``os.scandir`` directly: fsspec's local ``find`` builds an info dict per file
    (~90 us each, 8 s for Fruits-360); this is ~10x cheaper. Symlinked folders
    are not followed (no cycles), as in ``find``.
    """
    out: list[tuple[str, int]] = []
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            for e in it:
                rel = f"{rel_dir}{e.name}"
                if e.is_dir(follow_symlinks=False):
                    stack.append((rel + "/", e.path))
                elif e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    out.append((rel, e.stat().st_size))
    return out


def _find_arrow(fs, root: str) -> list[tuple[str, int]]:
    """(relative path, size) of image objects under an S3 prefix, via pyarrow.

    The same ListObjectsV2 pages as s3fs, parsed in C++: ~5x faster (90k keys
    in ~2 s instead of ~13 s against SeaweedFS on loopback).
    """
    from pyarrow import fs as pafs

    prefix = root.rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), recursive=True))
    return [
        (i.path[len(prefix) :], int(i.size or 0))
        for i in infos
        if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_EXTENSIONS)
    ]


def list_images(url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """List image files under a URL, recursively, in a deterministic order.

    Parameters
    ----------
    url : str
        A local folder or fsspec URL (``s3://bucket/prefix``).
    storage_options : dict, optional
        Passed to fsspec.

    Returns
    -------
    DataFrame with columns ``path`` (relative to ``url``, ``/``-separated),
    ``label`` (the parent folder name), ``split`` (``Training``/``Test`` ancestor
    or None) and ``size`` (bytes), sorted by path. Only the listing is fetched,
    never the bytes.

    Raises
    ------
    StorageError
        The URL does not exist, cannot be reached, access is denied, or it holds
        no image files.
    """
    fs, root = filesystem(url, storage_options)
    packed = _packed_index(url, storage_options)
    if packed is not None:
        return packed
    try:
        if not fs.exists(root):
            raise StorageError(f"{url}: not found (no such file, folder, bucket or prefix)")
        if fs.isfile(root):
            raise StorageError(f"{url}: is a file; give the folder that holds the images")
        arrow = (
            _arrow_s3(root, dict(storage_options or {}))
            if fsspec.utils.get_protocol(url) in ("s3", "s3a")
            else None
        )
        if _is_local(fs):
            found = _find_local(root)
        elif arrow is not None:
            found = _find_arrow(arrow, root)
        else:
            prefix = root.rstrip("/") + "/"
            found = [
                (
                    full[len(prefix) :] if full.startswith(prefix) else posixpath.basename(full),
                    int(info.get("size") or 0),
                )
                for full, info in fs.find(root, detail=True, withdirs=False).items()
                if full.lower().endswith(IMAGE_EXTENSIONS)
            ]
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated into one line at the boundary
        raise translate(exc, url, "list") from None
    paths, sources, labels, splits, sizes = [], [], [], [], []
    for rel, size in found:
        shown = _displayable(rel)
        label, split = label_split(shown)
        paths.append(shown)
        sources.append(rel)
        labels.append(label)
        splits.append(split)
        sizes.append(size)
    if not paths:
        raise StorageError(
            f"{url}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    columns = {
        "path": pd.array(paths, dtype="string"),
        "label": pd.array(labels, dtype="string"),
        "split": pd.array(splits, dtype="string"),
        "size": pd.array(sizes, dtype="int64"),
    }
    if sources != paths:
        # some names are not UTF-8: read by the real name, show the escaped one
        # (as bytes: pandas would turn a column of str into Arrow strings, which
        # cannot hold the surrogates)
        columns["source"] = pd.Series([os.fsencode(x) for x in sources], dtype=object)
    df = pd.DataFrame(columns)
    return df.sort_values("path", kind="stable", ignore_index=True)


def _displayable(name: str) -> str:
    """A local file name that is not valid UTF-8 (Python keeps its bytes as
    surrogates) as a UTF-8 string with the bad bytes escaped: ``caf\\xe9``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# FRUITDASK_S3_CLIENT (a diagnostic switch for benchmarks): "arrow" (default),
# "s3fs" (s3fs with the settings above), "s3fs-plain" (s3fs as it comes).
# s3fs options that map one to one onto pyarrow's S3FileSystem; any other option
# (a profile, requester-pays, custom botocore config) keeps the s3fs path.
_ARROW_S3_KEYS = {"key", "secret", "token", "anon", "endpoint_url", "region", "client_kwargs"}
_arrow_s3_cache: dict[str, Any] = {}
_READ_THREADS = 16
# Loose objects: requests in flight per task as the store's latency needs
# (fruitdask.fetch), one window per process so a task starts where the last
# one ended. Arrow sizes the AWS SDK's connection pool of a new S3FileSystem
# as max(25, its IO thread pool's capacity) (s3fs.cc, ARROW-15035): 25 capped
# a worker's requests in flight, its tasks sharing the cached filesystem.
# FRUITDASK_FETCH=fixed: the reader as it was (16 threads), for benchmarks.
_READ_WINDOW = fetch.Window(low=4, high=128, initial=16)
_S3_CONNECTIONS = 256


def _arrow_s3(root: str, options: dict[str, Any]):
    """A pyarrow ``S3FileSystem`` for these s3fs-style options, or None.

    pyarrow's C++ client costs ~0.7 ms of CPU per small object against ~1.4 ms
    for s3fs/botocore (measured on SeaweedFS: 1,300-1,400 vs 700 objects/s in one
    process); with the S3 server on the same cores that CPU is the bottleneck.
    """
    if os.environ.get("FRUITDASK_S3_CLIENT", "arrow") != "arrow":
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
        kw["region"] = region or pafs.resolve_s3_region(root.split("/", 1)[0])
    if options.get("anon"):
        kw["anonymous"] = True
    elif options.get("key"):
        kw["access_key"] = options["key"]
        kw["secret_key"] = options.get("secret")
        if options.get("token"):
            kw["session_token"] = options["token"]
    if os.environ.get("FRUITDASK_FETCH") != "fixed" and pa.io_thread_count() < _S3_CONNECTIONS:
        pa.set_io_thread_count(_S3_CONNECTIONS)  # threads start only when used
    fs = pafs.S3FileSystem(**kw)
    _arrow_s3_cache[cache_key] = fs
    return fs


def _read_arrow(fs, full: list[str]) -> list[bytes | Exception]:
    return list(_iter_arrow(fs, full))


def _iter_arrow(fs, full: list[str]) -> Iterator[bytes | Exception]:
    from concurrent.futures import ThreadPoolExecutor

    def get(path: str) -> bytes | Exception:
        try:
            with fs.open_input_stream(path, compression=None) as f:
                return f.read()
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the partition
            if "NO_SUCH_KEY" in str(exc) or "does not exist" in str(exc):
                return FileNotFoundError(path)
            return exc

    if os.environ.get("FRUITDASK_FETCH") != "fixed":
        yield from fetch.fetch_ordered(get, full, _READ_WINDOW)
        return
    # pyarrow releases the GIL for the request: threads overlap the round trips,
    # and results are yielded in order as they arrive, so the caller's decoding
    # overlaps the rest of the downloads.
    pool = ThreadPoolExecutor(_READ_THREADS)
    try:
        yield from pool.map(get, full)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- packed inputs
#: Written last by ``fruitdask pack``: one row per image (path, label, split, size,
#: shard, row_group, row); its presence makes a folder a packed input.
PACK_INDEX = "_fruitdask_pack/index.parquet"


def _packed_index(url: str, storage_options: dict[str, Any] | None) -> pd.DataFrame | None:
    """The listing of a packed input (read from its index), or None if ``url`` is not one."""
    try:
        fs, path = filesystem(join(url, PACK_INDEX), storage_options)
        if not fs.exists(path):
            return None
    except Exception:  # noqa: BLE001 - not reachable here: list_images reports it
        return None
    df = read_table(join(url, PACK_INDEX), storage_options).to_pandas()
    for col in ("path", "label", "split", "shard"):
        df[col] = df[col].astype("string")
    return df


def read_packed(
    url: str, rows: pd.DataFrame, storage_options: dict[str, Any] | None = None
) -> list[bytes | Exception]:
    """Image bytes of ``rows`` of a packed listing (columns shard, row_group, row)."""
    return list(iter_packed(url, rows, storage_options))


def iter_packed(
    url: str, rows: pd.DataFrame, storage_options: dict[str, Any] | None = None
) -> Iterator[bytes | Exception]:
    """Yield the bytes of ``rows`` of a packed listing, in order.

    Reads only the row groups the rows fall in, only the ``bytes`` column: one
    ranged GET per row group instead of one request per image. All the groups
    are requested at once, so decoding the first overlaps fetching the rest.
    """
    from concurrent.futures import ThreadPoolExecutor

    keys = list(zip(rows["shard"], rows["row_group"], strict=True))
    # Fetch units: per shard, its first row group alone (so decoding starts
    # early), then the rest in one coalesced read (few requests to the store).
    units: list[tuple[str, list[int]]] = []
    for shard, groups in _groups_by_shard(keys).items():
        units.append((shard, groups[:1]))
        if len(groups) > 1:
            units.append((shard, groups[1:]))
    unit_of = {(shard, g): k for k, (shard, gs) in enumerate(units) for g in gs}

    pool = ThreadPoolExecutor(4)
    try:
        futures = [
            pool.submit(_read_row_groups, join(url, str(shard)), gs, storage_options)
            for shard, gs in units
        ]
        for key, r in zip(keys, rows["row"].tolist(), strict=True):
            try:
                blobs, errors, starts = futures[unit_of[key]].result()
            except Exception as exc:  # noqa: BLE001 - a bad shard fails its rows, not the run
                yield translate(exc, join(url, str(key[0])))
                continue
            i = starts[int(key[1])] + r
            # a file unreadable at pack time keeps its reason
            yield blobs[i] if blobs[i] is not None else OSError(errors[i] or "no bytes")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _groups_by_shard(keys: list[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for shard, g in dict.fromkeys(keys):
        out.setdefault(shard, []).append(int(g))
    return out


_PACKED = ["bytes", "error"]


def _read_row_groups(
    url: str, groups: list[int], storage_options: dict[str, Any] | None
) -> tuple[list[bytes | None], list[str | None], dict[int, int]]:
    """bytes and error of the given row groups of a shard, and where each group starts."""
    fs, path = filesystem(url, storage_options)
    arrow = None
    if fsspec.utils.get_protocol(url) in ("s3", "s3a"):
        arrow = _arrow_s3(path, dict(storage_options or {}))
    with contextlib.ExitStack() as stack:
        if arrow is not None:
            # pre_buffer coalesces the groups' column chunks into one ranged GET
            f = pq.ParquetFile(path, filesystem=arrow, pre_buffer=True)
        else:
            f = pq.ParquetFile(stack.enter_context(fs.open(path, "rb")))
        table = f.read_row_groups(groups, columns=_PACKED)
        starts, n = {}, 0
        for g in groups:
            starts[g] = n
            n += f.metadata.row_group(g).num_rows
    return table.column("bytes").to_pylist(), table.column("error").to_pylist(), starts


def _read_local(paths: Sequence[str | bytes]) -> list[bytes | Exception]:
    out: list[bytes | Exception] = []
    for f in paths:
        try:
            with open(f, "rb") as fh:
                out.append(fh.read())
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the partition
            out.append(exc)
    return out


def read_images(
    url: str, rows: pd.DataFrame, storage_options: dict[str, Any] | None = None
) -> list[bytes | Exception]:
    """Bytes of the images in ``rows`` of a listing, loose files or packed shards."""
    return list(iter_images(url, rows, storage_options))


def iter_images(
    url: str, rows: pd.DataFrame, storage_options: dict[str, Any] | None = None
) -> Iterator[bytes | Exception]:
    """Yield the bytes of the images in ``rows`` in order, fetching ahead.

    Loose S3 objects and packed row groups are downloaded by background threads
    while the caller works on the images already yielded; a failure is yielded
    in the image's place, not raised.
    """
    if "shard" in rows.columns:
        yield from iter_packed(url, rows, storage_options)
        return
    if "source" in rows.columns:  # local files whose names are not UTF-8
        _, root = filesystem(url, storage_options)
        yield from _read_local([os.path.join(os.fsencode(root), b) for b in rows["source"]])
        return
    paths = list(rows["path"])
    if fsspec.utils.get_protocol(url) in ("s3", "s3a"):
        fs, root = filesystem(url, storage_options)
        arrow = _arrow_s3(root, dict(storage_options or {}))
        if arrow is not None:
            yield from _iter_arrow(arrow, [f"{root}/{p}" for p in paths])
            return
    yield from read_bytes(url, paths, storage_options)


def read_bytes(
    url: str, paths: Sequence[str], storage_options: dict[str, Any] | None = None
) -> list[bytes | Exception]:
    """Fetch many files under ``url`` at once; a failure is returned, not raised.

    On S3 the GETs run concurrently through pyarrow's C++ client (or s3fs for
    options pyarrow cannot take); other object stores use fsspec's async batch;
    local files are read with plain ``open``.

    Returns
    -------
    list of bytes or Exception, in the order of ``paths``.
    """
    fs, root = filesystem(url, storage_options)
    full = [f"{root}/{p}" for p in paths]
    if fsspec.utils.get_protocol(url) in ("s3", "s3a"):
        arrow = _arrow_s3(root, dict(storage_options or {}))
        if arrow is not None:
            return _read_arrow(arrow, full)
    if getattr(fs, "async_impl", False):
        got = fs.cat(full, on_error="return", batch_size=64)
        return [got.get(f, FileNotFoundError(f)) for f in full]
    out: list[bytes | Exception] = []
    local = _is_local(fs)
    for f in full:
        try:
            if local:
                with open(f, "rb") as fh:
                    out.append(fh.read())
            else:
                out.append(fs.cat_file(f))
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the partition
            out.append(exc)
    return out


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole object; atomic on local disk (temp file + rename), one PUT on S3."""
    fs, path = filesystem(url, storage_options)
    try:
        if _is_local(fs):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url, "write") from None


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
        table,
        buf,
        compression=compression,
        use_dictionary=strings,
        row_group_size=row_group_size,
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


def read_text(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Text of a small object, or None when it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url) from None


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    try:
        return bool(fs.exists(path))
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url) from None


def ls(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names (not paths) directly under a folder URL; empty when it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url) from None
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def remove(urls: Iterable[str], storage_options: dict[str, Any] | None = None) -> None:
    """Delete files (missing ones are ignored)."""
    urls = list(urls)
    if not urls:
        return
    fs, _ = filesystem(urls[0], storage_options)
    paths = [filesystem(u, storage_options)[1] for u in urls]
    try:
        if _is_local(fs):
            for p in paths:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
        else:
            fs.rm(paths)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, urls[0], "delete") from None


def remove_tree(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url, "delete") from None


def check_writable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail early, with one line, when the output location cannot be written."""
    fs, path = filesystem(url, storage_options)
    try:
        if _is_local(fs):
            check_local_folder(path)
        else:
            bucket = path.split("/", 1)[0]
            try:
                # not fs.exists(): s3fs answers False for a bucket it may not read
                fs.ls(bucket, detail=False)
            except FileNotFoundError:
                raise FileNotFoundError(f"NoSuchBucket {bucket}") from None
    except Exception as exc:  # noqa: BLE001
        raise translate(exc, url, "write") from None


def check_local_folder(path: str) -> None:
    """Raise StorageError unless a folder could be created at (or exists as) ``path``.

    The nearest existing ancestor must be a folder in which this process can
    create entries: a probe folder is made there and removed (permission bits
    say nothing for root, nor for file systems like /proc)."""
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    parent = parent or "."
    if not os.path.isdir(parent):
        raise StorageError(f"{path}: cannot write here ({parent} is a file, not a folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fruitdask-write-check-", dir=parent))
    except OSError as exc:
        raise StorageError(f"{path}: cannot write in {parent} ({_one_line(exc)})") from None


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol
