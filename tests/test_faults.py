"""Faults really injected into real runs: nothing lost, nothing half-published.

- a Dask worker process SIGKILLed while it works (extraction, and while it holds
  partition results the feature stage still needs);
- the S3 server (SeaweedFS) stopped mid-run and started again: while extracting,
  while publishing, and for longer than the retries last (during an overwrite);
- publishing seen by a concurrent reader that honours ``_SUCCESS`` and the
  manifest, on local disk and on S3: never a mix of two runs, never a torn one.

Signals, killed runs and resumes through the command line are in
``test_lifecycle.py``. Every comparison is against a clean run over the same
files: the same ``images/`` rows and the same multiset of ``descriptors/`` rows.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from fruitdask import io, pipeline
from fruitdask.config import ClusterSpec, RunConfig
from fruitdask.errors import StorageError, TransientError
from fruitdask.testing import committed_tables


def consistency_problems(snap: dict[str, Any]) -> list[str]:
    """What would make a committed-looking output a lie (a mix of runs, missing rows)."""
    problems = []
    run_id, m = snap["run_id"], snap["manifest"]
    for files in m["files"].values():
        problems += [f"{f} listed by run {run_id}" for f in files if run_id not in f]
    rows = {t: sum(p.num_rows for p in parts) for t, parts in snap["tables"].items()}
    if rows["images"] != m["counts"]["images"]:
        problems.append(f"images rows {rows['images']} != manifest {m['counts']['images']}")
    if rows["features"] != m["counts"]["descriptors"]:
        problems.append(f"features rows {rows['features']} != {m['counts']['descriptors']}")
    if m["files"].get("descriptors") and rows["descriptors"] != m["counts"]["descriptors"]:
        problems.append(f"descriptors rows {rows['descriptors']} != {m['counts']['descriptors']}")
    return problems


def signature(url: str, so: dict | None = None):
    """(images rows, descriptor multiset) of a committed output, checked consistent."""
    snap = committed_tables(url, so)
    assert snap is not None, f"{url} is not committed"
    assert consistency_problems(snap) == []
    t = snap["tables"]
    images = sorted(
        tuple(r[k] for k in ("path", "label", "split", "size", "width", "height",
                             "n_keypoints", "status", "error"))
        for p in t["images"] for r in p.to_pylist()
    )  # fmt: skip
    desc = collections.Counter(
        (r["path"], r["keypoint"], r["descriptor"]) for p in t["descriptors"] for r in p.to_pylist()
    )
    feats = collections.Counter(
        (r["path"], r["keypoint"])
        for p in t["features"]
        for r in p.select(["path", "keypoint"]).to_pylist()
    )
    assert feats == collections.Counter((p, k) for p, k, _ in desc.elements())
    return images, desc


def files_under(url: str, so: dict | None = None) -> set[str]:
    """Every object or file under ``url`` (not the folders SeaweedFS keeps)."""
    fs, root = io.filesystem(url, so)
    fs.invalidate_cache()
    try:
        return {f[len(root) + 1 :] for f in fs.find(root) if f.rstrip("/") != root}
    except FileNotFoundError:
        return set()


def assert_only_the_published_run(url: str, so: dict | None = None) -> None:
    """After a commit: exactly the manifest's files, its records and _SUCCESS."""
    snap = committed_tables(url, so)
    assert snap is not None
    listed = {f for fs in snap["manifest"]["files"].values() for f in fs}
    records = {"manifest.json", "_SUCCESS", f"_fruitdask/manifests/{snap['run_id']}.json"}
    assert files_under(url, so) - {"report.html"} == listed | records


# ---------------------------------------------------------------- data
def _replicate(src: Path, dst: Path, copies: int) -> Path:
    """``copies`` hard-linked replicas of a generated tree (cheap, distinct paths)."""
    for c in range(copies):
        for p in src.rglob("*.jpg"):
            target = dst / f"copy{c:02d}" / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, target)
    return dst


@pytest.fixture(scope="module")
def medium(sample_dir, tmp_path_factory) -> Path:
    """1,152 images (12 hard-linked copies of the session sample)."""
    return _replicate(sample_dir, tmp_path_factory.mktemp("faults") / "medium", 12)


@pytest.fixture(scope="module")
def clean_medium(medium, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-clean") / "out"
    pipeline.run(RunConfig(input=str(medium), output=str(out), partition_size=10), dask_client)
    return signature(str(out))


# ---------------------------------------------------------------- (a) worker SIGKILL
@pytest.fixture(scope="module")
def three_workers():
    """A fresh 3-worker cluster of real processes (nannies restart killed workers)."""
    from fruitdask.cluster import connect

    spec = ClusterSpec(workers=3, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    with connect(spec) as (client, _):
        yield client


@pytest.mark.parametrize("stage", ["extract", "features"])
def test_worker_sigkill_mid_run(stage, three_workers, medium, clean_medium, tmp_path):
    """SIGKILL the worker process running an extraction (or holding extracted
    partitions the feature stage still needs): the run completes, equal to a clean run."""
    client = three_workers
    client.wait_for_workers(3, timeout=60)
    killed: list[dict[str, Any]] = []

    def progress(st: str, done: int, total: int, items: int) -> None:
        if killed or st != stage or (stage == "extract" and done < 3):
            return
        pids = client.run(os.getpid)
        held = client.processing() if stage == "extract" else client.has_what()
        busy = sorted(w for w, keys in held.items() if any("extract-" in str(k) for k in keys))
        if not busy:
            return
        os.kill(pids[busy[0]], signal.SIGKILL)
        killed.append({"pid": pids[busy[0]], "done": done, "total": total})

    out = tmp_path / "out"
    cfg = RunConfig(input=str(medium), output=str(out), partition_size=10)
    s = pipeline.run(cfg, client, progress=progress)
    assert killed, f"no worker was busy with {stage} work to kill"
    assert killed[0]["done"] < killed[0]["total"], killed  # really mid-run
    pid = killed[0]["pid"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert s.images == 1152
    assert signature(str(out)) == clean_medium
    assert_only_the_published_run(str(out))


# ---------------------------------------------------------------- (b) S3 outage
@pytest.fixture(scope="module")
def s3_input(s3, sample_dir, tmp_path_factory):
    """The session sample (96 images) twice over on S3, so a run lasts a while."""
    local = _replicate(sample_dir, tmp_path_factory.mktemp("faults-s3") / "in", 2)
    bucket = s3.make_bucket()
    s3.upload_tree(local, f"{bucket}/in")
    return bucket, local


@pytest.fixture(scope="module")
def clean_s3_input(s3_input, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-clean-s3") / "out"
    pipeline.run(RunConfig(input=str(s3_input[1]), output=str(out)), dask_client)
    return signature(str(out))


class Outage:
    """Stop the S3 server from inside the run (at a chosen progress event) and
    start it again after ``seconds`` (or only when told, for ``seconds=None``)."""

    def __init__(self, s3, stage: str, at: int, seconds: float | None) -> None:
        self.s3, self.stage, self.at, self.seconds = s3, stage, at, seconds
        self.stopped_at: float | None = None
        self.thread: threading.Thread | None = None

    def progress(self, st: str, done: int, total: int, items: int) -> None:
        if self.stopped_at is not None or st != self.stage:
            return
        if done < (self.at if self.at > 0 else total):
            return
        self.stop_now()

    def stop_now(self) -> None:
        self.s3.stop()  # synchronous: the rest of the stage meets a dead endpoint
        self.stopped_at = time.monotonic()
        if self.seconds is not None:
            self.thread = threading.Thread(target=self._restart_later, daemon=True)
            self.thread.start()

    def _restart_later(self) -> None:
        time.sleep(self.seconds)
        self.s3.restart()

    def end(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.s3.proc is None:
            self.s3.restart()


def _run_through_outage(s3, cfg: RunConfig, client, outage: Outage):
    """Run; on failure require one clear line and no _SUCCESS, then --resume."""
    failure = None
    try:
        try:
            if outage.stage == "start":
                outage.stop_now()
            pipeline.run(cfg, client, progress=outage.progress)
        except Exception as exc:  # noqa: BLE001 - a clear failure is allowed; checked below
            failure = exc
    finally:
        outage.end()
    assert outage.stopped_at is not None, "the outage never happened"
    if failure is not None:
        msg = str(failure)
        assert isinstance(failure, StorageError), repr(failure)
        assert msg and "\n" not in msg and len(msg) < 500, msg
        assert cfg.output.removeprefix("s3://").split("/")[0] in msg or "storage" in msg, msg
        assert committed_tables(cfg.output, cfg.storage_options) is None
        s = pipeline.run(cfg.with_(resume=True, overwrite=False), client)
        assert not s.already_complete
    return failure


@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, at, seconds",
    [
        ("extract", 1, 3.0),  # down while partitions read and write
        ("features", 0, 3.0),  # down right when the result is published
    ],
    ids=["extract", "publish"],
)
def test_s3_outage_mid_run(stage, at, seconds, s3, s3_input, clean_s3_input, dask_client, tmp_path):
    bucket, _ = s3_input
    out = f"{bucket}/out-{stage}-{uuid.uuid4().hex[:6]}"
    cfg = RunConfig(
        input=f"{bucket}/in", output=out, storage_options=s3.storage_options, partition_size=4
    )
    failure = _run_through_outage(s3, cfg, dask_client, Outage(s3, stage, at, seconds))
    print(f"outage during {stage}: " + (f"failed ({failure}), resumed" if failure else "rode out"))
    assert signature(out, s3.storage_options) == clean_s3_input
    assert_only_the_published_run(out, s3.storage_options)


# ---------------------------------------------------------------- (e) atomic publishing
class Reader(threading.Thread):
    """Reads the output over and over, as a careful reader, while a run writes it."""

    def __init__(self, url: str, so: dict | None, inputs: dict[str, set[str]]) -> None:
        super().__init__(daemon=True)
        self.url, self.so, self.inputs = url, so, inputs
        self.stop = threading.Event()
        self.seen: list[str] = []  # which input each complete snapshot showed
        self.problems: list[str] = []
        self.reads = 0
        self._read = threading.Condition()

    def wait_reads(self, n: int, timeout: float = 120) -> bool:
        """Until the reader has read ``n`` times (a marker, not a sleep)."""
        with self._read:
            return self._read.wait_for(lambda: self.reads >= n, timeout)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                snap = committed_tables(self.url, self.so)
            except Exception as exc:  # noqa: BLE001 - a torn read is a finding, not a crash
                self.problems.append(f"read raised {exc!r}")
                continue
            with self._read:
                self.reads += 1
                self._read.notify_all()
            if snap is None:
                if not self.seen or self.seen[-1] != "-":
                    self.seen.append("-")
                continue
            self.problems += consistency_problems(snap)
            paths = {r for p in snap["tables"]["images"] for r in p.column("path").to_pylist()}
            which = [name for name, expected in self.inputs.items() if paths == expected]
            if len(which) != 1:
                self.problems.append(f"run {snap['run_id']} shows {len(paths)} paths of no input")
            elif not self.seen or self.seen[-1] != which[0]:
                self.seen.append(which[0])

    def finish(self) -> None:
        self.stop.set()
        self.join(60)


def _paths(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}


def test_overwrite_is_atomic_for_a_reader_local(sample_dir, medium, dask_client, tmp_path):
    out = tmp_path / "out"
    pipeline.run(RunConfig(input=str(sample_dir), output=str(out), partition_size=5), dask_client)
    old_files = files_under(str(out)) - {"manifest.json", "_SUCCESS"}
    reader = Reader(str(out), None, {"old": _paths(sample_dir), "new": _paths(medium)})
    reader.start()
    try:
        assert reader.wait_reads(3)
        cfg = RunConfig(input=str(medium), output=str(out), partition_size=40, overwrite=True)
        pipeline.run(cfg, dask_client)
        assert reader.wait_reads(reader.reads + 3)
    finally:
        reader.finish()
    assert reader.problems == []
    assert reader.seen[0] == "old" and reader.seen[-1] == "new", reader.seen
    assert set(reader.seen) <= {"old", "-", "new"} and reader.reads > 3
    assert_only_the_published_run(str(out))
    assert not old_files & files_under(str(out)) - {"report.html"}


@pytest.mark.s3
def test_overwrite_is_atomic_for_a_reader_s3(s3, sample_dir, dask_client):
    so = s3.storage_options
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/in")
    out = f"{bucket}/out"
    training = {p for p in _paths(sample_dir) if p.startswith("Training/")}
    old = RunConfig(input=f"{bucket}/in/Training", output=out, storage_options=so)
    pipeline.run(old.with_(partition_size=5), dask_client)
    old_files = files_under(out, so) - {"manifest.json", "_SUCCESS"}
    assert committed_tables(out, so) is not None
    reader = Reader(
        out, so, {"old": {p.removeprefix("Training/") for p in training}, "new": _paths(sample_dir)}
    )
    reader.start()
    try:
        assert reader.wait_reads(3)
        new = RunConfig(
            input=f"{bucket}/in", output=out, storage_options=so, partition_size=7, overwrite=True
        )
        pipeline.run(new, dask_client)
        assert reader.wait_reads(reader.reads + 3)
    finally:
        reader.finish()
    assert reader.problems == []
    assert reader.seen[-1] == "new" and set(reader.seen) <= {"old", "-", "new"}, reader.seen
    assert_only_the_published_run(out, so)
    assert not old_files & files_under(out, so)


@pytest.mark.s3
@pytest.mark.slow
def test_s3_outage_longer_than_retries_during_overwrite(s3, s3_input, clean_s3_input, dask_client):
    """The store stays down past every retry while an overwrite extracts: one
    typed line, the old result still in force and whole, and --resume finishes."""
    bucket, _ = s3_input
    so = s3.storage_options
    out = f"{bucket}/out-long-{uuid.uuid4().hex[:6]}"
    base = RunConfig(input=f"{bucket}/in/copy00", output=out, storage_options=so)
    pipeline.run(base, dask_client)
    old = committed_tables(out, so)["run_id"]
    cfg = RunConfig(input=f"{bucket}/in", output=out, storage_options=so, partition_size=4,
                    overwrite=True)  # fmt: skip
    outage = Outage(s3, "extract", 1, None)  # back only once the run has given up
    try:
        with pytest.raises(TransientError) as info:
            pipeline.run(cfg, dask_client, progress=outage.progress)
    finally:
        outage.end()
    assert "\n" not in str(info.value) and "attempts" in str(info.value)
    snap = committed_tables(out, so)
    assert snap is not None and snap["run_id"] == old and consistency_problems(snap) == []
    pipeline.run(cfg.with_(overwrite=False, resume=True), dask_client)
    assert signature(out, so) == clean_s3_input
    assert_only_the_published_run(out, so)
