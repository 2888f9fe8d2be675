"""`fruitdask pack`: shards of image bytes that `run` reads like the loose files,
committed through the one output lifecycle."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fruitdask import pack, pipeline, source
from fruitdask.config import RunConfig
from fruitdask.errors import OutputExistsError
from fruitdask.output import read_committed
from fruitdask.partition import plan_packed_partitions
from fruitdask.testing import committed_tables


def _rows(url, table, so=None):
    snap = committed_tables(url, so)
    assert snap is not None
    return pa.concat_tables(snap["tables"][table]).to_pylist()


def _images(url, so=None):
    return sorted(
        (r["path"], r["label"], r["split"], r["status"], r["n_keypoints"])
        for r in _rows(url, "images", so)
    )


def _descriptors(url, so=None):
    return collections.Counter((r["path"], r["descriptor"]) for r in _rows(url, "descriptors", so))


@pytest.fixture(scope="module")
def with_bad(sample_dir, tmp_path_factory):
    """The session sample and one file that is not an image (it keeps its row)."""
    bad = tmp_path_factory.mktemp("pack") / "with-bad"
    shutil.copytree(sample_dir, bad)
    (bad / "Training" / "Apple Braeburn" / "broken_100.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return bad


def test_pack_local_then_run_equals_loose_run(dask_client, with_bad, sample_dir, tmp_path):
    packed = str(tmp_path / "packed")
    s = pack.pack(str(with_bad), packed, dask_client, shard_size=40, row_group_size=16)
    n = len(list(with_bad.rglob("*.jpg")))
    assert s.images == n and s.shards == -(-n // 40) and s.unreadable == 0
    manifest = read_committed(packed)
    assert manifest["format"] == source.PACK_FORMAT
    shard = tmp_path / "packed" / manifest["files"]["shards"][0]
    # plain Parquet: the shards hold the original bytes
    first = pq.read_table(shard).to_pylist()[0]
    assert first["bytes"] == (with_bad / first["path"]).read_bytes()
    assert pq.ParquetFile(shard).num_row_groups == 3

    listing = source.list_input(packed)
    assert source.is_packed(listing) and source.is_packed_url(packed)
    assert list(listing["path"]) == list(source.list_input(str(with_bad))["path"])
    ranges = plan_packed_partitions(listing, 1000)
    assert sum(b - a for a, b in ranges) == len(listing)

    a = pipeline.run(RunConfig(input=packed, output=str(tmp_path / "a")), dask_client)
    b = pipeline.run(RunConfig(input=str(with_bad), output=str(tmp_path / "b")), dask_client)
    assert a.images == b.images == n and a.images_error == b.images_error == 1
    assert _images(str(tmp_path / "a")) == _images(str(tmp_path / "b"))
    assert _descriptors(str(tmp_path / "a")) == _descriptors(str(tmp_path / "b"))

    # packing again is a no-op; another source into the same folder is refused
    again = pack.pack(str(with_bad), packed, dask_client, shard_size=40, row_group_size=16)
    assert again.already_complete
    with pytest.raises(OutputExistsError, match="another pack"):
        pack.pack(str(sample_dir), packed, dask_client, shard_size=40, row_group_size=16)
    # ... unless asked: the old shards go, only what the old pack listed
    pack.pack(str(sample_dir), packed, dask_client, shard_size=40, overwrite=True)
    assert not shard.exists()


def test_an_interrupted_pack_resumes(cli, sample_dir, tmp_path):
    """A pack killed after some shards resumes with them when run again."""
    packed = tmp_path / "packed"
    args = ("pack", str(sample_dir), str(packed), "--shard-size", "4", "--workers", "1",
            "--threads-per-worker", "1")  # fmt: skip
    run = cli.watch(*args)

    def markers() -> int:
        return sum(len(list(d.glob("*.json"))) for d in packed.glob("_fruitdask/runs/*/done"))

    assert run.wait_for(lambda: markers() >= 3)
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.finish()
    done = markers()
    assert read_committed(str(packed)) is None
    r = cli.run(*args, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["shards_resumed"] >= done and summary["images"] == 96
    assert source.list_input(str(packed))["path"].tolist() == sorted(
        p.relative_to(sample_dir).as_posix() for p in sample_dir.rglob("*.jpg")
    )


@pytest.mark.s3
def test_pack_s3_to_s3_and_run(dask_client, s3, sample_dir, tmp_path):
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/loose")
    so = s3.storage_options
    s = pack.pack(f"{bucket}/loose", f"{bucket}/packed", dask_client, so, shard_size=50)
    assert s.images == len(list(sample_dir.rglob("*.jpg")))
    out = f"{bucket}/out"
    r = pipeline.run(
        RunConfig(input=f"{bucket}/packed", output=out, storage_options=so), dask_client
    )
    ref = pipeline.run(RunConfig(input=str(sample_dir), output=str(tmp_path / "ref")), dask_client)
    assert r.images == ref.images and r.descriptors == ref.descriptors
    assert _descriptors(out, so) == _descriptors(str(tmp_path / "ref"))
