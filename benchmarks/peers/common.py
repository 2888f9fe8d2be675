"""What the peer jobs share: options, storage, the descriptor columns, PCA, publishing.

Only the parts that are not the engines' business: the command line (the options
``benchmarks/compare.py`` passes every engine), S3 settings, packing a batch's
descriptors into Arrow columns, the exact PCA from moments, and the manifest,
model and ``_SUCCESS`` written last, as ``fruitdask run`` writes them. Imports
neither Dask nor the engines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from fruitdask import features, io
from fruitdask.errors import StorageError
from fruitdask.pca import Moments, PcaModel, combine_moments, exact_pca, exact_report, moments

#: Extensions fruitdask lists (any case), without the dot.
EXTENSIONS = [e.lstrip(".") for e in io.IMAGE_EXTENSIONS]
#: The images table's columns, in :data:`fruitdask.tables.IMAGES_SCHEMA`'s order.
IMAGE_COLUMNS = [
    "path",
    "label",
    "split",
    "size",
    "width",
    "height",
    "n_keypoints",
    "status",
    "error",
]
#: Per-image column holding the image's descriptors, ``32 * n_keypoints`` bytes.
DESC = "desc"

EXIT_USAGE = 2


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every peer takes (those compare.py passes to every engine)."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--input", required=True, help="image folder or s3:// prefix")
    ap.add_argument("--output", required=True, help="output folder or s3:// prefix")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores to use")
    ap.add_argument("--n-components", type=int, default=20, help="PCA components (20)")
    ap.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                    help="fsspec/s3fs option for input and output (repeatable)")  # fmt: skip
    ap.add_argument("--endpoint-url", help="S3 endpoint (e.g. a local SeaweedFS)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def is_s3(url: str) -> bool:
    return url.startswith(("s3://", "s3a://"))


def strip_scheme(url: str) -> str:
    """``bucket/prefix`` of an S3 URL, the absolute path of a local one."""
    if is_s3(url):
        return url.split("://", 1)[1].rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(url).rstrip("/") or "/"


def s3_settings(so: dict[str, Any]) -> dict[str, Any]:
    """endpoint, region, scheme, credentials and anonymity from s3fs-style options,
    falling back to the AWS_* environment variables."""
    ck = dict(so.get("client_kwargs") or {})
    endpoint = so.get("endpoint_url") or ck.get("endpoint_url")
    region = (
        so.get("region")
        or ck.get("region_name")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    return {
        "endpoint": endpoint,
        "region": region,
        "key": so.get("key") or os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret": so.get("secret") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "token": so.get("token") or os.environ.get("AWS_SESSION_TOKEN"),
        "anon": bool(so.get("anon")),
    }


def arrow_s3(so: dict[str, Any]):
    """A pyarrow ``S3FileSystem`` for s3fs-style options (what Ray Data reads with)."""
    from pyarrow import fs as pafs

    s = s3_settings(so)
    kw: dict[str, Any] = {"region": s["region"]}
    if s["endpoint"]:
        scheme, _, host = str(s["endpoint"]).partition("://")
        kw["endpoint_override"] = host or scheme
        kw["scheme"] = scheme if host else "https"
    if s["anon"]:
        kw["anonymous"] = True
    elif s["key"]:
        kw["access_key"] = s["key"]
        kw["secret_key"] = s["secret"]
        if s["token"]:
            kw["session_token"] = s["token"]
    return pafs.S3FileSystem(**kw)


# ---------------------------------------------------------------- packed input
#: The columns of a pack's shards the jobs read (``fruitdask.pack.PACK_SCHEMA``).
PACK_COLUMNS = ["path", "label", "split", "size", "bytes", "error"]


def packed_shards(url: str, so: dict[str, Any]) -> tuple[list[str], int] | None:
    """The shard files (engine paths: ``bucket/key`` or absolute) and image count
    of a committed ``fruitdask pack`` at ``url``; None for a folder of images.
    Reading a pack means reading its Parquet shards, which every engine does
    natively (``read_parquet``), one request per row group instead of per image."""
    from fruitdask.output import read_committed

    manifest = read_committed(url, so)
    if not manifest or not str(manifest.get("format", "")).startswith("fruitdask-pack/"):
        return None
    root = strip_scheme(url)
    return [f"{root}/{f}" for f in manifest["files"]["shards"]], int(manifest["images"])


def packed_blobs(data: list[bytes | None], errors: list[str | None]) -> list[Any]:
    """A packed batch's image bytes; a row the packer could not read (null bytes)
    becomes an error naming why, as a loose file that failed to read would."""
    return [
        b if b is not None else StorageError(e or "unreadable when packed")
        for b, e in zip(data, errors, strict=True)
    ]


# ---------------------------------------------------------------- descriptors
def desc_blobs(desc: np.ndarray, counts: np.ndarray) -> pa.Array:
    """One binary value per image: its ``counts[i]`` descriptors, 32 bytes each,
    sharing ``desc``'s buffer (no copy per image)."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    offsets *= features.DESCRIPTOR_BYTES
    return pa.Array.from_buffers(
        pa.binary(),
        len(counts),
        [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(np.ascontiguousarray(desc))],
    )


def desc_array(blobs: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, 32) uint8: the descriptors of a binary column (per-image blobs or one
    descriptor per value; ``binary`` or ``large_binary``), concatenated in order."""
    if isinstance(blobs, pa.ChunkedArray):
        chunks = [desc_array(c) for c in blobs.chunks]
        return np.concatenate(chunks) if chunks else np.zeros((0, 32), np.uint8)
    if len(blobs) == 0:
        return np.zeros((0, features.DESCRIPTOR_BYTES), np.uint8)
    large = pa.types.is_large_binary(blobs.type)
    off = np.frombuffer(blobs.buffers()[1], dtype=np.int64 if large else np.int32)
    off = off[blobs.offset : blobs.offset + len(blobs) + 1]
    data = np.frombuffer(blobs.buffers()[2], dtype=np.uint8)[int(off[0]) : int(off[-1])]
    # values are contiguous between the first and last offsets (no nulls here)
    return data.reshape(-1, features.DESCRIPTOR_BYTES)


def blob_moments(blobs: pa.Array | pa.ChunkedArray) -> Moments:
    return moments(desc_array(blobs))


def moments_to_list(m: Moments) -> list[float]:
    """A Moments as one flat list of floats (n, mean, scatter): a plain value any
    engine can carry between stages."""
    return [float(m.n), *m.mean.tolist(), *m.scatter.ravel().tolist()]


def moments_from_list(v: list[float] | np.ndarray | None, d: int = 32) -> Moments:
    if v is None or len(v) == 0:
        return Moments(0, np.zeros(d), np.zeros((d, d)))
    a = np.asarray(v, dtype=np.float64)
    return Moments(int(a[0]), a[1 : 1 + d].copy(), a[1 + d : 1 + d + d * d].reshape(d, d).copy())


def merge_lists(a: list[float] | None, b: list[float] | None) -> list[float]:
    return moments_to_list(combine_moments(moments_from_list(a), moments_from_list(b)))


def fit_pca(total: Moments, n_components: int) -> tuple[PcaModel, dict[str, Any]]:
    """The exact PCA of all descriptors, and the manifest's ``pca`` entry."""
    if total.n < max(2, n_components):
        raise SystemExit(
            f"only {total.n} ORB descriptors; PCA with {n_components} components needs more"
        )
    model = exact_pca(total, n_components)
    return model, exact_report(model)


def project(blobs: pa.Array | pa.ChunkedArray, model: PcaModel) -> np.ndarray:
    """float32 (n, k): centred projection of a binary descriptor column."""
    d = desc_array(blobs)
    if len(d) == 0:
        return np.zeros((0, model.n_components), np.float32)
    return model.transform(d)


# ---------------------------------------------------------------- output
class Output:
    """The output location: refuse to clobber, then publish like ``fruitdask run``."""

    def __init__(self, url: str, so: dict[str, Any], overwrite: bool = False) -> None:
        from fruitdask.errors import FruitdaskError
        from fruitdask.output import OutputDir

        self.url = url.rstrip("/") if len(url) > 1 else url
        self.so = so
        self.run_id = uuid.uuid4().hex[:8]
        # fruitdask's lifecycle: refused unless empty or a previous output
        # (--overwrite), locked while this run writes, committed by publish()
        self.out = OutputDir(self.url, so)
        try:
            self.out.check("overwrite" if overwrite else "new")
            self.out.lock(self.run_id)
        except FruitdaskError as exc:
            raise SystemExit(str(exc)) from None
        # What an overwritten run left: not this run's, though the engines'
        # writers name their files without our run id (Ray's do).
        self._old = {t: set(self._parquet(t)) for t in ("images", "descriptors", "features")}

    def join(self, *parts: str) -> str:
        return io.join(self.url, *parts)

    def _parquet(self, table: str) -> list[str]:
        return [f"{table}/{n}" for n in io.ls(self.join(table), self.so) if n.endswith(".parquet")]

    def local(self) -> bool:
        return not is_s3(self.url) and "://" not in self.url.replace("file://", "")

    def listed(self, table: str) -> list[str]:
        """``table/<name>`` of the Parquet files this run wrote under ``table/``, sorted."""
        return [f for f in self._parquet(table) if f not in self._old.get(table, set())]

    def write_model(self, model: PcaModel) -> str:
        """Write the model (first step of publishing); its path relative to the output."""
        name = f"model/pca-{self.run_id}.json"
        io.write_bytes(self.join(name), model.to_json().encode(), self.so)
        return name

    def commit(self, manifest: dict[str, Any]) -> None:
        """Commit as fruitdask does (:meth:`fruitdask.output.OutputDir.publish`):
        the manifest, then ``_SUCCESS`` (holding the run id) last."""
        from fruitdask.output import RunState

        try:
            self.out.publish(RunState(self.url, self.so, self.run_id), manifest)
        finally:
            self.out.release()


def versions(**engines: str) -> dict[str, str]:
    """fruitdask's record of the libraries (the kernel's, and the fitters' this
    process loaded), with the engine's own version."""
    from fruitdask.output import library_versions

    return {**library_versions(), **engines}


def manifest(
    engine: str,
    out: Output,
    inp: str,
    counts: dict[str, int],
    timings: dict[str, float],
    pca: dict[str, Any],
    files: dict[str, list[str]],
    cores: int,
    settings: dict[str, Any],
    engine_versions: dict[str, str],
) -> dict[str, Any]:
    work = sum(v for k, v in timings.items() if k != "startup")
    return {
        "format": "fruitdask-output/1",
        "engine": engine,
        "run_id": out.run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": inp,
        "cores": cores,
        "settings": settings,
        "counts": counts,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "throughput": {"images_per_s": round(counts["images"] / work, 1) if work else None},
        "pca": pca,
        "files": files,
        "versions": versions(**engine_versions),
    }


def print_summary(m: dict[str, Any], output: str, as_json: bool, partitions: int) -> None:
    c = m["counts"]
    if as_json:
        print(
            json.dumps(
                {
                    "engine": m["engine"],
                    "output": output,
                    "run_id": m["run_id"],
                    "images": c["images"],
                    "ok": c["ok"],
                    "no_keypoints": c["no_keypoints"],
                    "error": c["error"],
                    "descriptors": c["descriptors"],
                    "partitions": partitions,
                    "timings": m["timings"],
                    "images_per_s": m["throughput"]["images_per_s"],
                    "pca": m["pca"],
                }
            )
        )
        return
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in m["timings"].items())
    print(
        f"{m['engine']}: {c['images']:,} images ({c['ok']:,} ok, {c['no_keypoints']:,} no "
        f"keypoints, {c['error']:,} failed), {c['descriptors']:,} descriptors\n"
        f"stages: {stages}\noutput: {output}"
    )


def main(prog: str, parser: argparse.ArgumentParser, run, argv: list[str] | None) -> int:
    """A peer's command: parse, ``run(args)`` (which returns the manifest), print
    the summary; a bad setting or a storage failure is one line, exit 2."""
    from fruitdask.errors import InputError

    args = parser.parse_args(argv)
    if args.cores < 1:
        return fail(prog, ValueError("--cores must be >= 1"))
    try:
        m = run(args)
    except (io.StorageError, InputError, ValueError) as exc:
        return fail(prog, exc)
    print_summary(m, args.output, args.json, m["counts"]["partitions"])
    return 0


def fail(prog: str, exc: BaseException) -> int:
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE
