"""Security (issue 6): credentials never leak, the local cluster stays on loopback,
paths from the listing are data.

Real CLI runs (subprocesses) with unique canary secrets as keys, secrets and
tokens, given as ``--storage-option``, as ``AWS_*`` environment variables and on
the wrong-credential error path, against a real SeaweedFS whose only identity
*is* the canary pair (so the successful runs really authenticate with it). Every
byte the runs produce is searched: stdout, stderr, the output (local and S3),
the performance report, the working and temporary directories.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fruitdask import testing

REPO = Path(__file__).resolve().parents[1]
TAG = "FRUITDASK_SECURITY_TEST_TAG"

# Names of files that would be code or format strings if a path were ever
# interpolated into a shell command or a format call.
HOSTILE_NAMES = [
    "$(touch pwned).jpg",
    "`touch pwned2`.jpg",
    "; touch pwned3 #.jpg",
    "| touch pwned4.jpg",
    "{0}{1}{path}{__class__}.jpg",
    "%s%n%x%(key)s.jpg",
    "-rf.jpg",
    "--output=elsewhere.jpg",
    "[a-z]*?.jpg",
    "~root.jpg",
    "\\backslash\\.jpg",
]
HOSTILE_DIRS = ["..x", "...", " ..", ".. ", "$HOME", "{input}", "%2e%2e"]


def _env(tmp: Path, tag: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "DASK_FRUITDASK__")) and k != "FRUITDASK_S3_CLIENT"
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DASK_FRUITDASK__CLUSTER__DASHBOARD_ADDRESS"] = "127.0.0.1:0"
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # loopback only
    env["TMPDIR"] = str(tmp)  # dask's scratch space lands here, and is searched
    env["XDG_CACHE_HOME"] = str(tmp / "cache")
    env[TAG] = tag
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300):
    t = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "fruitdask", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(f"{time.monotonic() - t:5.1f}s rc={r.returncode} run {' '.join(args)[:120]}")
    return r


def _write_tree(root: Path, good: bytes) -> list[str]:
    paths = []
    for d in HOSTILE_DIRS:
        for name in HOSTILE_NAMES:
            rel = f"Training/{d}/{name}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(good)
            paths.append(rel)
    return paths


def _all_files(*roots: Path) -> dict[Path, int]:
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                out[p] = p.stat().st_mtime_ns
    return out


# ---------------------------------------------------------------- canaries
@pytest.fixture(scope="module")
def canary_s3(tmp_path_factory):
    """A SeaweedFS whose only identity is a fresh canary key pair."""
    key = "AKIA" + secrets.token_hex(8).upper()
    secret = "cAnArY" + secrets.token_urlsafe(30)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(testing, "S3_KEY", key)
        mp.setattr(testing, "S3_SECRET", secret)
        server = testing.S3Server(tmp_path_factory.mktemp("canary-s3"))
        server.start()
    assert server.storage_options["key"] == key
    yield server, key, secret
    server.stop()


def _storage_options(**kv: str) -> list[str]:
    out = []
    for k, v in kv.items():
        out += ["--storage-option", f"{k}={v}"]
    return out


@pytest.mark.s3
@pytest.mark.slow
def test_canary_credentials_never_leak(canary_s3, sample_dir, tmp_path):
    server, key, secret = canary_s3
    c = {  # every canary, by where it was given
        "s3 key": key,
        "s3 secret": secret,
        "session token (env)": "IQoJb3JpZ2luX2VjENv" + secrets.token_hex(20),
        "wrong key": "AKIA" + secrets.token_hex(8).upper(),
        "wrong secret": "wRoNg" + secrets.token_urlsafe(30),
        "token option": "FwoGZXIvYXdzEBY" + secrets.token_hex(20),
        "password": "pAsSwOrD" + secrets.token_hex(12),
        "client_kwargs secret": "cLiEnTsEcReT" + secrets.token_hex(12),
        "Authorization header": "bEaReR" + secrets.token_hex(16),
        "connection_string": "aCcOuNtKeY" + secrets.token_hex(16),
        "passphrase": "pAsSpHrAsE" + secrets.token_hex(12),
        "gcs private_key": "pRiVaTeKeY" + secrets.token_hex(16),
    }
    fs = server.fs()
    bucket = server.make_bucket()
    b = bucket.removeprefix("s3://")
    good = sorted(sample_dir.rglob("*.jpg"))
    fs.pipe({f"{b}/in/{p.relative_to(sample_dir).as_posix()}": p.read_bytes() for p in good})
    hostile = {f"Training/{d}/{n}" for d in ("..x", "{input}", "%2e%2e") for n in HOSTILE_NAMES}
    fs.pipe({f"{b}/in/{rel}": good[0].read_bytes() for rel in hostile})
    ep = ["--endpoint-url", server.endpoint_url]
    tag = uuid.uuid4().hex
    work = tmp_path / "work"
    work.mkdir()
    env = _env(work, tag)
    produced: list[tuple[str, str]] = []

    # 1. S3 -> S3, credentials as storage options, with a performance report
    r = _run(["-i", f"{bucket}/in", "-o", f"{bucket}/out1", *ep,
              *_storage_options(key=key, secret=secret), "--report", "report1.html",
              "--workers", "1"],
             work, env)  # fmt: skip
    produced += [("run 1 stdout", r.stdout), ("run 1 stderr", r.stderr)]
    assert r.returncode == 0, r.stderr[-3000:]

    # 2. S3 -> local, credentials from the environment (SeaweedFS refuses any
    #    session token it did not issue: the token canary is in runs 4 and 5)
    env2 = _env(work, tag, AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret)
    r = _run(["-i", f"{bucket}/in", "-o", str(work / "out2"), *ep, "--report", "report2.html",
              "--workers", "1"], work, env2)  # fmt: skip
    produced += [("run 2 stdout", r.stdout), ("run 2 stderr", r.stderr)]
    assert r.returncode == 0, r.stderr[-3000:]

    # 3. wrong credentials, as options (with a token) and in the environment
    env3 = _env(work, tag, AWS_ACCESS_KEY_ID=c["wrong key"],
                AWS_SECRET_ACCESS_KEY=c["wrong secret"],
                AWS_SESSION_TOKEN=c["session token (env)"])  # fmt: skip
    r = _run(["-i", f"{bucket}/in", "-o", str(work / "out3"), *ep,
              *_storage_options(key=c["wrong key"], secret=c["wrong secret"],
                                token=c["token option"])], work, env3)  # fmt: skip
    produced += [("run 3 stdout", r.stdout), ("run 3 stderr", r.stderr)]
    assert r.returncode == 2 and "access denied" in r.stderr, r.stderr[-3000:]
    r = _run(["-i", f"{bucket}/in", "-o", str(work / "out4"), *ep], work, env3)
    produced += [("run 4 stdout", r.stdout), ("run 4 stderr", r.stderr)]
    assert r.returncode == 2 and "access denied" in r.stderr, r.stderr[-3000:]

    # 5. local -> local with the credential options of other fsspec backends
    #    (adlfs, http, sftp, gcsfs): the manifest records options, never secrets
    exotic = _storage_options(
        password=c["password"],
        token=c["token option"],
        client_kwargs=f'{{"aws_secret_access_key": "{c["client_kwargs secret"]}"}}',
        headers=f'{{"Authorization": "Bearer {c["Authorization header"]}"}}',
        connection_string=f"DefaultEndpointsProtocol=https;AccountName=x;"
        f"AccountKey={c['connection_string']};EndpointSuffix=core.windows.net",
        passphrase=c["passphrase"],
        gcs_token=f'{{"type": "service_account", "private_key": "{c["gcs private_key"]}"}}',
    )
    r = _run(["-i", str(sample_dir), "-o", str(work / "out5"), *exotic, "--report",
              "report5.html", "--workers", "1"], work, env3)  # fmt: skip
    produced += [("run 5 stdout", r.stdout), ("run 5 stderr", r.stderr)]
    assert r.returncode == 0, r.stderr[-3000:]

    # every byte produced: outputs on S3, everything under the working/temp dir
    fs.invalidate_cache()
    for obj in fs.find(b):
        if not obj.startswith(f"{b}/in/"):
            produced.append((f"s3://{obj}", fs.cat_file(obj).decode("latin-1")))
    assert any(name.endswith("manifest.json") for name, _ in produced)
    for p in _all_files(work):
        produced.append((str(p.relative_to(work)), p.read_bytes().decode("latin-1")))
    assert (work / "report1.html").stat().st_size > 10_000
    leaks = {
        what: sorted({where for where, text in produced if canary in text})
        for what, canary in c.items()
    }
    assert {k: v for k, v in leaks.items() if v} == {}
    assert not list(work.rglob("pwned*")) and not list(REPO.glob("pwned*"))


# ---------------------------------------------------------------- loopback, paths
def _listening(tag: str) -> set[str]:
    """Addresses the processes of a tagged run listen on."""
    found = set()
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) != tag:
                continue
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add(conn.laddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fruitdask", "run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _listen_while_running(proc: subprocess.Popen, tag: str) -> tuple[set[str], str]:
    """Wait for the dashboard line, then record the listening addresses."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    link = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("Dask dashboard:"):
            link = line.split(":", 1)[1].strip()
            break
    addresses = set()
    for _ in range(5):
        addresses |= _listening(tag)
        time.sleep(0.1)
    return addresses, link


@pytest.mark.slow
def test_loopback_by_default_and_paths_are_data(sample_dir, tmp_path):
    """A default local run listens on loopback only (scheduler, workers, dashboard);
    hostile file and folder names are read as data: every one gets its row, no
    command runs, nothing is written outside --output (and the report)."""
    src = tmp_path / "in"
    for i, p in enumerate(sorted(sample_dir.rglob("*.jpg"))):
        (src / p.relative_to(sample_dir)).parent.mkdir(parents=True, exist_ok=True)
        (src / p.relative_to(sample_dir)).write_bytes(p.read_bytes())
        for c in range(3):  # long enough a run to look at its sockets
            dst = src / f"copy{c}" / f"{i}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
    hostile = _write_tree(src, next(iter(sorted(sample_dir.rglob("*.jpg")))).read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    before = _all_files(tmp_path)
    tag = uuid.uuid4().hex
    out = work / "out dir {0} %s"
    proc = _start(["-i", str(src), "-o", str(out), "--workers", "2", "--partition-size", "4",
                   "--report", "report.html"], work, _env(scratch, tag))  # fmt: skip
    addresses, link = _listen_then_finish(proc, tag)
    assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses
    assert link.startswith("http://127.0.0.1:"), link

    import pyarrow.parquet as pq

    rows = pq.read_table(out / "images").column("path").to_pylist()
    assert set(hostile) <= set(rows) and len(rows) == len(set(rows))
    assert not list(tmp_path.rglob("pwned*")) and not list(REPO.glob("pwned*"))
    after = _all_files(tmp_path)
    new_or_changed = {p for p, m in after.items() if before.get(p) != m}
    outside = {
        p
        for p in new_or_changed
        if out not in p.parents and p != work / "report.html" and scratch not in p.parents
    }
    assert outside == set()
    assert not [p for p in before if p not in after]  # nothing deleted (the input is intact)


def _listen_then_finish(proc, tag: str):
    """What the run listens on while it works, then its successful exit."""
    try:
        found = _listen_while_running(proc, tag)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return found


@pytest.mark.slow
def test_wider_binding_is_an_explicit_option(sample_dir, tmp_path):
    tag = uuid.uuid4().hex
    proc = _start(["-i", str(sample_dir), "-o", str(tmp_path / "out"), "--workers", "1",
                   "--partition-size", "2", "--host", "0.0.0.0", "--dashboard-address",
                   "0.0.0.0:0"], tmp_path, _env(tmp_path, tag))  # fmt: skip
    addresses, _ = _listen_then_finish(proc, tag)
    assert "0.0.0.0" in addresses, addresses
