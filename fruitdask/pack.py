"""Pack a tree of small images into a few Parquet shards of image bytes.

Object stores charge per request: 90,000 loose 5 KB objects cost 90,000 GETs,
each worth more CPU than the ORB work on the image. A pack turns them into a
few ranged reads per task (:mod:`fruitdask.source` reads it like the tree).
A pack is an output like any other, committed through
:class:`fruitdask.output.OutputDir`::

    DST/shards/part-00000-<run>.parquet   path, label, split, size, bytes, error
    DST/index-<run>.parquet               one row per image: where its bytes are
    DST/manifest.json, DST/_SUCCESS       as every output

Each shard holds row groups of ``row_group_size`` images; ``run`` partitions a
packed input along them, so a task reads whole row groups. An interrupted pack
resumes when run again (its finished shards are kept).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from fruitdask import source
from fruitdask.cancel import StopToken
from fruitdask.cluster import gather_as_completed, n_threads
from fruitdask.errors import OutputExistsError, retrying, translate
from fruitdask.output import OutputDir, RunState, new_run_id, read_committed, recordable_options
from fruitdask.partition import plan_shards

__all__ = ["PACK_SCHEMA", "PackJob", "PackSummary", "pack", "preflight", "run_pack"]

PACK_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("size", pa.int64()),
        ("bytes", pa.binary()),
        ("error", pa.string()),  # why ``bytes`` is null: the source could not be read
    ]
)


@dataclass
class PackSummary:
    output: str
    images: int = 0
    unreadable: int = 0
    shards: int = 0
    shards_resumed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    already_complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PackJob:
    """A pack about to run: its source listing, locked destination and settings."""

    src: str
    so: dict[str, Any]
    listing: pd.DataFrame
    out: OutputDir
    settings: dict[str, Any]
    resume: bool = False
    summary: PackSummary = field(default_factory=lambda: PackSummary(output=""))

    @property
    def already_complete(self) -> bool:
        return self.summary.already_complete


def preflight(
    src: str,
    dst: str,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    shard_size: int = 5000,
    row_group_size: int = 250,
    overwrite: bool = False,
    stop: StopToken | None = None,
) -> PackJob:
    """List ``src`` and check and lock ``dst`` before a cluster starts.

    Without ``overwrite``: a finished pack of the same source and sizes is left
    alone, an interrupted one resumes, anything else is refused.
    """
    so = dict(storage_options or {})
    dso = so if dst_storage_options is None else dict(dst_storage_options)
    listing = retrying(source.list_input)(src, so)
    settings = {"source": src, "shard_size": shard_size, "row_group_size": row_group_size}
    out = OutputDir(dst, dso, kind=source.PACK_FORMAT)
    state = out.check("overwrite" if overwrite else "resume", {"source": (src, so)})
    out.lock(new_run_id(), stop=stop)
    job = PackJob(src, so, listing, out, settings, summary=PackSummary(output=dst))
    if overwrite or state == "empty":
        return job
    committed = read_committed(dst, dso)
    if state == "complete" and committed is not None:
        if committed.get("settings") == settings and committed.get("images") == len(listing):
            job.summary.already_complete = True
            return job
    elif state == "interrupted" and out.resumable() is not None:
        from fruitdask.errors import InputError

        try:
            out.resume(settings, listing)
            job.resume = True
            return job
        except InputError:
            pass
    out.release()
    raise OutputExistsError(
        f"{dst}: holds another pack (or one of another source); use --overwrite to replace it"
    )


def _pack_task(i: int, rows: pd.DataFrame, src: str, so: dict, run: RunState, rg: int) -> dict:
    """Read one shard's images and write them as one Parquet file."""
    data = list(source.iter_images(src, rows, so))
    blobs = [b if isinstance(b, bytes) else None for b in data]
    errors = [None if isinstance(b, bytes) else str(translate(b, str(p)))
              for b, p in zip(data, rows["path"], strict=True)]  # fmt: skip
    table = pa.table(
        {
            "path": pa.array(rows["path"], pa.string()),
            "label": pa.array(rows["label"], pa.string()),
            "split": pa.array(rows["split"], pa.string()),
            "size": pa.array(rows["size"], pa.int64()),
            "bytes": pa.array(blobs, pa.binary()),
            "error": pa.array(errors, pa.string()),
        },
        schema=PACK_SCHEMA,
    )
    # JPEG/PNG bytes do not compress: no codec, just row groups to read by.
    n = run.write_table(run.part("shards", i), table, compression="none", row_group_size=rg)
    info = {"bytes": n, "unreadable": sum(b is None for b in blobs), "images": len(rows)}
    run.mark_done(i, info)
    return info


def _index(listing: pd.DataFrame, ranges: list[tuple[int, int]], rg: int, run: RunState):
    shard, group, row = [], [], []
    for i, (a, b) in enumerate(ranges):
        for j in range(b - a):
            shard.append(run.part("shards", i))
            group.append(j // rg)
            row.append(j % rg)
    return pa.table(
        {
            "path": pa.array(listing["path"], pa.string()),
            "label": pa.array(listing["label"], pa.string()),
            "split": pa.array(listing["split"], pa.string()),
            "size": pa.array(listing["size"], pa.int64()),
            "mtime": pa.array(listing["mtime"], pa.int64()),
            "shard": pa.array(shard, pa.string()),
            "row_group": pa.array(group, pa.int32()),
            "row": pa.array(row, pa.int32()),
        }
    )


def pack(
    src: str,
    dst: str,
    client,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    shard_size: int = 5000,
    row_group_size: int = 250,
    overwrite: bool = False,
    progress: Callable[[str, int, int, int], None] | None = None,
    stop: StopToken | None = None,
) -> PackSummary:
    """Pack the images under ``src`` into Parquet shards under ``dst``, on a Dask
    cluster (S3 to S3 works: no image bytes pass the client).

    Without ``overwrite`` an interrupted pack of the same source resumes and a
    finished one is left alone (see :func:`preflight`).
    """
    job = preflight(src, dst, storage_options, dst_storage_options, shard_size,
                    row_group_size, overwrite, stop)  # fmt: skip
    try:
        if job.already_complete:
            return job.summary
        return run_pack(job, client, shard_size, row_group_size, progress, stop)
    finally:
        job.out.release()


def run_pack(
    job: PackJob,
    client,
    shard_size: int = 5000,
    row_group_size: int = 250,
    progress: Callable[[str, int, int, int], None] | None = None,
    stop: StopToken | None = None,
) -> PackSummary:
    """Pack ``job``'s source (:func:`preflight`) into shards and commit them."""
    t0 = time.perf_counter()
    stop = stop or StopToken()
    out, listing, summary = job.out, job.listing, job.summary
    if job.resume:
        run, state = out.resume(job.settings, listing)
        ranges = [(int(a), int(b)) for a, b in state["partitions"]]
    else:
        assert out.lease is not None
        ranges = plan_shards(len(listing), shard_size, n_threads(client))
        run = RunState(out.url, out.so, out.lease.run_id)
        files = [run.part("shards", i) for i in range(len(ranges))]
        out.start(run.run_id, job.settings, ranges, listing, [*files, _index_name(run)])
    done = run.done(len(ranges))
    summary.images, summary.shards = len(listing), len(ranges)
    summary.shards_resumed = len(done)
    for info in done.values():
        summary.bytes += int(info.get("bytes", 0))
        summary.unreadable += int(info.get("unreadable", 0))
    todo = [i for i in range(len(ranges)) if i not in done]
    futures = [
        client.submit(_pack_task, i, listing.iloc[ranges[i][0]:ranges[i][1]].reset_index(drop=True),
                      job.src, job.so, run, row_group_size, key=f"pack-{run.run_id}-{i:05d}")
        for i in todo
    ]  # fmt: skip
    seen = {"shards": summary.shards_resumed, "images": 0}

    def tick(_: int, r: dict[str, int]) -> None:
        summary.bytes += r["bytes"]
        summary.unreadable += r["unreadable"]
        seen["shards"] += 1
        seen["images"] += r["images"]
        if progress:
            progress("pack", seen["shards"], len(ranges), seen["images"])

    gather_as_completed(client, futures, stop, tick)
    run.write_table(_index_name(run), _index(listing, ranges, row_group_size, run))
    summary.seconds = time.perf_counter() - t0
    manifest = {
        "source": job.src,
        "settings": job.settings,
        "storage_options": recordable_options(job.so),
        "images": summary.images,
        "unreadable": summary.unreadable,
        "shards": summary.shards,
        "seconds": round(summary.seconds, 3),
        "files": {"shards": [run.part("shards", i) for i in range(len(ranges))],
                  "index": [_index_name(run)]},
    }  # fmt: skip
    out.publish(run, manifest, stop=stop)
    return summary


def _index_name(run: RunState) -> str:
    return f"index-{run.run_id}.parquet"
