"""Reliability II (issue 13): hostile trees, S3 keys, a full disk, resume checks.

Every entry of an input named like an image gets exactly one ``images/`` row:
``ok``, or ``error`` with a one-line reason naming what it is (a symbolic link
loop, a FIFO, a socket, a device, a broken link, a folder, permission denied),
and the run ends with exit 0; nothing blocks it. S3 keys are data: a key is
read exactly as listed, or gets an error row, never another object's bytes. A
run that fills its disk ends with one line and leaves no temporary files and
no ``_SUCCESS``. ``--resume`` continues only the same job over the same files.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from fruitdask import features, pipeline
from fruitdask.config import RunConfig
from fruitdask.errors import StorageError
from fruitdask.output import SUCCESS
from fruitdask.testing import committed_tables


def _rows(out, so=None) -> dict[str, dict]:
    snap = committed_tables(str(out), so)
    assert snap is not None, f"{out}: nothing committed"
    rows = [r for t in snap["tables"]["images"] for r in t.to_pylist()]
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "two rows for one path"
    return by_path


def _descriptors(out, so=None) -> collections.Counter:
    snap = committed_tables(str(out), so)
    assert snap is not None
    return collections.Counter(
        (r["path"], r["descriptor"])
        for t in snap["tables"]["descriptors"]
        for r in t.select(["path", "descriptor"]).to_pylist()
    )


def _check_error(row: dict, needle: str) -> None:
    assert row["status"] == "error", row
    reason = row["error"] or ""
    assert needle in reason and "\n" not in reason and len(reason) < 300, (row["path"], reason)
    assert row["n_keypoints"] == 0


def _check_own_bytes(rows: dict, desc: collections.Counter, expected: dict[str, bytes]) -> None:
    """Each row is its own file's: the kernel on exactly those bytes."""
    for path, blob in expected.items():
        ref = features.extract(blob)
        row = rows[path]
        assert (row["status"], row["n_keypoints"], row["width"], row["height"]) == (
            ref.status, len(ref.descriptors), ref.width, ref.height), path  # fmt: skip
        mine = sorted(d for (p, d), n in desc.items() for _ in range(n) if p == path)
        assert mine == sorted(bytes(d) for d in ref.descriptors), path


# ---------------------------------------------------------------- local trees
def test_cli_over_a_hostile_tree(cli, hostile_tree, permission_bits_apply, tmp_path):
    """The CLI, with permission bits in force, over every hostile entry at once."""
    tree = hostile_tree
    out = tmp_path / "out"
    r = cli.run("run", "-i", str(tree.root), "-o", str(out), "--partition-size", "7",
                "--workers", "1", "--quiet", unprivileged=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    rows = _rows(out)
    swapped_still_files = {p: tree.root.joinpath(p).read_bytes() for p in tree.swapped}
    good = {**tree.good, **swapped_still_files}
    assert set(rows) == set(good) | set(tree.expected)  # one row per listed entry
    for path, needle in tree.expected.items():
        _check_error(rows[path], needle)
    _check_own_bytes(rows, _descriptors(out), good)
    snap = committed_tables(str(out))
    counts = snap["manifest"]["counts"]
    assert counts["images"] == len(rows) and counts["error"] == len(tree.expected)
    assert [x["path"] for x in snap["manifest"]["not_listed"]] == ["Training/Locked"]


def test_entries_changed_between_listing_and_reading(hostile_tree, dask_client, tmp_path):
    """Files that vanish or become a FIFO, a folder, a device link, a loop or a
    socket after the listing get error rows naming what they became (a FIFO
    swapped in used to hang the run forever)."""
    tree = hostile_tree
    cfg = RunConfig(input=str(tree.root), output=str(tmp_path / "out"), partition_size=5)
    listing, out = pipeline.preflight(cfg)
    tree.swap()
    s = pipeline.run(cfg, dask_client, listing=listing, out=out)
    rows = _rows(cfg.output)
    assert set(rows) == set(listing["path"]) and s.images == len(listing)
    for path, needle in tree.swapped.items():
        _check_error(rows[path], needle)
    for path, needle in tree.expected.items():
        if path not in tree.denied or os.geteuid() != 0:
            _check_error(rows[path], needle)
    _check_own_bytes(rows, _descriptors(cfg.output), tree.good)


# ---------------------------------------------------------------- S3 keys
def _images(sample_dir: Path, n: int) -> list[bytes]:
    blobs = [p.read_bytes() for p in sorted(sample_dir.rglob("*.jpg"))[:n]]
    assert len(set(blobs)) == n
    return blobs


UNADDRESSABLE = "'.', '..' or empty path segment"


def _tricky_keys(blobs: list[bytes]) -> tuple[dict[str, bytes], dict[str, bytes], dict[str, str]]:
    """(every object under ``in/``, the keys that must be read exactly, the keys
    that may only get an error row -> reason). Each object has its own image,
    and every key a client could normalise has a real object at the place it
    would normalise to."""
    objects = {
        "Training/escape.jpg": blobs[0],  # where Pear/../escape.jpg normalises to
        "Training/Pear/../escape.jpg": blobs[1],
        "Training/Pear/dot.jpg": blobs[2],
        "Training/Pear/./dot.jpg": blobs[3],
        "Training/Pear/double.jpg": blobs[4],
        "Training/Pear//double.jpg": blobs[5],
        "lead.jpg": blobs[6],
        "/lead.jpg": blobs[7],  # the key in//lead.jpg
        "Training/Pear/..jpg": blobs[8],
        "Training/Pear/.../x.jpg": blobs[9],
        "Training/Pear/%2E%2E/pct.jpg": blobs[10],
        "Training/pct.jpg": blobs[11],
        "Training/Pear/a b+c.jpg": blobs[12],
        "Training/Pear/q?x=1#f.jpg": blobs[13],
    }
    refused = {k: UNADDRESSABLE for k in
               ("Training/Pear/../escape.jpg", "Training/Pear/./dot.jpg",
                "Training/Pear//double.jpg", "/lead.jpg")}  # fmt: skip
    exact = {k: v for k, v in objects.items() if k not in refused}
    return objects, exact, refused


@pytest.mark.parametrize("client", ["arrow", "s3fs"])
def test_s3_keys_are_read_byte_exact(cli, moto_s3, sample_dir, tmp_path, client):
    """Against moto (keys byte-exact, like AWS), through both S3 clients: a key with
    ``..``, ``.`` or an empty segment gets an error row (``Pear/../escape.jpg``
    was read as ``Training/escape.jpg`` with status ok); every other key is read
    exactly as listed."""
    objects, exact, refused = _tricky_keys(_images(sample_dir, 14))
    bucket = moto_s3.make_bucket()
    moto_s3.put(bucket, {f"in/{k}": v for k, v in objects.items()})
    out = tmp_path / "out"
    opts = ["--endpoint-url", moto_s3.endpoint_url, "--storage-option", "key=testing",
            "--storage-option", "secret=testing", "--storage-option", f"s3_client={client}"]  # fmt: skip
    r = cli.run("run", "-i", f"s3://{bucket}/in", "-o", str(out), *opts, "--workers", "1",
                "--quiet", "--n-components", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    assert set(rows) == set(objects)
    for key, needle in refused.items():
        _check_error(rows[key], needle)
    _check_own_bytes(rows, _descriptors(out), exact)
    # an input URL with such a segment is refused whole, before anything starts
    r = cli.run("run", "-i", f"s3://{bucket}/in/Training/Pear/..", "-o", str(tmp_path / "o2"),
                *opts)  # fmt: skip
    cli.one_line(r, "Training/Pear/..", UNADDRESSABLE)
    assert not (tmp_path / "o2").exists()


@pytest.mark.s3
@pytest.mark.parametrize("client", ["arrow", "s3fs"])
def test_s3_keys_seaweedfs(s3, dask_client, sample_dir, tmp_path, client):
    """What SeaweedFS holds (it refuses ``.``/``..`` segments and folds ``//``) is
    read exactly as listed, through both clients."""
    blobs = _images(sample_dir, 6)
    objects = {
        "Training/Pear/..jpg": blobs[0],
        "Training/Pear/.../x.jpg": blobs[1],
        "Training/Pear/%2E%2E/pct.jpg": blobs[2],
        "Training/pct.jpg": blobs[3],
        "Training/Pear/a b+c.jpg": blobs[4],
        "Training/Pear/q?x=1#f.jpg": blobs[5],
    }
    bucket = s3.make_bucket()
    b = bucket.removeprefix("s3://")
    s3.fs().pipe({f"{b}/in/{k}": v for k, v in objects.items()})
    s3.fs().pipe(f"{b}/in/Training/Fold//folded.jpg", blobs[0])  # kept as Fold/folded.jpg
    so = {**s3.storage_options, "s3_client": client}
    out = tmp_path / "out"
    pipeline.run(RunConfig(input=f"{bucket}/in", output=str(out), storage_options=so,
                           n_components=2), dask_client)  # fmt: skip
    rows = _rows(out)
    assert set(rows) == set(objects) | {"Training/Fold/folded.jpg"}
    _check_own_bytes(rows, _descriptors(out), {**objects, "Training/Fold/folded.jpg": blobs[0]})


# ---------------------------------------------------------------- a full disk
def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)  # fmt: skip
    return r.returncode == 0


def _limit_file_size(limit: int):
    def preexec() -> None:
        # writes past `limit` bytes fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.parametrize("how", ["tmpfs", "file-size-limit"])
def test_disk_full(cli, sample_dir, tmp_path, how):
    """The output's file system fills up mid-run (a small tmpfs when this machine
    lets us mount one; else RLIMIT_FSIZE: the same write error, EFBIG instead
    of ENOSPC): one line, exit 2, no temporary files, no ``_SUCCESS``."""
    small = tmp_path / "small"
    mounted = False
    # two partitions: each data file is larger than the limit, the run's records are not
    args = ["run", "-i", str(sample_dir), "-o", str(small / "out"), "--workers", "1",
            "--partition-size", "48", "--quiet"]  # fmt: skip
    try:
        if how == "tmpfs":
            mounted = _tmpfs(small, "96k")
            if not mounted:
                pytest.skip("cannot mount a tmpfs here")
            r = cli.run(*args)
        else:
            small.mkdir()
            r = cli.run(*args, preexec=_limit_file_size(32 * 1024))
        line = cli.one_line(r, "cannot write")
        assert str(small / "out") in line or "out/" in line, line
        left = [p for p in small.rglob("*") if p.is_file()]
        assert [p.name for p in left if p.name == "state.json"], "the run never started"
        assert not [p for p in left if ".tmp" in p.name], left
        assert not (small / "out" / SUCCESS).exists()
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(small)], check=False)


# ---------------------------------------------------------------- resume
def _interrupted(src: Path, out: Path, **settings) -> str:
    """An output holding a run that started (run state and listing written) and
    never finished: what a killed run leaves. Returns its run id."""
    cfg = RunConfig.from_config(input=str(src), output=str(out), **settings)
    listing, od = pipeline.preflight(cfg)
    try:
        job = pipeline.begin(cfg, od, listing, threads=2)
    finally:
        od.release()
    assert job is not None and not (out / SUCCESS).exists()
    return job.run.run_id


def test_resume_refuses_a_file_rewritten_in_place(cli, sample_dir, tmp_path):
    """An image rewritten with the same size since the interrupted run: resume is
    refused naming it (its stale descriptors were kept)."""
    src = tmp_path / "in"
    shutil.copytree(sample_dir, src)
    out = tmp_path / "out"
    _interrupted(src, out)
    victim, other = sorted(src.rglob("*.jpg"))[:2]
    before = victim.stat()
    data = other.read_bytes()
    data = (data + b"\0" * before.st_size)[: before.st_size]  # other bytes, same size
    assert data != victim.read_bytes()
    victim.write_bytes(data)
    # a rewrite later than the run: mtime moves on (set, not waited for)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert victim.stat().st_size == before.st_size
    r = cli.run("run", "-i", str(src), "-o", str(out), "--resume")
    cli.one_line(r, "cannot resume", "modified", victim.relative_to(src).as_posix())
    assert not (out / SUCCESS).exists()


def test_resume_refuses_other_settings(cli, sample_dir, tmp_path):
    """``--resume --partition-size 100`` after a run with the default: refused
    naming the setting (the manifest used to record 100 while the run kept the
    old partitions). The same settings resume, and the manifest says so."""
    out = tmp_path / "out"
    run_id = _interrupted(sample_dir, out, partition_size=10)
    r = cli.run("run", "-i", str(sample_dir), "-o", str(out), "--resume", "--partition-size", "100")
    cli.one_line(r, "cannot resume", "partition_size", "10", "100")
    r = cli.run("run", "-i", str(sample_dir), "-o", str(out), "--resume", "--partition-size", "10",
                "--workers", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run_id"] == run_id
    assert manifest["config"]["partition_size"] == 10


# ---------------------------------------------------------------- a deadline
def test_a_hung_read_has_a_deadline(hung_fuse, sample_dir, tmp_path, monkeypatch):
    """A file on a file system that never answers a read (a hung NFS or FUSE
    mount): its image gets an error row after the deadline, and the files after
    it are still read (by a new reader: the blocked one is left in the kernel)."""
    from fruitdask import io

    root = tmp_path / "in"
    (root / "Training" / "Fruit").mkdir(parents=True)
    good = sorted(sample_dir.rglob("*.jpg"))[:2]
    (root / "Training" / "Fruit" / "a.jpg").write_bytes(good[0].read_bytes())
    os.symlink(hung_fuse.mountpoint / "hung.jpg", root / "Training" / "Fruit" / "b.jpg")
    (root / "Training" / "Fruit" / "c.jpg").write_bytes(good[1].read_bytes())
    listing = io.list_files(str(root))
    assert list(listing["size"]) == [good[0].stat().st_size, hung_fuse.SIZE, good[1].stat().st_size]
    monkeypatch.setattr(io, "LOCAL_READ_DEADLINE", 2.0)
    got = list(io.iter_objects(str(root), list(listing["path"])))
    assert got[0] == good[0].read_bytes() and got[2] == good[1].read_bytes()
    assert isinstance(got[1], StorageError), got[1]
    assert "b.jpg: read did not finish within 2 s" in str(got[1]), got[1]
    assert hung_fuse.reads_held, "the read was never sent to the file system"
