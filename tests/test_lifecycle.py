"""A run's lifecycle as a hostile user meets it, through the real command line:
signals at random moments, killed overwrites, concurrent writers, resumes of a
changed job, outputs overlapping their input."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from fruitdask import io, sample
from fruitdask.testing import committed_tables, result_signature

ARGS = ("--partition-size", "60", "--workers", "2", "--threads-per-worker", "1", "--no-report")


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """2,400 images in 40 partitions: long enough to be in flight when signalled."""
    root = tmp_path_factory.mktemp("medium") / "fruits"
    sample.generate_total(root, 2400, classes=24, seed=8)
    return root


@pytest.fixture(scope="module")
def clean(medium, tmp_path_factory, make_cli):
    """The reference: a clean run over ``medium``."""
    home = tmp_path_factory.mktemp("clean")
    out = home / "out"
    r = make_cli(home).run("run", "-i", str(medium), "-o", str(out), "-q", *ARGS)
    assert r.returncode == 0, r.stderr
    return result_signature(str(out))


def _done_markers(out: Path) -> int:
    return sum(len(list(d.glob("*.json"))) for d in out.glob("_fruitdask/runs/*/done"))


def _no_survivors(cli, seconds: float = 5.0) -> list:
    """The run's processes, waited on for ``seconds`` after its exit (a marker: they vanish)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = cli.processes()
        if not left:
            return []
        time.sleep(0.05)
    return [(p.pid, p.name()) for p in cli.processes()]


TRIGGERS = ("input", "dashboard", "extracting", "features", "committed")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _storm(cli, medium, clean, tmp_path, trials: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    # every moment once (in a random order), then random ones; both signals
    triggers = rng.sample(TRIGGERS, len(TRIGGERS)) + [rng.choice(TRIGGERS) for _ in range(trials)]
    seen = []
    for k in range(trials):
        trigger = triggers[k]
        sig = (signal.SIGINT, signal.SIGTERM)[k % 2] if k < 4 else rng.choice(SIGNALS)
        group = sig == signal.SIGINT or rng.random() < 0.3  # Ctrl-C signals the group
        out = tmp_path / f"out{k}"
        run = cli.watch("run", "-i", str(medium), "-o", str(out), *ARGS)
        at = {
            "input": run.line("input:"),
            "dashboard": run.line("Dask dashboard"),
            "extracting": lambda out=out: _done_markers(out) >= 3,
            "features": lambda out=out: _done_markers(out) >= 40,
            "committed": lambda out=out: (out / "_SUCCESS").exists(),
        }[trigger]
        run.wait_for(at)
        try:
            (os.killpg if group else os.kill)(run.proc.pid, sig)
        except ProcessLookupError:
            pass  # it had already finished
        code = run.finish()
        committed = (out / "_SUCCESS").exists()
        last = run.lines[-2] if len(run.lines) > 1 else ""
        seen.append((trigger, sig.name, group, code, committed))
        context = (k, trigger, sig.name, group, code, run.lines[-4:])
        assert "Traceback" not in "\n".join(run.lines), context
        if committed:
            assert code == 0, context
            assert "images:" in run.stdout, context
            assert committed_tables(str(out)) is not None, context
        else:
            assert code == 128 + sig, context
            assert "no _SUCCESS written" in last and sig.name in last, context
        assert _no_survivors(cli) == [], context
        r = cli.run("run", "-i", str(medium), "-o", str(out), "--resume", "-q", *ARGS)
        assert r.returncode == 0, (context, r.stderr)
        assert result_signature(str(out)) == clean, context
        assert not (out / "_fruitdask" / "lock.json").exists()
    return seen


def test_signal_storm(cli, medium, clean, tmp_path):
    """A handful of SIGINT/SIGTERM at random moments: the exit code and the last
    line tell the truth about _SUCCESS, nothing survives, --resume completes it."""
    seed = int(os.environ.get("FRUITDASK_STORM_SEED", "20261201"))
    seen = _storm(cli, medium, clean, tmp_path, trials=len(TRIGGERS), seed=seed)
    print("storm:", seen)


@pytest.mark.slow
def test_signal_storm_long(cli, medium, clean, tmp_path):
    seen = _storm(cli, medium, clean, tmp_path, trials=32, seed=7)
    print("storm:", seen)
    assert {s[4] for s in seen} == {True, False}  # some before the commit, some after


# ---------------------------------------------------------------- outputs and inputs
@pytest.mark.parametrize("where", ["inside", "holds", "same", "same-with-overwrite"])
def test_output_overlapping_the_input_is_refused(cli, sample_dir, tmp_path, where):
    import shutil

    data = tmp_path / "proj" / "images"
    shutil.copytree(sample_dir, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    inp, out, extra = {
        "inside": (data, data / "features", []),
        "holds": (data, tmp_path / "proj", []),
        "same": (data, data, []),
        "same-with-overwrite": (data, data, ["--overwrite"]),
    }[where]
    r = cli.run("run", "-i", str(inp), "-o", str(out), *extra)
    cli.one_line(r, "the output", "choose another output")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


def test_a_killed_overwrite_leaves_the_old_result_readable(cli, medium, clean, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    out = tmp_path / "out"
    r = cli.run("run", "-i", str(medium), "-o", str(out), "-q", *ARGS)
    assert r.returncode == 0, r.stderr
    old = committed_tables(str(out))["run_id"]
    run = cli.watch("run", "-i", str(medium), "-o", str(out), "--overwrite", *ARGS)
    assert run.wait_for(lambda: _done_markers(out) >= 5)
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.finish()
    assert _no_survivors(cli, 30) == []
    snap = committed_tables(str(out))
    assert snap is not None and snap["run_id"] == old
    assert result_signature(str(out)) == clean
    # DuckDB reads the result in force from the manifest's file list
    manifest = snap["manifest"]
    files = [str(out / f) for f in manifest["files"]["images"]]
    (n,) = duckdb.connect().execute(f"select count(*) from read_parquet({files!r})").fetchone()
    assert n == manifest["counts"]["images"] == 2400
    # the next overwrite takes the dead run's lock over at once and cleans its files
    r = cli.run("run", "-i", str(medium), "-o", str(out), "--overwrite", "-q", *ARGS)
    assert r.returncode == 0, r.stderr
    new = committed_tables(str(out))
    listed = {f for fs in new["manifest"]["files"].values() for f in fs}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.parquet")}
    assert on_disk <= listed, on_disk - listed


# ---------------------------------------------------------------- concurrent writers
def _second_writer_is_refused(cli, inp: str, out: str, extra: list[str]) -> None:
    first = cli.watch("run", "-i", inp, "-o", out, *ARGS, *extra)
    assert first.wait_for(first.line("input:"))  # printed once the output is locked
    os.killpg(first.proc.pid, signal.SIGSTOP)  # hold it there, lock taken
    try:
        r = cli.run("run", "-i", inp, "-o", out, "--overwrite", *ARGS, *extra)
    finally:
        os.killpg(first.proc.pid, signal.SIGCONT)
    line = cli.one_line(r, "locked by run", "another run is writing there")
    assert f"pid {first.proc.pid}" in line
    assert first.finish() == 0, first.lines[-5:]


def test_two_writers_on_disk(cli, sample_dir, tmp_path):
    out = str(tmp_path / "out")
    _second_writer_is_refused(cli, str(sample_dir), out, [])
    assert committed_tables(out) is not None


@pytest.mark.s3
def test_two_writers_on_s3(cli, s3, sample_dir):
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/in")
    so = s3.storage_options
    extra = ["--endpoint-url", s3.endpoint_url, "--storage-option", f"key={so['key']}",
             "--storage-option", f"secret={so['secret']}"]  # fmt: skip
    _second_writer_is_refused(cli, f"{bucket}/in", f"{bucket}/out", extra)
    assert committed_tables(f"{bucket}/out", s3.storage_options) is not None


# ---------------------------------------------------------------- resume of a changed job
@pytest.fixture
def interrupted(cli, medium, tmp_path):
    """A copy of ``medium`` and an output whose run was killed mid-extraction."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(medium, data)
    out = tmp_path / "out"
    run = cli.watch("run", "-i", str(data), "-o", str(out), *ARGS)
    assert run.wait_for(lambda: _done_markers(out) >= 3)
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.finish()
    assert not (out / "_SUCCESS").exists()
    return data, out


def test_resume_with_other_settings_is_refused(cli, interrupted):
    data, out = interrupted
    args = [a if a != "60" else "90" for a in ARGS]
    r = cli.run("run", "-i", str(data), "-o", str(out), "--resume", *args)
    cli.one_line(r, "cannot resume run", "partition_size was 60, now 90")


def test_resume_after_the_input_changed_is_refused(cli, interrupted):
    data, out = interrupted
    victim = sorted(data.rglob("*.jpg"))[0]
    blob = victim.read_bytes()
    victim.write_bytes(blob[::-1])  # rewritten in place, same size
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = cli.run("run", "-i", str(data), "-o", str(out), "--resume", *ARGS)
    line = cli.one_line(r, "the input changed since", "1 modified")
    assert victim.relative_to(data).as_posix() in line


def test_resume_of_the_same_job_continues_it(cli, interrupted, clean):
    data, out = interrupted
    state = next(out.glob("_fruitdask/runs/*/state.json"))
    run_id = json.loads(state.read_text())["run_id"]
    r = cli.run("run", "-i", str(data), "-o", str(out), "--resume", "--json", *ARGS)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["run_id"] == run_id and summary["partitions_resumed"] >= 3
    assert result_signature(str(out)) == clean


def test_a_stale_lock_of_a_dead_run_is_taken_over(cli, interrupted):
    data, out = interrupted
    assert (out / "_fruitdask" / "lock.json").exists()  # SIGKILL: the lease stayed
    r = cli.run("run", "-i", str(data), "-o", str(out), "--overwrite", "-q", *ARGS)
    assert r.returncode == 0, r.stderr
    assert io.read_text(str(out / "_SUCCESS"))
