"""`fruitdask pack`: shards of image bytes that `run` reads like the loose files."""

from __future__ import annotations

import collections

import pyarrow.parquet as pq
import pytest

from fruitdask import io, pack, pipeline
from fruitdask.config import RunConfig


def _rows(url, table, so=None):
    fs, path = io.filesystem(url, so)
    files = sorted(f for f in fs.find(f"{path}/{table}") if f.endswith(".parquet"))
    return [r for f in files for r in pq.read_table(fs.open(f, "rb")).to_pylist()]


def _images(url, so=None):
    return sorted(
        (r["path"], r["label"], r["split"], r["status"], r["n_keypoints"])
        for r in _rows(url, "images", so)
    )


def _descriptors(url, so=None):
    return collections.Counter((r["path"], r["descriptor"]) for r in _rows(url, "descriptors", so))


def test_pack_local_then_run_equals_loose_run(dask_client, sample_dir, tmp_path):
    # a file that cannot be read at pack time keeps its row, with the reason
    bad = sample_dir.parent / "with-bad"
    if not bad.exists():
        import shutil

        shutil.copytree(sample_dir, bad)
        (bad / "Training" / "Apple Braeburn" / "broken_100.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    packed = str(tmp_path / "packed")
    s = pack.pack(str(bad), packed, dask_client, shard_size=40, row_group_size=16)
    n = len(list(bad.rglob("*.jpg")))
    assert s.images == n and s.shards == -(-n // 40) and s.unreadable == 0
    # plain Parquet: the shards hold the original bytes
    shard = pq.read_table(tmp_path / "packed" / "shards" / "part-00000.parquet")
    first = shard.to_pylist()[0]
    assert first["bytes"] == (bad / first["path"]).read_bytes()
    assert pq.ParquetFile(tmp_path / "packed" / "shards" / "part-00000.parquet").num_row_groups == 3

    listing = io.list_images(packed)
    assert list(listing["path"]) == list(io.list_images(str(bad))["path"])
    ranges = pipeline.plan_packed_partitions(listing, 1000)
    # partitions hold whole row groups: no row group is read by two tasks
    owner = {}
    for k, (a, b) in enumerate(ranges):
        rows = listing.iloc[a:b]
        for key in set(zip(rows["shard"], rows["row_group"], strict=True)):
            assert owner.setdefault(key, k) == k
    assert sum(b - a for a, b in ranges) == len(listing)

    a = pipeline.run(RunConfig(input=packed, output=str(tmp_path / "a")), dask_client)
    b = pipeline.run(RunConfig(input=str(bad), output=str(tmp_path / "b")), dask_client)
    assert a.images == b.images == n and a.images_error == b.images_error == 1
    assert _images(str(tmp_path / "a")) == _images(str(tmp_path / "b"))
    assert _descriptors(str(tmp_path / "a")) == _descriptors(str(tmp_path / "b"))

    # packing again is a no-op; another source into the same folder is refused
    assert pack.pack(
        str(bad), packed, dask_client, shard_size=40, row_group_size=16
    ).already_complete
    with pytest.raises(pack.PackExistsError):
        pack.pack(str(sample_dir), packed, dask_client, shard_size=40, row_group_size=16)


def test_pack_resumes_missing_shards(dask_client, sample_dir, tmp_path):
    packed = tmp_path / "packed"
    pack.pack(str(sample_dir), str(packed), dask_client, shard_size=20, row_group_size=10)
    index = packed / "_fruitdask_pack" / "index.parquet"
    victim = packed / "shards" / "part-00002.parquet"
    before = victim.read_bytes()
    # as if interrupted: the index (written last) and one shard missing
    index.unlink()
    victim.unlink()
    keep = packed / "shards" / "part-00000.parquet"
    mtime = keep.stat().st_mtime_ns
    s = pack.pack(str(sample_dir), str(packed), dask_client, shard_size=20, row_group_size=10)
    assert s.shards_resumed == s.shards - 1
    assert keep.stat().st_mtime_ns == mtime  # not rewritten
    assert victim.read_bytes() == before and index.exists()


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
