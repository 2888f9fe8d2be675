"""The command line's contract, through a subprocess: the newcomer's command,
stdout for the result and stderr for the rest, exact JSON, exit codes, refusals
before any cluster starts, a closed pipe, the dashboard while a run is in flight."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fruitdask import sample
from fruitdask.testing import committed_tables


def _log_text(cli) -> str:
    logs = cli.home / "cache" / "fruitdask" / "logs"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.log")))


@pytest.mark.slow
def test_no_arguments_runs_the_embedded_default(cli):
    """README command 1: `python -m fruitdask run` with nothing else works."""
    r = cli.run("run", "--workers", "2")
    assert r.returncode == 0, r.stderr
    out = cli.home / "fruitdask-output"
    snap = committed_tables(str(out))
    assert snap is not None
    err = r.stderr.splitlines()
    assert any(x.startswith("Dask dashboard: http://127.0.0.1:") for x in err)
    images = sum(t.num_rows for t in snap["tables"]["images"])
    assert snap["manifest"]["counts"]["images"] == images > 1000
    assert f"images: {images:,}" in r.stdout and "stages:" in r.stdout
    assert (out / "report.html").exists() and "report:" in r.stdout
    assert (cli.home / "cache" / "fruitdask").is_dir()  # the sample, generated once


def test_json_is_the_only_thing_on_stdout(cli, sample_dir):
    out = cli.home / "out"
    r = cli.run("run", "-i", str(sample_dir), "-o", str(out), "--workers", "1", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)  # exactly one document, progress or not
    n = len(list(sample_dir.rglob("*.jpg")))
    assert s["images"] == s["ok"] == n and s["run_id"]
    assert s["descriptors"] == pq.read_table(out / "features").num_rows
    assert "extract:" in r.stderr and "Dask dashboard" in r.stderr  # progress goes to stderr
    last = [x for x in r.stderr.splitlines() if x.startswith(f"extract: {s['partitions']}/")]
    assert re.search(r", memory: busiest worker at \d+% of its limit$", last[-1]), last
    assert s["report"] and Path(s["report"]).exists()


def test_an_existing_output_is_refused_before_any_cluster_starts(cli, sample_dir):
    out = cli.home / "out"
    args = ["run", "-i", str(sample_dir), "-o", str(out), "--workers", "1", "--quiet"]
    r = cli.run(*args)
    assert r.returncode == 0, r.stderr
    before = (out / "_SUCCESS").read_text()
    logs = cli.home / "cache" / "fruitdask" / "logs"
    for p in logs.glob("*.log"):
        p.unlink()
    r = cli.run(*args)
    cli.one_line(r, str(out), "--overwrite")
    assert (out / "_SUCCESS").read_text() == before
    # no cluster was started: the scheduler never logged a line
    assert "distributed.scheduler" not in _log_text(cli)


@pytest.mark.parametrize(
    "args",
    [
        ["sample", "{tmp}/s", "--classes", "2", "--per-class", "2"],
        ["config"],
        ["plan", "--images", "90483", "--deadline", "10m"],
        ["emr", "create", "--dry-run", "--bootstrap-uri", "s3://b/boot.sh",
         "--package", "fruitdask", "--log-uri", "s3://b/logs"],
    ],
    ids=["sample", "config", "plan", "emr-dry-run"],
)  # fmt: skip
def test_a_closed_pipe_ends_quietly(cli, args):
    """`fruitdask ... | head -1`: no BrokenPipeError traceback, exit 0."""
    argv = [a.format(tmp=cli.home) for a in args]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fruitdask", *argv], cwd=cli.home, env=cli.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader has all it wants
    err = proc.stderr.read()
    assert proc.wait(120) == 0, err
    assert first and "Traceback" not in err and "BrokenPipe" not in err, err


def test_help_shows_defaults_and_no_internal_notes(cli):
    r = cli.run("--help")
    assert r.returncode == 0 and "argument parsing" not in r.stdout
    r = cli.run("sample", "--help")
    assert "(default: 131)" in r.stdout and "(40)" in r.stdout
    r = cli.run("run", "--help")
    assert "(default: 1000)" in r.stdout and "(default: 40,000,000)" in r.stdout


def test_sample_command(cli):
    r = cli.run("sample", str(cli.home / "s"), "--classes", "4", "--per-class", "3")
    assert r.returncode == 0, r.stderr
    assert "16 images" in r.stdout and "in 4 classes" in r.stdout  # 4 x (3 + 1 Test)
    assert len(list((cli.home / "s" / "Training").iterdir())) == 4
    r = cli.run("sample", str(cli.home / "t"), "--total", "10")
    assert r.returncode == 0, r.stderr
    classes = {p.parent.name for p in (cli.home / "t").rglob("*.jpg")}
    assert f"in {len(classes)} classes" in r.stdout
    r = cli.run("sample", str(cli.home / "u"), "--total", "10", "--per-class", "3")
    cli.one_line(r, "not allowed with")
    r = cli.run("sample", str(cli.home / "s"), "--classes", "5")
    cli.one_line(r, "other parameters")


def test_a_busy_dashboard_port_is_one_line(cli, sample_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli.run("run", "-i", str(sample_dir), "-o", str(cli.home / "out"), "--workers", "1",
                    "--dashboard-address", f"127.0.0.1:{port}", "--no-report")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"note: port {port} was busy; the dashboard is on port" in r.stderr
    assert "UserWarning" not in r.stderr and "Traceback" not in r.stderr


def test_the_performance_report_works_offline(cli, sample_dir):
    report = cli.home / "perf.html"
    r = cli.run("run", "-i", str(sample_dir), "-o", str(cli.home / "out"), "--workers", "1",
                "--report", str(report), "--no-report")  # fmt: skip
    assert r.returncode == 0, r.stderr
    html = report.read_text()
    assert "cdn.bokeh.org" not in html and "Bokeh" in html
    assert str(report) in r.stdout  # the summary says where it is


def test_worker_noise_goes_to_the_log_not_the_terminal(cli, sample_dir):
    r = cli.run("run", "-i", str(sample_dir), "-o", str(cli.home / "out"), "--workers", "1",
                "--quiet", "--no-report")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --quiet: nothing but the result
    assert "distributed.scheduler" in _log_text(cli)  # it went here


@pytest.fixture(scope="module")
def bigger_sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bigger") / "fruits"
    sample.generate_total(root, 600, classes=6, seed=4)
    return root


def test_dashboard_answers_during_a_run(cli, bigger_sample):
    """The printed dashboard URL serves /status while the job is in flight (its
    workers are held stopped while we ask, so the run cannot end first)."""
    out = cli.home / "out"
    run = cli.watch("run", "-i", str(bigger_sample), "-o", str(out), "--workers", "1",
                    "--partition-size", "25", "--no-report")  # fmt: skip
    assert run.wait_for(run.line("Dask dashboard: "))
    url = next(x for x in run.lines if x.startswith("Dask dashboard: ")).split(": ", 1)[1]
    workers = [p for p in cli.processes() if p.pid != run.proc.pid]
    assert workers
    for p in workers:
        os.kill(p.pid, signal.SIGSTOP)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/status")
        with urllib.request.urlopen(url, timeout=60) as resp:
            assert resp.status == 200
            assert "dask" in resp.read().decode().lower()
        assert run.proc.poll() is None and not (out / "_SUCCESS").exists()
    finally:
        for p in workers:
            os.kill(p.pid, signal.SIGCONT)
    assert run.finish() == 0, run.lines[-5:]
