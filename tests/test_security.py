"""Security (issues 6 and 13): credentials never leak, the local cluster stays on
loopback unless told otherwise (and then says so), paths from the listing are data.

Real CLI runs (subprocesses) with unique canary secrets as keys, secrets and
tokens, given as ``--storage-option`` (proxies, ``config_kwargs``,
``client_kwargs``, headers, session tokens, profiles, an endpoint URL with a
password), as ``AWS_*`` environment variables, in a profile file and on the
wrong-credential and failed-task paths, against a real SeaweedFS whose only
identity *is* the canary pair (so the successful runs really authenticate with
it) and moto. Every writer is run: ``run``, ``pack``, ``train``, ``evaluate`` and
the Spark job. Every byte the runs produce is searched: stdout, stderr, the
output (local and S3), run states, the performance report, the log file under
the XDG cache, the working and temporary directories.
"""

from __future__ import annotations

import json
import secrets
import signal
from pathlib import Path

import psutil
import pytest

from fruitdask import io, testing

REPO = Path(__file__).resolve().parents[1]

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


def _produced(cli, *results, exclude: tuple[Path, ...] = ()) -> list[tuple[str, str]]:
    """Every byte the runs wrote: their stdout and stderr, and every file under
    the runs' home (outputs, run states, reports, the log files under the XDG
    cache, the temporary folder), except the ``exclude`` paths (inputs)."""
    produced = []
    for i, r in enumerate(results):
        produced += [(f"run {i} stdout", r.stdout), (f"run {i} stderr", r.stderr)]
    for p in _all_files(cli.home):
        if not any(p == x or x in p.parents for x in exclude):
            produced.append((str(p.relative_to(cli.home)), p.read_bytes().decode("latin-1")))
    assert any("fruitdask/logs/" in where for where, _ in produced), "no log file was searched"
    return produced


def _leaks(canaries: dict[str, str], produced: list[tuple[str, str]]) -> dict[str, list[str]]:
    found = {
        what: sorted({where for where, text in produced if canary in text})
        for what, canary in canaries.items()
    }
    return {k: v for k, v in found.items() if v}


@pytest.mark.s3
@pytest.mark.slow
def test_canary_credentials_never_leak(cli, canary_s3, sample_dir):
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
    work = cli.home
    results = []

    # 1. S3 -> S3, credentials as storage options, with a performance report
    r = cli.run("run", "-i", f"{bucket}/in", "-o", f"{bucket}/out1", *ep,
                *_storage_options(key=key, secret=secret), "--report", "report1.html",
                "--workers", "1")  # fmt: skip
    results.append(r)
    assert r.returncode == 0, r.stderr[-3000:]

    # 2. S3 -> local, credentials from the environment (SeaweedFS refuses any
    #    session token it did not issue: the token canary is in runs 4 and 5)
    r = cli.run("run", "-i", f"{bucket}/in", "-o", str(work / "out2"), *ep, "--report",
                "report2.html", "--workers", "1", AWS_ACCESS_KEY_ID=key,
                AWS_SECRET_ACCESS_KEY=secret)  # fmt: skip
    results.append(r)
    assert r.returncode == 0, r.stderr[-3000:]

    # 3. wrong credentials, as options (with a token) and in the environment
    wrong = {"AWS_ACCESS_KEY_ID": c["wrong key"], "AWS_SECRET_ACCESS_KEY": c["wrong secret"],
             "AWS_SESSION_TOKEN": c["session token (env)"]}  # fmt: skip
    r = cli.run("run", "-i", f"{bucket}/in", "-o", str(work / "out3"), *ep,
                *_storage_options(key=c["wrong key"], secret=c["wrong secret"],
                                  token=c["token option"]), **wrong)  # fmt: skip
    results.append(r)
    assert r.returncode == 2 and "access denied" in r.stderr, r.stderr[-3000:]
    r = cli.run("run", "-i", f"{bucket}/in", "-o", str(work / "out4"), *ep, **wrong)
    results.append(r)
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
    r = cli.run("run", "-i", str(sample_dir), "-o", str(work / "out5"), *exotic, "--report",
                "report5.html", "--workers", "1", **wrong)  # fmt: skip
    results.append(r)
    assert r.returncode == 0, r.stderr[-3000:]

    # every byte produced: outputs on S3, everything under the runs' home
    produced = _produced(cli, *results)
    fs.invalidate_cache()
    for obj in fs.find(b):
        if not obj.startswith(f"{b}/in/"):
            produced.append((f"s3://{obj}", fs.cat_file(obj).decode("latin-1")))
    assert any(name.endswith("manifest.json") for name, _ in produced)
    assert (work / "report1.html").stat().st_size > 10_000
    assert _leaks(c, produced) == {}
    assert not list(work.rglob("pwned*")) and not list(REPO.glob("pwned*"))


# ---------------------------------------------------------------- every writer
def _canaries() -> tuple[dict[str, str], list[str]]:
    """Canaries in every kind of storage option a secret hides in, and the
    command-line arguments giving them (options a local file system ignores)."""
    c = {
        "proxy password": "pRoXyPaSs" + secrets.token_hex(10),
        "config_kwargs": "cOnFiGkW" + secrets.token_hex(10),
        "client_kwargs session token": "cLiEnTtOkEn" + secrets.token_hex(10),
        "client_kwargs secret": "cLiEnTsEcReT" + secrets.token_hex(10),
        "header": "hEaDeR" + secrets.token_hex(10),
        "session_token": "sEsSiOnToKeN" + secrets.token_hex(10),
        "profile": "pRoFiLe" + secrets.token_hex(10),
        "endpoint password": "eNdPoInTpAsS" + secrets.token_hex(10),
    }
    proxy = f"http://user:{c['proxy password']}@127.0.0.1:9"
    args = _storage_options(
        config_kwargs=json.dumps({"proxies": {"https": proxy},
                                  "user_agent_extra": c["config_kwargs"]}),
        client_kwargs=json.dumps({"aws_session_token": c["client_kwargs session token"],
                                  "aws_secret_access_key": c["client_kwargs secret"]}),
        headers=json.dumps({"Authorization": f"Bearer {c['header']}"}),
        session_token=c["session_token"],
        profile=c["profile"],
    ) + ["--endpoint-url", f"http://user:{c['endpoint password']}@127.0.0.1:9"]  # fmt: skip
    return c, args


def _writer_runs(cli, writer: str, sample_dir: Path, args: list[str]) -> list:
    home = cli.home
    if writer == "run":
        return [cli.run("run", "-i", str(sample_dir), "-o", str(home / "out"), *args,
                        "--workers", "1", "--quiet")]  # fmt: skip
    if writer == "pack":
        return [cli.run("pack", str(sample_dir), str(home / "packed"), *args, "--workers", "1",
                        "--quiet")]  # fmt: skip
    if writer == "train+evaluate":
        train = cli.run("train", "-i", str(sample_dir), "-o", str(home / "model"), *args,
                        "--words", "8", "--workers", "1", "--quiet")  # fmt: skip
        evaluate = cli.run("evaluate", "-m", str(home / "model"), "-i", str(sample_dir), "-o",
                           str(home / "evaluation"), *args, "--workers", "1", "--quiet")  # fmt: skip
        return [train, evaluate]
    assert writer == "spark"
    return [cli.run("run", "-i", str(sample_dir), "-o", str(home / "spark-out"), *args,
                    "--master", "local[1]", "--quiet", module="spark_parity", timeout=600)]  # fmt: skip


@pytest.mark.parametrize(
    "writer",
    ["run", "pack", "train+evaluate",
     pytest.param("spark", marks=[pytest.mark.spark, pytest.mark.slow])],
)  # fmt: skip
def test_no_writer_records_a_secret(cli, sample_dir, writer):
    """Every command that writes an output, given secrets in every kind of storage
    option: its manifest records the allowed option names only, and no byte it
    writes (output, run state, log file) holds a secret."""
    c, args = _canaries()
    results = _writer_runs(cli, writer, sample_dir, args)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    manifests = list(cli.home.rglob("manifest.json"))
    assert manifests
    for m in manifests:
        recorded = json.loads(m.read_text()).get("storage_options")
        if recorded is not None:  # the runs that record options: the allowed names only
            assert set(recorded) <= {"endpoint_url", "client_kwargs", "config_kwargs",
                                     "session_token", "profile"}, recorded  # fmt: skip
    assert _leaks(c, _produced(cli, *results)) == {}


def test_a_failed_task_leaks_no_secret(cli, sample_dir):
    """A task that fails (its output folder is a file) is logged by the worker
    with its arguments, the run's settings among them: no secret in the log."""
    c, args = _canaries()
    out = cli.home / "out"
    out.mkdir()
    (out / "_fruitdask").mkdir()  # an output of fruitdask's, that nothing committed
    (out / "images").write_text("not a folder")
    # one image a task: the logged arguments are short, the settings among the first
    r = cli.run("run", "-i", str(sample_dir), "-o", str(out), "--overwrite", *args,
                "--workers", "1", "--partition-size", "1", "--quiet")  # fmt: skip
    cli.one_line(r, "images")
    logs = list((cli.home / "cache" / "fruitdask" / "logs").glob("*.log"))
    assert logs and any("Compute Failed" in p.read_text() for p in logs), "no task failed"
    assert _leaks(c, _produced(cli, r)) == {}


@pytest.mark.slow
def test_s3_secrets_in_use_never_leak(cli, moto_s3, sample_dir):
    """Secrets that are used, against moto: a profile file's keys, a session token
    in client_kwargs, a proxy for https (the endpoint is http), and an endpoint
    URL with a user and password; a run and a pack, S3 to S3."""
    c = {
        "profile key": "AKIA" + secrets.token_hex(8).upper(),
        "profile secret": "pRoFiLeSeCrEt" + secrets.token_hex(12),
        "session token": "sEsSiOnToKeN" + secrets.token_hex(12),
        "proxy password": "pRoXyPaSs" + secrets.token_hex(10),
        "endpoint password": "eNdPoInTpAsS" + secrets.token_hex(10),
    }
    aws = cli.home / "aws-config"  # holds the canaries: not searched
    aws.mkdir()
    (aws / "credentials").write_text(
        f"[canary]\naws_access_key_id = {c['profile key']}\n"
        f"aws_secret_access_key = {c['profile secret']}\n"
    )
    (aws / "config").write_text("[profile canary]\nregion = us-east-1\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
           "AWS_CONFIG_FILE": str(aws / "config")}  # fmt: skip
    bucket = moto_s3.make_bucket()
    moto_s3.put(bucket, {f"in/{p.relative_to(sample_dir).as_posix()}": p.read_bytes()
                         for p in sorted(sample_dir.rglob("*.jpg"))})  # fmt: skip
    proxy = f"http://user:{c['proxy password']}@127.0.0.1:9"
    used = ["--endpoint-url", moto_s3.endpoint_url] + _storage_options(
        profile="canary",
        client_kwargs=json.dumps({"aws_session_token": c["session token"]}),
        config_kwargs=json.dumps({"proxies": {"https": proxy}}),
    )  # fmt: skip
    results = [
        cli.run("run", "-i", f"s3://{bucket}/in", "-o", f"s3://{bucket}/out", *used,
                "--workers", "1", "--quiet", **env),
        cli.run("pack", f"s3://{bucket}/in", f"s3://{bucket}/packed", *used, "--workers", "1",
                "--quiet", **env),
    ]  # fmt: skip
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    # an endpoint URL with a password: refused at once, the password not shown
    host = moto_s3.endpoint_url.removeprefix("http://")
    r = cli.run("run", "-i", f"s3://{bucket}/in", "-o", str(cli.home / "out-userinfo"),
                "--endpoint-url", f"http://user:{c['endpoint password']}@{host}",
                *_storage_options(profile="canary"), "--workers", "1", "--quiet", **env)  # fmt: skip
    cli.one_line(r, "no user or password", f"http://***@{host}")
    assert not (cli.home / "out-userinfo").exists()
    results.append(r)
    produced = _produced(cli, *results, exclude=(aws,))
    client = moto_s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            if not o["Key"].startswith("in/"):
                body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                produced.append((f"s3://{bucket}/{o['Key']}", body.decode("latin-1")))
    assert any(where.endswith("out/manifest.json") for where, _ in produced)
    assert _leaks(c, produced) == {}


# ---------------------------------------------------------------- loopback, paths
def _listening(cli) -> set[tuple[str, int]]:
    """(address, port) every process of the CLI's runs listens on."""
    found = set()
    for p in cli.processes():
        try:
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _listen_then_finish(cli, proc) -> tuple[set[tuple[str, int]], str, str]:
    """Wait for the run's dashboard line (the cluster is up), freeze every process
    of the run while its sockets are read, let it finish: (listening addresses,
    dashboard link, stderr). The run must succeed."""
    assert proc.stderr is not None
    lines = []
    link = ""
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("Dask dashboard:"):
                link = line.split(":", 1)[1].strip()
                break
        assert link, "".join(lines)[-3000:]
        frozen = cli.processes()
        for p in frozen:
            with _gone():
                p.send_signal(signal.SIGSTOP)
        try:
            found = _listening(cli)
        finally:
            for p in frozen:
                with _gone():
                    p.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return found, link, "".join(lines) + err


def _gone():
    import contextlib

    return contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError)


@pytest.mark.slow
def test_loopback_by_default_and_paths_are_data(cli, sample_dir, tmp_path):
    """A default local run listens on loopback only (scheduler, workers, dashboard);
    hostile file and folder names are read as data: every one gets its row, no
    command runs, nothing is written outside --output (and the report)."""
    src = tmp_path / "in"
    for p in sorted(sample_dir.rglob("*.jpg")):
        (src / p.relative_to(sample_dir)).parent.mkdir(parents=True, exist_ok=True)
        (src / p.relative_to(sample_dir)).write_bytes(p.read_bytes())
    hostile = _write_tree(src, next(iter(sorted(sample_dir.rglob("*.jpg")))).read_bytes())
    out = tmp_path / "out dir {0} %s"
    before = _all_files(tmp_path)
    proc = cli.start("run", "-i", str(src), "-o", str(out), "--workers", "2",
                     "--partition-size", "4", "--report", "report.html")  # fmt: skip
    addresses, link, err = _listen_then_finish(cli, proc)
    ips = {ip for ip, _ in addresses}
    assert ips and ips <= {"127.0.0.1", "::1"}, addresses
    assert link.startswith("http://127.0.0.1:"), link
    assert "warning" not in err

    import pyarrow.parquet as pq

    rows = pq.read_table(out / "images").column("path").to_pylist()
    # names are shown one-to-one: a backslash doubled (io.display_name)
    assert {io.display_name(h) for h in hostile} <= set(rows) and len(rows) == len(set(rows))
    assert not list(tmp_path.rglob("pwned*")) and not list(REPO.glob("pwned*"))
    after = _all_files(tmp_path)
    new_or_changed = {p for p, m in after.items() if before.get(p) != m}
    private = (out, cli.home / "tmp", cli.home / "cache")  # the output, temp files, logs
    outside = {
        p for p in new_or_changed
        if not any(x in p.parents for x in private) and p != cli.home / "report.html"
    }  # fmt: skip
    assert outside == set()
    assert not [p for p in before if p not in after]  # nothing deleted (the input is intact)


@pytest.mark.slow
def test_a_bare_dashboard_port_binds_loopback(cli, sample_dir, tmp_path):
    """``--dashboard-address 8799`` (a port alone) used to bind every interface:
    it binds loopback, and no warning is printed."""
    port = testing.free_port()
    proc = cli.start("run", "-i", str(sample_dir), "-o", str(tmp_path / "out"), "--workers",
                     "1", "--dashboard-address", str(port))  # fmt: skip
    addresses, link, err = _listen_then_finish(cli, proc)
    assert {ip for ip, p in addresses if p == port} == {"127.0.0.1"}, addresses
    assert {ip for ip, _ in addresses} <= {"127.0.0.1", "::1"}, addresses
    assert link == f"http://127.0.0.1:{port}/status"
    assert "warning" not in err


@pytest.mark.slow
def test_wider_binding_is_an_explicit_option_and_warns(cli, sample_dir, tmp_path):
    """``--host 0.0.0.0 --dashboard-address 0.0.0.0:0`` binds every interface, and
    one warning line names what is exposed."""
    proc = cli.start("run", "-i", str(sample_dir), "-o", str(tmp_path / "out"), "--workers",
                     "1", "--partition-size", "2", "--host", "0.0.0.0", "--dashboard-address",
                     "0.0.0.0:0")  # fmt: skip
    addresses, _, err = _listen_then_finish(cli, proc)
    assert "0.0.0.0" in {ip for ip, _ in addresses}, addresses
    warnings = [x for x in err.splitlines() if "warning" in x.lower()]
    assert len(warnings) == 1, err[-3000:]
    for needle in ("scheduler on 0.0.0.0", "dashboard on 0.0.0.0", "network"):
        assert needle in warnings[0], warnings[0]
