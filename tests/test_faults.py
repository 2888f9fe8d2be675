"""Faults really injected into real runs (issue 6): nothing lost, nothing half-published.

- a Dask worker process SIGKILLed while it works (extraction, and while it holds
  partition results the feature stage needs);
- the S3 server (SeaweedFS) stopped mid-run and started again: while listing,
  while extracting, while publishing, and for longer than the retries last;
- SIGINT / SIGTERM / SIGKILL to a ``python -m fruitdask run`` in flight: prompt
  exit with 130 / 143, no ``_SUCCESS``, no orphaned scheduler/nanny/worker;
- ``--resume`` afterwards: finished partitions are reused, not recomputed, and
  the result equals a clean run's;
- publishing seen by a concurrent reader that honours ``_SUCCESS`` + manifest,
  on local disk and on S3: never a mix of two runs; ``--overwrite`` leaves no
  file of the old run; an interrupted overwrite is not presented as complete.

Every comparison is against a clean run over the same files: the same
``images/`` rows and the same multiset of ``descriptors/`` rows.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
import psutil
import pyarrow.parquet as pq
import pytest

from fruitdask import io, pipeline
from fruitdask.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
TAG = "FRUITDASK_FAULT_TEST_TAG"  # marks every process a CLI run starts (orphan hunt)


# ---------------------------------------------------------------- reading an output
def _fs(url: str, so: dict | None = None):
    opts = dict(so or {})
    if url.startswith("s3://"):
        opts["skip_instance_cache"] = True
        opts["use_listings_cache"] = False
    fs, root = fsspec.core.url_to_fs(url, **opts)
    return fs, root.rstrip("/")


def read_complete(url: str, so: dict | None = None) -> dict[str, Any] | None:
    """The output as a careful reader sees it, or None when it is not complete.

    Protocol: read ``_SUCCESS``; read the manifest and require the same run id;
    read every file the manifest lists; read ``_SUCCESS`` again and require it
    unchanged. A read that fails part-way means "not complete now" (None).
    """
    fs, root = _fs(url, so)
    try:
        before = fs.cat_file(f"{root}/_SUCCESS").decode().strip()
        manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
        if manifest.get("run_id") != before:
            return None
        tables = {}
        for table in ("images", "descriptors", "features"):
            parts = []
            for f in manifest["files"].get(table, []):
                with fs.open(f"{root}/{f}", "rb") as fh:
                    parts.append(pq.read_table(fh))
            tables[table] = parts
        after = fs.cat_file(f"{root}/_SUCCESS").decode().strip()
    except FileNotFoundError:
        return None
    if after != before:
        return None
    return {"run_id": before, "manifest": manifest, "tables": tables}


def consistency_problems(snap: dict[str, Any]) -> list[str]:
    """What would make a complete-looking output a lie (a mix of runs, missing rows)."""
    problems = []
    run_id, m = snap["run_id"], snap["manifest"]
    for files in m["files"].values():
        for f in files:
            if run_id not in f:
                problems.append(f"{f} listed by run {run_id}")
    rows = {t: sum(p.num_rows for p in parts) for t, parts in snap["tables"].items()}
    if rows["images"] != m["counts"]["images"]:
        problems.append(f"images rows {rows['images']} != manifest {m['counts']['images']}")
    if rows["features"] != m["counts"]["descriptors"]:
        problems.append(f"features rows {rows['features']} != {m['counts']['descriptors']}")
    if m["files"].get("descriptors") and rows["descriptors"] != m["counts"]["descriptors"]:
        problems.append(f"descriptors rows {rows['descriptors']} != {m['counts']['descriptors']}")
    return problems


def signature(url: str, so: dict | None = None):
    """(images rows, descriptor multiset, feature keys) of a complete output."""
    snap = read_complete(url, so)
    assert snap is not None, f"{url} is not complete"
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
    fs, root = _fs(url, so)
    if url.startswith("s3://"):
        fs.invalidate_cache()
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return set()
    return {f[len(root) + 1 :] for f in found if f.rstrip("/") != root}


def assert_only_the_published_run(url: str, so: dict | None = None) -> None:
    """After success: exactly the manifest's files, the manifest and _SUCCESS."""
    snap = read_complete(url, so)
    assert snap is not None
    listed = {f for fs in snap["manifest"]["files"].values() for f in fs}
    assert files_under(url, so) == listed | {"manifest.json", "_SUCCESS"}


def assert_parquet_files_whole(out: Path) -> None:
    """Nothing half-written under a final name: every *.parquet opens."""
    for p in out.rglob("*.parquet"):
        pq.read_metadata(p)


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


@pytest.fixture(scope="module")
def clean_sample(sample_dir, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults-clean-sample") / "out"
    pipeline.run(RunConfig(input=str(sample_dir), output=str(out)), dask_client)
    return signature(str(out))


# ---------------------------------------------------------------- (a) worker SIGKILL
@pytest.fixture(scope="module")
def three_workers():
    """A fresh 3-worker cluster of real processes (nannies restart killed workers)."""
    from fruitdask.cluster import ClusterSpec, connect

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
        assert isinstance(failure, io.StorageError), repr(failure)
        assert msg and "\n" not in msg and len(msg) < 500, msg
        assert cfg.output.removeprefix("s3://").split("/")[0] in msg or "storage" in msg, msg
        assert read_complete(cfg.output, cfg.storage_options) is None
        fs, root = _fs(cfg.output, cfg.storage_options)
        assert not fs.exists(f"{root}/_SUCCESS")
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


# ---------------------------------------------------------------- (c)/(d) signals, resume
def _env(tag: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_FRUITDASK__")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DASK_FRUITDASK__CLUSTER__DASHBOARD_ADDRESS"] = "127.0.0.1:0"
    env[TAG] = tag
    return env


def _tagged(tag: str) -> list[psutil.Process]:
    """Live processes started by the CLI run marked ``tag`` (the environment is inherited
    by the nannies, workers and anything they spawn, even after re-parenting)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _orphans_after(tag: str, grace: float = 15.0) -> list[str]:
    """Processes of the run still alive ``grace`` seconds after it exited (then killed)."""
    deadline = time.monotonic() + grace
    alive = _tagged(tag)
    while alive and time.monotonic() < deadline:
        time.sleep(0.25)
        alive = _tagged(tag)
    described = []
    for p in alive:
        try:
            described.append(f"{p.pid}: {' '.join(p.cmdline())[:200]}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return described


def _done_markers(out: Path) -> list[str]:
    d = out / pipeline.STATE_DIR / "done"
    try:
        return sorted(n for n in os.listdir(d) if n.endswith(".json"))
    except FileNotFoundError:
        return []


def _start_cli(args: list[str], tag: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fruitdask", "run", *args],
        env=_env(tag),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a shell job
    )


def _wait_mid_run(proc: subprocess.Popen, out: Path, at_least: int = 3) -> list[str]:
    """Block until ``at_least`` partitions are finished and the run still goes on."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        done = _done_markers(out)
        if len(done) >= at_least:
            return done
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was interrupted: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no partition finished within 180 s")


def _finished_parts(out: Path, markers: list[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of the images/ and descriptors/ files of finished partitions."""
    stats = {}
    for m in markers:
        name = json.loads((out / pipeline.STATE_DIR / "done" / m).read_text())["name"]
        for table in ("images", "descriptors"):
            st = (out / table / name).stat()
            stats[f"{table}/{name}"] = (st.st_ino, st.st_mtime_ns)
    return stats


def _resume_cli(args: list[str], tag: str) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "fruitdask", "run", *args, "--resume", "--json", "--quiet"],
        env=_env(tag),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _orphans_after(tag, grace=10) == []
    return json.loads(r.stdout.strip().splitlines()[-1])


def _resume_here(medium: Path, out: Path, client) -> dict[str, Any]:
    """``--resume`` through the library, on the test session's cluster."""
    cfg = RunConfig(input=str(medium), output=str(out), partition_size=10, resume=True)
    s = pipeline.run(cfg, client)
    return {"partitions": s.partitions, "partitions_resumed": s.partitions_resumed}


def _check_resumed(out: Path, summary: dict, finished: dict[str, tuple[int, int]], n: int):
    assert summary["partitions_resumed"] >= n, summary
    assert summary["partitions_resumed"] <= summary["partitions"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["partitions_resumed"] == summary["partitions_resumed"]
    listed = {f for fs in manifest["files"].values() for f in fs}
    for rel, (ino, mtime) in finished.items():
        assert rel in listed, f"{rel} (finished before the interruption) was not reused"
        st = (out / rel).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), f"{rel} was recomputed"


@pytest.mark.slow
def test_sigkill_whole_run_then_resume(medium, clean_medium, dask_client, tmp_path):
    """The harshest interruption: the client, scheduler and workers all SIGKILLed
    (OOM killer, lost machine). No cleanup runs at all; --resume still finishes,
    reusing every verified partition, and a second --resume changes nothing."""
    out = tmp_path / "out"
    tag = uuid.uuid4().hex
    args = ["-i", str(medium), "-o", str(out), "--workers", "2", "--partition-size", "10"]
    proc = _start_cli([*args, "--quiet"], tag)
    try:
        markers = _wait_mid_run(proc, out, at_least=5)
        finished = _finished_parts(out, markers)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _orphans_after(tag, grace=5) == []
    assert not (out / "_SUCCESS").exists()
    assert read_complete(str(out)) is None
    assert_parquet_files_whole(out)

    summary = _resume_cli(args, tag)
    _check_resumed(out, summary, finished, len(markers))
    assert signature(str(out)) == clean_medium
    assert_only_the_published_run(str(out))

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    cfg = RunConfig(input=str(medium), output=str(out), partition_size=10, resume=True)
    assert pipeline.run(cfg, dask_client).already_complete
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


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

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                snap = read_complete(self.url, self.so)
            except Exception as exc:  # noqa: BLE001 - a torn read is a finding, not a crash
                self.problems.append(f"read raised {exc!r}")
                continue
            self.reads += 1
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
        time.sleep(0.5)
        cfg = RunConfig(input=str(medium), output=str(out), partition_size=40, overwrite=True)
        pipeline.run(cfg, dask_client)
        time.sleep(0.5)
    finally:
        reader.finish()
    assert reader.problems == []
    assert reader.seen[0] == "old" and reader.seen[-1] == "new", reader.seen
    assert set(reader.seen) <= {"old", "-", "new"} and reader.reads > 3
    assert_only_the_published_run(str(out))
    assert not old_files & files_under(str(out))


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
    assert read_complete(out, so) is not None
    reader = Reader(
        out, so, {"old": {p.removeprefix("Training/") for p in training}, "new": _paths(sample_dir)}
    )
    reader.start()
    try:
        time.sleep(0.5)
        new = RunConfig(
            input=f"{bucket}/in", output=out, storage_options=so, partition_size=7, overwrite=True
        )
        pipeline.run(new, dask_client)
        time.sleep(0.5)
    finally:
        reader.finish()
    assert reader.problems == []
    assert reader.seen[-1] == "new" and set(reader.seen) <= {"old", "-", "new"}, reader.seen
    assert_only_the_published_run(out, so)
    assert not old_files & files_under(out, so)


@pytest.mark.slow
def test_interrupted_overwrite_is_not_complete_then_resume(
    sample_dir, medium, clean_medium, dask_client, tmp_path
):
    """SIGTERM in the middle of ``--overwrite``: no _SUCCESS, the old run's files
    all still there (nothing partly deleted), nothing half-written; --resume ends
    with the new run alone."""
    out = tmp_path / "out"
    pipeline.run(RunConfig(input=str(sample_dir), output=str(out)), dask_client)
    old = read_complete(str(out))
    assert old is not None
    old_files = {f for fs in old["manifest"]["files"].values() for f in fs}

    tag = uuid.uuid4().hex
    args = ["-i", str(medium), "-o", str(out), "--workers", "2", "--partition-size", "10"]
    proc = _start_cli([*args, "--overwrite", "--quiet"], tag)
    try:
        _wait_mid_run(proc, out)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    assert _orphans_after(tag) == []
    assert not (out / "_SUCCESS").exists()
    assert read_complete(str(out)) is None
    assert old_files <= files_under(str(out))
    assert_parquet_files_whole(out)

    _resume_here(medium, out, dask_client)
    assert signature(str(out)) == clean_medium
    assert_only_the_published_run(str(out))
    assert not old_files & files_under(str(out))
