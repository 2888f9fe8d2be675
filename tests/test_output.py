"""The one output lifecycle: check, lease, run state, publish, cleanup (local and S3)."""

from __future__ import annotations

import json
import os
import threading
import time

import pandas as pd
import pyarrow as pa
import pytest

from fruitdask import io
from fruitdask.cancel import StopToken
from fruitdask.errors import Cancelled, InputError, LockedError, OutputExistsError
from fruitdask.output import (
    Lease,
    OutputDir,
    check_apart,
    listing_changes,
    read_committed,
    recordable_options,
)


def _table(n: int) -> pa.Table:
    return pa.table({"x": list(range(n))})


def _commit(out: OutputDir, run_id: str, n: int = 2) -> dict:
    """A run with ``n`` partitions of one table, committed."""
    run = out.start(
        run_id, {"a": 1}, [(0, 1)] * n, files=[f"t/part-{i}-{run_id}" for i in range(n)]
    )
    files = []
    for i in range(n):
        rel = run.part("t", i)
        run.write_table(rel, _table(3))
        files.append(rel)
    out.publish(run, {"files": {"t": files}})
    return {"t": files}


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """An output location and its storage options, on disk and on SeaweedFS."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    s3 = request.getfixturevalue("s3")
    return f"{s3.make_bucket()}/out", s3.storage_options


def _files(url: str, so: dict) -> set[str]:
    fs, root = io.filesystem(url, so)
    fs.invalidate_cache()
    return {p[len(root) + 1 :] for p in fs.find(root)} if fs.exists(root) else set()


def test_publish_commits_last_and_cleans_only_listed_files(where):
    url, so = where
    out = OutputDir(url, so)
    assert out.check("new") == "empty"
    out.lock("r1")
    first = _commit(out, "r1")
    out.release()
    m = read_committed(url, so)
    assert m["run_id"] == "r1" and m["files"] == first
    assert json.loads(io.read_text(io.join(url, "manifest.json"), so))["run_id"] == "r1"

    # a file someone else put beside ours survives an overwrite
    io.write_bytes(io.join(url, "t", "notes.txt"), b"mine", so)
    with pytest.raises(OutputExistsError, match="already exists"):
        OutputDir(url, so).check("new")
    out = OutputDir(url, so)
    assert out.check("overwrite") == "complete"
    out.lock("r2")
    second = _commit(out, "r2", n=1)
    out.release()
    left = _files(url, so)
    assert set(second["t"]) <= left and not set(first["t"]) & left
    assert "t/notes.txt" in left
    assert not any("/runs/" in f or f.endswith("lock.json") for f in left), left
    assert read_committed(url, so)["run_id"] == "r2"


def test_an_abandoned_run_leaves_the_old_result_in_force(where):
    url, so = where
    out = OutputDir(url, so)
    out.lock("old")
    old = _commit(out, "old")
    out.release()
    # an overwrite that writes its files and dies before its commit
    out = OutputDir(url, so)
    out.check("overwrite")
    run = out.start("dead", {"a": 1}, [(0, 1)], files=["t/part-00000-dead.parquet"])
    run.write_table(run.part("t", 0), _table(9))
    assert read_committed(url, so)["files"] == old  # still the old run in force
    assert out.resumable()["run_id"] == "dead"
    assert OutputDir(url, so).check("resume") == "interrupted"
    # the next commit deletes what the abandoned run listed
    out = OutputDir(url, so)
    out.lease = None
    _commit(out, "next")
    left = _files(url, so)
    assert "t/part-00000-dead.parquet" not in left and not set(old["t"]) & left


def test_cleanup_never_follows_a_name_out_of_the_output(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    url = str(tmp_path / "out")
    out = OutputDir(url)
    run = out.start("evil", {}, [], files=["../precious.txt", "/etc/hostname", "t//x"])
    _commit(OutputDir(url), "good")
    assert outside.read_text() == "keep me"
    assert run.run_id == "evil"


def test_foreign_folders_are_refused_even_with_overwrite(tmp_path):
    home = tmp_path / "Documents"
    home.mkdir()
    (home / "thesis.tex").write_text("...")
    for mode in ("new", "overwrite", "resume"):
        with pytest.raises(OutputExistsError, match="fruitdask did not write"):
            OutputDir(str(home)).check(mode)
    assert (home / "thesis.tex").read_text() == "..."

    # A Spark/Hadoop output (a _SUCCESS of its own) and a folder holding someone
    # else's manifest.json are not fruitdask's either
    spark = tmp_path / "spark-out"
    spark.mkdir()
    (spark / "_SUCCESS").write_text("")
    (spark / "part-00000.parquet").write_bytes(b"PAR1")
    other = tmp_path / "dataset"
    other.mkdir()
    (other / "manifest.json").write_text('{"format": "coco", "images": 3}')
    for folder in (spark, other):
        with pytest.raises(OutputExistsError, match="fruitdask did not write"):
            OutputDir(str(folder)).check("overwrite")
    # a manifest.json of fruitdask's (round 1 wrote no _fruitdask/ folder) is
    (other / "manifest.json").write_text('{"format": "fruitdask-output/1", "run_id": "x"}')
    assert OutputDir(str(other)).check("overwrite") == "interrupted"


def test_outputs_of_another_kind_are_refused(tmp_path):
    url = str(tmp_path / "out")
    _commit(OutputDir(url, kind="fruitdask-train/1"), "t1")
    with pytest.raises(OutputExistsError, match="fruitdask-train/1 output"):
        OutputDir(url).check("overwrite")


@pytest.mark.parametrize(
    ("inp", "out", "needle"),
    [
        ("data", "data", "is the input"),
        ("data", "data/out", "is inside the input"),
        ("data/Training", "data", "holds the input"),
    ],
)
def test_output_and_input_stay_apart(tmp_path, inp, out, needle):
    (tmp_path / "data" / "Training").mkdir(parents=True)
    with pytest.raises(InputError, match=needle):
        check_apart(str(tmp_path / out), {"input": str(tmp_path / inp)}, {}, {})
    check_apart(str(tmp_path / "elsewhere"), {"input": str(tmp_path / inp)}, {}, {})


def test_output_and_input_stay_apart_through_a_symlink(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "alias")
    with pytest.raises(InputError, match="inside the input"):
        check_apart(str(tmp_path / "alias" / "out"), {"input": str(tmp_path / "data")}, {}, {})


@pytest.mark.s3
def test_output_and_input_stay_apart_on_s3(s3):
    bucket = s3.make_bucket()
    so = s3.storage_options
    with pytest.raises(InputError, match="inside the input"):
        check_apart(f"{bucket}/in/out", {"input": f"{bucket}/in"}, so, so)
    check_apart(f"{bucket}/input2", {"input": f"{bucket}/in"}, so, so)  # a prefix, not a folder


# ---------------------------------------------------------------- the lease
def test_one_writer_wins_a_race_for_the_lease(where):
    url, so = where
    lock = io.join(url, "_fruitdask", "lock.json")
    barrier = threading.Barrier(8)
    won, lost = [], []

    def race(i: int) -> None:
        barrier.wait()
        try:
            won.append(Lease(lock, so, f"run{i}").acquire())
        except LockedError as exc:
            lost.append(str(exc))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(won) == 1 and len(lost) == 7
    assert all(f"locked by run {won[0].run_id}" in m for m in lost)
    won[0].release()
    Lease(lock, so, "after").acquire().release()  # released: free again


def test_a_stale_lease_is_taken_over(where):
    url, so = where
    lock = io.join(url, "_fruitdask", "lock.json")
    stale = {"run_id": "gone", "host": "elsewhere/x", "pid": 1, "heartbeat": time.time() - 3600,
             "stale_after": 60}  # fmt: skip
    io.write_bytes(lock, json.dumps(stale).encode(), so)
    lease = Lease(lock, so, "new").acquire()
    assert json.loads(io.read_text(lock, so))["run_id"] == "new"
    lease.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    from fruitdask.output import _host  # the identity a lease records

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    lock = str(tmp_path / "lock.json")
    doc = {"run_id": "crashed", "host": _host(), "pid": child.pid, "pid_started": 1.0,
           "heartbeat": time.time(), "stale_after": 60}  # fmt: skip
    io.write_bytes(lock, json.dumps(doc).encode())
    Lease(lock, {}, "next").acquire().release()


def test_a_live_holder_keeps_its_lease(tmp_path):
    lock = str(tmp_path / "lock.json")
    holder = Lease(lock, {}, "holder").acquire()
    try:
        with pytest.raises(LockedError, match=r"locked by run holder \(pid \d+") as info:
            Lease(lock, {}, "second").acquire()
        assert "delete" in str(info.value) and lock in str(info.value)
    finally:
        holder.release()


def test_a_lost_lease_stops_the_commit(tmp_path):
    url = str(tmp_path / "out")
    stop = StopToken()
    out = OutputDir(url)
    lease = out.lock("mine", stop=stop, heartbeat=0.05)
    run = out.start("mine", {}, [])
    # another run takes the lease over (as after a long freeze)
    io.write_bytes(lease.url, json.dumps({"run_id": "thief", "heartbeat": time.time()}).encode())
    deadline = time.monotonic() + 60
    while lease.lost is None and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting on the heartbeat thread's marker
    assert lease.lost and stop.requested
    with pytest.raises(LockedError, match="taken over"):
        out.publish(run, {"files": {}}, stop=stop)
    assert read_committed(url) is None
    out.release()
    assert json.loads(io.read_text(lease.url))["run_id"] == "thief"  # not ours to delete


def test_a_stop_before_the_commit_writes_no_success(tmp_path):
    url = str(tmp_path / "out")
    out = OutputDir(url)
    run = out.start("r", {}, [])
    stop = StopToken()
    stop.request(15)
    with pytest.raises(Cancelled):
        out.publish(run, {"files": {}}, stop=stop)
    assert not (tmp_path / "out" / "_SUCCESS").exists()


# ---------------------------------------------------------------- resume and records
def test_resume_only_continues_the_same_job(tmp_path):
    url = str(tmp_path / "out")
    listing = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "size": [10, 20], "mtime": [1, 2]})
    OutputDir(url).start("r1", {"partition_size": 100, "input": "in"}, [(0, 2)], listing)
    out = OutputDir(url)
    with pytest.raises(InputError, match=r"partition_size was 100, now 5"):
        out.resume({"partition_size": 5, "input": "in"}, listing)
    changed = listing.assign(mtime=[1, 3])
    with pytest.raises(InputError, match=r"1 modified, e.g. b.jpg"):
        out.resume({"partition_size": 100, "input": "in"}, changed)
    run, state = out.resume({"partition_size": 100, "input": "in"}, listing)
    assert run.run_id == "r1" and state["partitions"] == [[0, 2]]


def test_listing_changes_in_words():
    a = pd.DataFrame({"path": ["x", "y"], "size": [1, 2], "mtime": [0, 0]})
    assert listing_changes(a, a.copy()) == ""
    b = pd.DataFrame({"path": ["x", "z"], "size": [1, 2], "mtime": [0, 0]})
    assert listing_changes(a, b) == "1 added, e.g. z; 1 removed, e.g. y"


def test_recordable_options_is_an_allow_list():
    opts = {
        "key": "AKIA-canary",
        "secret": "s3cr3t-canary",
        "endpoint_url": "http://user:pw-canary@127.0.0.1:9000",
        "region_name": "eu-west-1",
        "config_kwargs": {"proxies": {"https": "http://u:proxy-canary@p:3128"},
                          "max_pool_connections": 64},
        "client_kwargs": {"aws_session_token": "tok-canary", "region_name": "eu-west-1"},
        "headers": {"Authorization": "Bearer hdr-canary"},
        "some_new_option": "new-canary",
    }  # fmt: skip
    rec = recordable_options(opts)
    assert "canary" not in json.dumps(rec)
    assert rec["key"] == "***" and rec["region_name"] == "eu-west-1"
    assert rec["config_kwargs"] == {"max_pool_connections": 64}
    assert rec["endpoint_url"] == "http://***@127.0.0.1:9000"


def test_legacy_outputs_are_read_and_replaced(tmp_path):
    """An output of fruitdask's first round: manifest.json + _SUCCESS only."""
    out = tmp_path / "out"
    (out / "t").mkdir(parents=True)
    (out / "t" / "part-00000-old.parquet").write_bytes(b"x")
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "run_id": "old",
                "format": "fruitdask-output/1",
                "files": {"t": ["t/part-00000-old.parquet"]},
            }
        )
    )
    (out / "_SUCCESS").write_text("old\n")  # fmt: skip
    assert read_committed(str(out))["run_id"] == "old"
    o = OutputDir(str(out))
    assert o.check("overwrite") == "complete"
    _commit(o, "new", n=1)
    assert not (out / "t" / "part-00000-old.parquet").exists()
