"""The CLI end to end, through a subprocess: the newcomer's command, exit codes,
messages, the JSON summary, and the dashboard answering while a run is in flight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fruitdask import sample

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # another run (or a helper) may hold 8787: the tests take any free port
    env["DASK_FRUITDASK__CLUSTER__DASHBOARD_ADDRESS"] = "127.0.0.1:0"
    return env


def fruitdask(*args: str, cwd: Path, env: dict[str, str], timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "fruitdask", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_no_arguments_runs_the_embedded_default(tmp_path):
    """README command 1: `python -m fruitdask run` with nothing else works."""
    env = _env(tmp_path)
    r = fruitdask("run", "--workers", "2", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "fruitdask-output"
    assert (out / "_SUCCESS").exists()
    lines = r.stdout.splitlines()
    dash = [i for i, x in enumerate(lines) if x.startswith("Dask dashboard: http://127.0.0.1:")]
    summary = [i for i, x in enumerate(lines) if x.startswith("images:")]
    assert dash and summary and dash[0] < summary[0]  # URL printed before the work
    manifest = json.loads((out / "manifest.json").read_text())
    images = pq.read_table(out / "images")
    assert manifest["counts"]["images"] == images.num_rows > 1000
    assert f"{images.num_rows:,}" in lines[summary[0]]
    assert "stages:" in r.stdout and "throughput:" in r.stdout
    # the sample is generated once into the cache
    assert (tmp_path / "cache" / "fruitdask").is_dir()


def test_run_json_summary_and_refusal(tmp_path, sample_dir):
    env = _env(tmp_path)
    out = tmp_path / "out"
    args = ["run", "-i", str(sample_dir), "-o", str(out), "--workers", "1", "--quiet"]
    r = fruitdask(*args, "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    n = len(list(sample_dir.rglob("*.jpg")))
    assert s["images"] == s["ok"] == n
    assert s["descriptors"] == pq.read_table(out / "features").num_rows
    # an existing output is refused: one line, exit 2, old result untouched
    before = (out / "_SUCCESS").read_text()
    r = fruitdask(*args, cwd=tmp_path, env=env)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0]
    assert (out / "_SUCCESS").read_text() == before
    r = fruitdask(*args, "--overwrite", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "_SUCCESS").read_text() != before


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "-i", "{missing}", "-o", "{out}"], "{missing}"),
        (["run", "-i", "{empty}", "-o", "{out}"], "no image files"),
        (["run", "-i", "{sample}", "-o", "{out}", "--n-components", "33"], "n-components"),
        (["run", "-i", "{sample}", "-o", "{out}", "--partition-size", "-5"], "partition-size"),
        (["run", "--no-such-flag"], "--no-such-flag"),
        (["run", "-i", "{sample}", "-o", "{out}", "--cluster", "tcp://127.0.0.1:9"], "scheduler"),
        (["run", "-i", "{sample}", "-o", "{out}", "--workers", "0"], "workers"),
    ],
)
def test_errors_are_one_line_exit_2_nothing_written(tmp_path, sample_dir, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    subs = {
        "missing": str(tmp_path / "nope"),
        "empty": str(tmp_path / "empty"),
        "sample": str(sample_dir),
        "out": str(tmp_path / "out"),
    }
    r = fruitdask(*[a.format(**subs) for a in args], cwd=tmp_path, env=_env(tmp_path))
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("fruitdask: error:")]
    assert len(lines) == 1 and needle.format(**subs) in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_sample_command(tmp_path):
    env = _env(tmp_path)
    r = fruitdask(
        "sample", str(tmp_path / "s"), "--classes", "4", "--per-class", "3", cwd=tmp_path, env=env
    )
    assert r.returncode == 0, r.stderr
    assert "16 images" in r.stdout  # 4 x (3 Training + 1 Test)
    assert len(list((tmp_path / "s" / "Training").iterdir())) == 4
    r = fruitdask("sample", str(tmp_path / "s"), "--classes", "5", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "other parameters" in r.stderr


@pytest.fixture(scope="module")
def bigger_sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bigger") / "fruits"
    sample.generate_total(root, 3000, classes=30, seed=4)
    return root


@pytest.mark.slow
def test_dashboard_answers_during_a_run(tmp_path, bigger_sample):
    """The printed dashboard URL serves /status while the job is in flight."""
    env = _env(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fruitdask", "run", "-i", str(bigger_sample), "-o", str(out),
         "--workers", "2", "--partition-size", "25"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("Dask dashboard: "):
                url = line.split(": ", 1)[1].strip()
                break
        assert url and url.startswith("http://127.0.0.1:") and url.endswith("/status")
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200
            body = resp.read().decode()
        assert "bokeh" in body.lower() or "dask" in body.lower()
        in_flight = proc.poll() is None and not (out / "_SUCCESS").exists()
        assert in_flight, "the run ended before the dashboard was asked; make it longer"
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
