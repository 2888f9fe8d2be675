"""EMR deployment, offline.

- ``deploy/emr/bootstrap.sh`` runs against fake EMR instance-info files in temp
  folders (one per "node"), starts a real Dask scheduler and workers on loopback
  (no-systemd mode), and the pipeline runs on them; its systemd mode writes
  units and calls a fake ``systemctl``.
- The EMR API payloads round-trip through moto's server on loopback
  (run_job_flow, add_job_flow_steps, describe, terminate).
- Step polling is tested with botocore's Stubber (moto never completes steps).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "deploy" / "emr" / "bootstrap.sh"

pytestmark = pytest.mark.cloud


# ---------------------------------------------------------------- the bootstrap
def _node(root: Path, name: str, primary: bool, primary_host: str) -> Path:
    """A fake EMR node: the instance-info files as EMR writes them (abridged)."""
    info = root / name / "info"
    info.mkdir(parents=True)
    (info / "instance.json").write_text(
        json.dumps(
            {
                "isMaster": primary,
                "isRunningNameNode": primary,
                "isRunningResourceManager": primary,
                "instanceGroupId": "ig-PRIMARY" if primary else "ig-CORE",
            }
        )
    )
    (info / "job-flow.json").write_text(
        json.dumps(
            {
                "jobFlowId": "j-FAKE123",
                "jobFlowCreationInstant": 1700000000000,
                "instanceCount": 3,
                "masterInstanceId": "i-0primary",
                "masterPrivateDnsName": primary_host,
                "masterInstanceType": "m5.xlarge",
                "slaveInstanceType": "m5.xlarge",
                "hadoopVersion": "3.3.6",
            }
        )
    )
    return root / name


def _bootstrap(node: Path, *args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run(
        [
            "bash",
            str(BOOTSTRAP),
            "--info-dir",
            str(node / "info"),
            "--prefix",
            str(node / "opt"),
            *args,
        ],
        env={**os.environ, "SUDO": "", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pids(nodes: list[Path]) -> list[int]:
    return [int(p.read_text()) for n in nodes for p in (n / "opt" / "run").glob("*.pid")]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def nodes(tmp_path):
    """Nodes whose processes are stopped after the test, whatever happened."""
    made: list[Path] = []
    yield made
    for pid in _pids(made):
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.s3
def test_bootstrap_starts_dask_and_the_job_runs(nodes, tmp_path, sample_dir, s3):
    """Three fake nodes bootstrap at once; the job runs on the Dask they start;
    the daemons' logs reach the cluster's log URI (SeaweedFS standing in for S3,
    the environment for the nodes' instance profile)."""
    from distributed import Client

    from fruitdask import features, io, pipeline
    from fruitdask.config import RunConfig
    from fruitdask.testing import S3_KEY, S3_SECRET, free_port

    bucket = s3.make_bucket()
    node_env = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_ENDPOINT_URL_S3": s3.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    sp, dp = free_port(), free_port()
    common = [
        "--log-uri",
        f"{bucket}/emr-logs/",
        "--log-interval",
        "1",
        "--skip-install",
        "--python",
        sys.executable,
        "--no-systemd",
        "--bind",
        "127.0.0.1",
        "--scheduler-port",
        str(sp),
        "--dashboard-port",
        str(dp),
        "--nthreads",
        "1",
    ]
    primary = _node(tmp_path, "primary", True, "127.0.0.1")
    cores = [_node(tmp_path, f"core{i}", False, "127.0.0.1") for i in range(2)]
    nodes += [primary, *cores]
    # EMR bootstraps every node at once; the workers retry until the scheduler is up.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = {
            n.name: pool.submit(
                _bootstrap,
                n,
                *common,
                "--local-dir",
                str(n / "dask"),
                "--node-name",
                n.name,
                env=node_env,
            )  # fmt: skip
            for n in (primary, *cores)
        }
        results = {name: f.result() for name, f in runs.items()}
    for r in results.values():
        assert r.returncode == 0, r.stderr
    logs = {name: r.stderr for name, r in results.items()}
    assert "role: scheduler" in logs["primary"]
    assert all("role: worker (primary: 127.0.0.1)" in logs[c.name] for c in cores)
    assert (primary / "opt" / "run" / "scheduler.pid").exists()
    assert all((c / "opt" / "run" / "worker.pid").exists() for c in cores)
    launcher = (primary / "opt" / "spark_parity_main.py").read_text()
    assert "from spark_parity.cli import main" in launcher

    with Client(f"tcp://127.0.0.1:{sp}", timeout=60) as client:
        client.wait_for_workers(2, timeout=90)
        workers = client.scheduler_info()["workers"].values()
        assert sorted(w["nthreads"] for w in workers) == [1, 1]
        assert all(w["host"] == "127.0.0.1" for w in workers)
        out = tmp_path / "out"
        cfg = RunConfig(input=str(sample_dir), output=str(out), partition_size=25)
        summary = pipeline.run(cfg, client)

    # the output against direct kernel calls on the same files
    ref = {}
    for p in sorted(sample_dir.rglob("*")):
        if p.is_file() and p.name.lower().endswith(io.IMAGE_EXTENSIONS):
            f = features.extract(p.read_bytes())
            ref[p.relative_to(sample_dir).as_posix()] = len(f.descriptors)
    import pyarrow.parquet as pq

    manifest = json.loads((out / "manifest.json").read_text())
    images = pq.read_table([str(out / f) for f in manifest["files"]["images"]])
    got = dict(
        zip(
            images.column("path").to_pylist(), images.column("n_keypoints").to_pylist(), strict=True
        )
    )
    assert got == ref and summary.descriptors == sum(ref.values())
    assert manifest["cluster"] == {"workers": 2, "threads": 2}

    # --stop ends what it started (the daemons and the log copier), copies the
    # logs one last time; nothing is left behind
    pids = _pids(nodes)
    assert len(pids) == 6 and all(_alive(p) for p in pids)
    for node in (*cores, primary):
        r = _bootstrap(node, "--no-systemd", "--stop", env=node_env)
        assert r.returncode == 0, r.stderr
    assert not any(_alive(p) for p in pids)
    assert _pids(nodes) == []
    fs, root = s3.fs(), f"{bucket.removeprefix('s3://')}/emr-logs/j-FAKE123/fruitdask"
    assert sorted(fs.find(root)) == sorted(
        [f"{root}/primary/scheduler.log", *(f"{root}/{c.name}/worker.log" for c in cores)]
    )
    assert b"Scheduler at:" in fs.cat(f"{root}/primary/scheduler.log")
    for c in cores:
        assert b"Start worker at:" in fs.cat(f"{root}/{c.name}/worker.log")


def test_bootstrap_systemd_units(tmp_path):
    """The EMR path: units written, enabled without blocking (fake systemctl)."""
    calls = tmp_path / "systemctl.log"
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    env = {"SYSTEMCTL": str(fake)}
    host = "ip-10-0-0-1.ec2.internal"
    for name, is_primary in (("primary", True), ("core", False)):
        node = _node(tmp_path, name, is_primary, host)
        units = node / "units"
        r = _bootstrap(
            node,
            "--skip-install",
            "--python",
            sys.executable,
            "--systemd-dir",
            str(units),
            "--local-dir",
            str(node / "dask"),
            "--log-dir",
            str(node / "log"),
            "--log-uri",
            "s3://logs-bucket/emr/",
            env=env,
        )
        assert r.returncode == 0, r.stderr
        role = "scheduler" if is_primary else "worker"
        unit = (units / f"fruitdask-dask-{role}.service").read_text()
        assert f"StandardOutput=append:{node}/log/{role}.log" in unit
        # the log copier: every minute, and once more when it stops
        ship = (units / "fruitdask-logs.service").read_text()
        script = node / "opt" / "run" / "ship-logs.sh"
        assert f"ExecStart=/bin/bash {script} loop" in ship
        assert f"ExecStopPost=/bin/bash {script}\n" in ship
        dest = f"s3://logs-bucket/emr/j-FAKE123/fruitdask/{os.uname().nodename}"
        text = script.read_text()
        assert f"LOG_DEST={dest}" in text and "INTERVAL=60" in text and "ship_logs" in text
        [exec_start] = [x for x in unit.splitlines() if x.startswith("ExecStart=")]
        if is_primary:
            assert f"{sys.executable} -m distributed.cli.dask_scheduler --port 8786" in exec_start
            assert "--dashboard-address :8787" in exec_start
        else:
            assert f"-m distributed.cli.dask_worker tcp://{host}:8786" in exec_start
            assert "--memory-limit auto" in exec_start
        assert "Restart=always" in unit and "Environment=OMP_NUM_THREADS=1" in unit
        assert "WantedBy=multi-user.target" in unit
    assert calls.read_text().splitlines() == [
        "daemon-reload",
        "enable --now --no-block fruitdask-dask-scheduler.service fruitdask-logs.service",
        "daemon-reload",
        "enable --now --no-block fruitdask-dask-worker.service fruitdask-logs.service",
    ]


def test_bootstrap_refuses_without_info_files(tmp_path):
    node = tmp_path / "nowhere"
    r = _bootstrap(node, "--skip-install", "--python", sys.executable, "--no-systemd")
    assert r.returncode == 2 and "instance.json not found" in r.stderr
    bad = _node(tmp_path, "bad", True, "x")
    (bad / "info" / "instance.json").write_text("{}")
    r = _bootstrap(bad, "--skip-install", "--python", sys.executable, "--no-systemd")
    assert r.returncode == 2 and "no isMaster" in r.stderr
    r = _bootstrap(bad, "--no-systemd")
    assert r.returncode == 2


# ---------------------------------------------------------------- payloads
def _settings(**kw):
    from fruitdask.aws.emr import EmrSettings

    base = {
        "bootstrap_uri": "s3://fruitdask-deploy/emr/bootstrap.sh",
        "package": "s3://fruitdask-deploy/dist/fruitdask-0.1.0-py3-none-any.whl",
        "log_uri": "s3://fruitdask-deploy/logs/",
        "constraints": "s3://fruitdask-deploy/requirements.txt",
        "tags": {"team": "vision"},
    }
    return EmrSettings(**{**base, **kw})


def test_payloads():
    from fruitdask.aws import AwsError, emr

    p = emr.create_payload(_settings(core_spot=True, idle_timeout_s=1800, subnet_id="subnet-1"))
    assert p["ReleaseLabel"].startswith("emr-7.")
    assert p["AutoTerminationPolicy"] == {"IdleTimeout": 1800}
    assert p["Instances"]["KeepJobFlowAliveWhenNoSteps"] is True
    groups = {g["InstanceRole"]: g for g in p["Instances"]["InstanceGroups"]}
    assert groups["MASTER"]["InstanceCount"] == 1 and groups["MASTER"]["Market"] == "ON_DEMAND"
    assert groups["CORE"]["InstanceCount"] == 2 and groups["CORE"]["Market"] == "SPOT"
    [ba] = p["BootstrapActions"]
    args = ba["ScriptBootstrapAction"]["Args"]
    assert args[args.index("--package") + 1].endswith(".whl")
    assert args[args.index("--constraints") + 1] == "s3://fruitdask-deploy/requirements.txt"
    assert {"Key": "team", "Value": "vision"} in p["Tags"]
    for bad in ({"log_uri": "/tmp/logs"}, {"bootstrap_uri": "deploy/emr/bootstrap.sh"}):
        with pytest.raises(AwsError, match="s3://"):
            _settings(**bad)

    d = emr.dask_step("s3://b/in", "s3://b/out", ["--overwrite"])
    assert d["HadoopJarStep"]["Jar"] == "command-runner.jar"
    a = d["HadoopJarStep"]["Args"]
    assert a[:4] == ["/opt/fruitdask/venv/bin/python", "-m", "fruitdask", "run"]
    assert a[a.index("--cluster") + 1] == "tcp://127.0.0.1:8786" and a[-1] == "--overwrite"
    with pytest.raises(AwsError, match="every node"):
        emr.dask_step("/home/me/images", "s3://b/out")

    s = emr.spark_step("s3://b/in", "s3://b/out-spark")["HadoopJarStep"]["Args"]
    assert s[:5] == ["spark-submit", "--master", "yarn", "--deploy-mode", "client"]
    assert "spark.pyspark.python=/opt/fruitdask/venv/bin/python" in s
    launcher = s.index("/opt/fruitdask/spark_parity_main.py")
    assert s[launcher + 1 : launcher + 4] == ["run", "--master", "yarn"] and "--native-s3" in s
    s = emr.spark_step(
        "s3://b/in",
        "s3://b/o",
        venv_archive="s3://d/venv.tar.gz",
        launcher_uri="s3://d/spark_parity_main.py",
    )["HadoopJarStep"]["Args"]
    assert s[s.index("--archives") + 1] == "s3://d/venv.tar.gz#environment"
    assert "spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python" in s
    assert s[s.index("--deploy-mode") + 1] == "cluster"
    with pytest.raises(AwsError, match="launcher"):
        emr.spark_step("s3://b/in", "s3://b/o", venv_archive="s3://d/venv.tar.gz")


def test_cli_dry_run_prints_the_payloads(capsys, monkeypatch):
    import botocore.client

    from fruitdask.aws import emr
    from fruitdask.cli import main

    calls = []
    monkeypatch.setattr(
        botocore.client.BaseClient, "_make_api_call", lambda self, op, kw: calls.append(op)
    )
    s = _settings()
    rc = main(
        [
            "emr",
            "create",
            "--bootstrap-uri",
            s.bootstrap_uri,
            "--package",
            s.package,
            "--constraints",
            s.constraints,
            "--log-uri",
            s.log_uri,
            "--tag",
            "team=vision",
            "--dry-run",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"operation": "RunJobFlow", "payload": emr.create_payload(s)}

    rc = main(
        [
            "emr",
            "submit",
            "j-1",
            "-i",
            "s3://b/in",
            "-o",
            "s3://b/out",
            "--job",
            "both",
            "--dry-run",
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["operation"] == "AddJobFlowSteps"
    steps = printed["payload"]["Steps"]
    assert [st["HadoopJarStep"]["Args"][0] for st in steps] == [
        "/opt/fruitdask/venv/bin/python",
        "spark-submit",
    ]
    assert "s3://b/out-spark" in steps[1]["HadoopJarStep"]["Args"]
    assert (
        main(
            [
                "emr",
                "submit",
                "j-1",
                "-i",
                "s3://b/in",
                "-o",
                "s3://b/o",
                "--dry-run",
                "--job-args=--overwrite --partition-size 2000",
            ]
        )
        == 0
    )
    [step] = json.loads(capsys.readouterr().out)["payload"]["Steps"]
    assert step["HadoopJarStep"]["Args"][-3:] == ["--overwrite", "--partition-size", "2000"]

    assert main(["emr", "terminate", "j-1", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["payload"] == {"JobFlowIds": ["j-1"]}
    assert calls == []

    assert main(["emr", "submit", "j-1", "-i", "./local", "-o", "s3://b/o", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fruitdask: error: --input") and err.count("\n") == 1


@pytest.fixture(scope="module")
def aws():
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    from fruitdask.aws.testing import moto_server

    with moto_server() as endpoint:
        iam = boto3.client("iam")
        trust = json.dumps({"Version": "2012-10-17", "Statement": []})
        iam.create_role(RoleName="EMR_DefaultRole", AssumeRolePolicyDocument=trust)
        iam.create_role(RoleName="EMR_EC2_DefaultRole", AssumeRolePolicyDocument=trust)
        iam.create_instance_profile(InstanceProfileName="EMR_EC2_DefaultRole")
        yield endpoint


def test_payloads_round_trip_through_moto(aws, capsys):
    import boto3

    from fruitdask.aws import emr
    from fruitdask.cli import main

    client = boto3.client("emr")
    s = _settings()
    payload = emr.create_payload(s)
    argv = ["emr", "create", "--bootstrap-uri", s.bootstrap_uri, "--package", s.package]
    argv += ["--constraints", s.constraints, "--log-uri", s.log_uri, "--tag", "team=vision"]
    assert main(argv) == 0
    cluster_id = capsys.readouterr().out.strip()
    assert cluster_id.startswith("j-")

    c = client.describe_cluster(ClusterId=cluster_id)["Cluster"]
    assert c["Name"] == payload["Name"] and c["ReleaseLabel"] == payload["ReleaseLabel"]
    assert c["LogUri"] == payload["LogUri"]
    assert c["ServiceRole"] == "EMR_DefaultRole"
    assert c["Ec2InstanceAttributes"]["IamInstanceProfile"] == "EMR_EC2_DefaultRole"
    assert {a["Name"] for a in c["Applications"]} >= {"Hadoop", "Spark"}
    assert {(t["Key"], t["Value"]) for t in c["Tags"]} == {
        ("team", "vision"),
        ("created-by", "fruitdask"),
    }
    groups = client.list_instance_groups(ClusterId=cluster_id)["InstanceGroups"]
    assert sorted(
        (g["InstanceGroupType"], g["InstanceType"], g["RequestedInstanceCount"]) for g in groups
    ) == [("CORE", "m5.xlarge", 2), ("MASTER", "m5.xlarge", 1)]
    [ba] = client.list_bootstrap_actions(ClusterId=cluster_id)["BootstrapActions"]
    sent = payload["BootstrapActions"][0]["ScriptBootstrapAction"]
    assert ba["ScriptPath"] == sent["Path"] and ba["Args"] == sent["Args"]

    assert (
        main(["emr", "submit", cluster_id, "-i", "s3://b/in", "-o", "s3://b/out", "--job", "both"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(x.startswith("s-") for x in lines)
    steps = {st["Id"]: st for st in client.list_steps(ClusterId=cluster_id)["Steps"]}
    dask_id, spark_id = (x.split("\t")[0] for x in lines)
    assert (
        steps[dask_id]["Config"]["Args"]
        == emr.dask_step("s3://b/in", "s3://b/out")["HadoopJarStep"]["Args"]
    )
    assert steps[spark_id]["Config"]["Args"][0] == "spark-submit"
    assert steps[spark_id]["Config"]["Jar"] == "command-runner.jar"

    assert main(["emr", "status", cluster_id, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["id"] == cluster_id and len(status["steps"]) == 2

    assert main(["emr", "terminate", cluster_id]) == 0
    capsys.readouterr()
    state = client.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["State"]
    assert state in ("TERMINATING", "TERMINATED")


# ---------------------------------------------------------------- polling
def _stubbed():
    import boto3
    from botocore.stub import Stubber

    client = boto3.client(
        "emr", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    return client, Stubber(client)


def _step(state: str, **status) -> dict:
    return {
        "Step": {
            "Id": "s-1",
            "Name": "fruitdask: Dask job",
            "Config": {"Jar": "command-runner.jar", "Args": []},
            "ActionOnFailure": "CONTINUE",
            "Status": {"State": state, **status},
        }
    }


def test_wait_for_step_polls_until_done():
    from fruitdask.aws.emr import wait_for_step

    client, stub = _stubbed()
    expected = {"ClusterId": "j-1", "StepId": "s-1"}
    for state in ("PENDING", "PENDING", "RUNNING", "RUNNING", "COMPLETED"):
        stub.add_response("describe_step", _step(state), expected)
    seen, sleeps = [], []
    with stub:
        r = wait_for_step(
            client, "j-1", "s-1", poll_s=7, on_change=seen.append, sleep=sleeps.append
        )
        stub.assert_no_pending_responses()
    assert r.ok and r.state == "COMPLETED"
    assert seen == ["PENDING", "RUNNING", "COMPLETED"] and sleeps == [7, 7, 7, 7]


def test_wait_for_step_reports_failure_and_timeout():
    from fruitdask.aws import AwsError
    from fruitdask.aws.emr import wait_for_step

    client, stub = _stubbed()
    failure = {
        "Reason": "Unknown Error",
        "Message": "Exception in thread main: step failed with exitCode 2",
        "LogFile": "s3://logs/j-1/steps/s-1/stderr.gz",
    }
    stub.add_response("describe_step", _step("RUNNING"))
    stub.add_response("describe_step", _step("FAILED", FailureDetails=failure))
    with stub:
        r = wait_for_step(client, "j-1", "s-1", sleep=lambda s: None)
    assert not r.ok and r.state == "FAILED"
    assert r.reason == failure["Message"] and r.log_file == failure["LogFile"]

    client, stub = _stubbed()
    now = iter(range(0, 1000, 10))
    for _ in range(4):
        stub.add_response("describe_step", _step("RUNNING"))
    with stub, pytest.raises(AwsError, match="still RUNNING after 30s"):
        wait_for_step(
            client, "j-1", "s-1", timeout_s=30, sleep=lambda s: None, clock=lambda: next(now)
        )

    client, stub = _stubbed()
    stub.add_client_error("describe_step", "InvalidRequestException", "Step s-9 not found")
    with stub, pytest.raises(AwsError, match="Step s-9 not found"):
        wait_for_step(client, "j-1", "s-9")


def test_cli_submit_wait_exit_codes(monkeypatch, capsys):
    import dask.config

    from fruitdask.aws import emr
    from fruitdask.cli import main

    client, stub = _stubbed()
    monkeypatch.setattr(emr, "emr_client", lambda region=None: client)
    argv = ["emr", "submit", "j-1", "-i", "s3://b/in", "-o", "s3://b/out", "--wait"]
    stub.add_response("add_job_flow_steps", {"StepIds": ["s-1"]})
    stub.add_response("describe_step", _step("RUNNING"))
    stub.add_response(
        "describe_step",
        _step("FAILED", FailureDetails={"Message": "exitCode 2", "LogFile": "s3://l/stderr.gz"}),
    )
    with stub, dask.config.set({"fruitdask.aws.emr.poll-interval": 0}):
        assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "s-1: RUNNING",
        "s-1: FAILED",
        "fruitdask: error: step s-1 FAILED: exitCode 2 (log: s3://l/stderr.gz)",
    ]
    client, stub = _stubbed()
    monkeypatch.setattr(emr, "emr_client", lambda region=None: client)
    stub.add_response("add_job_flow_steps", {"StepIds": ["s-2"]})
    stub.add_response("describe_step", _step("COMPLETED"))
    with stub, dask.config.set({"fruitdask.aws.emr.poll-interval": 0}):
        assert main(argv) == 0
    assert capsys.readouterr().out == "s-2\tfruitdask: Dask job\n"


# ---------------------------------------------------------------- one shot
def test_release_is_validated(capsys):
    from fruitdask.aws import AwsError
    from fruitdask.aws.emr import check_release
    from fruitdask.cli import main

    check_release("emr-7.9.0")
    check_release("emr-7.0.0")
    for bad, message in (("emr-6.15.0", "Amazon Linux 2"), ("emr-5.36.2", "Amazon Linux 2"),
                         ("7.9.0", "not an EMR release label")):  # fmt: skip
        with pytest.raises(AwsError, match=message):
            check_release(bad)
    argv = ["emr", "run", "-i", "s3://b/in", "-o", "s3://b/out", "--release", "emr-6.15.0"]
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fruitdask: error: --release emr-6.15.0: EMR 6.x runs Amazon Linux 2")
    assert "use emr-7.x" in err and err.count("\n") == 1


def test_one_shot_dry_run_stages_and_terminates_by_itself(capsys, monkeypatch):
    import botocore.client

    from fruitdask.aws import emr
    from fruitdask.aws.stage import wheel_name
    from fruitdask.cli import main

    calls = []
    monkeypatch.setattr(
        botocore.client.BaseClient, "_make_api_call", lambda self, op, kw: calls.append(op)
    )
    assert main(["emr", "run", "-i", "s3://b/in", "-o", "s3://out/features", "--dry-run"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert calls == []
    staging = "s3://out/fruitdask-staging"
    assert doc["uploads"]["package"] == f"{staging}/wheels/{wheel_name()}"
    assert doc["uploads"]["bootstrap"].startswith(f"{staging}/emr/bootstrap-")
    assert doc["uploads"]["constraints"].startswith(f"{staging}/emr/constraints-")
    p = doc["payload"]
    assert p["Instances"]["KeepJobFlowAliveWhenNoSteps"] is False
    assert p["LogUri"] == f"{staging}/logs/"
    [ba] = p["BootstrapActions"]
    assert ba["ScriptBootstrapAction"]["Path"] == doc["uploads"]["bootstrap"]
    args = ba["ScriptBootstrapAction"]["Args"]
    assert args[args.index("--package") + 1] == doc["uploads"]["package"]
    assert args[args.index("--log-uri") + 1] == f"{staging}/logs/"
    [step] = p["Steps"]
    assert step["ActionOnFailure"] == "TERMINATE_CLUSTER"
    assert step == emr.dask_step("s3://b/in", "s3://out/features", workers=2,
                                 action_on_failure="TERMINATE_CLUSTER")  # fmt: skip
    assert main(["emr", "run", "-i", "s3://b/in", "-o", "s3://b/o", "--engine", "spark",
                 "--dry-run"]) == 0  # fmt: skip
    [step] = json.loads(capsys.readouterr().out)["payload"]["Steps"]
    assert step["HadoopJarStep"]["Args"][0] == "spark-submit"


def _moto_cluster(name: str, timeout: float = 120.0):
    """The moto cluster named ``name`` once the CLI has created it."""
    import threading

    import boto3
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.emr.models import emr_backends

    client = boto3.client("emr")
    tick = threading.Event()
    for _ in range(int(timeout / 0.1)):
        found = [c for c in client.list_clusters()["Clusters"] if c["Name"] == name]
        if found:
            backend = emr_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
            return found[0]["Id"], backend.clusters[found[0]["Id"]]
        tick.wait(0.1)
    raise AssertionError(f"no cluster {name} was created")


def _cli_env(endpoint: str) -> dict:
    from fruitdask.aws.testing import aws_env

    return {**aws_env(endpoint), "DASK_FRUITDASK__AWS__EMR__POLL_INTERVAL": "0.2"}


@pytest.mark.s3
@pytest.mark.timeout(300)
def test_one_shot_through_moto(aws, cli, s3):
    """``emr run``: the files staged on S3, the cluster created with its step and
    auto-termination, followed to the end, then the output, wall time and cost."""
    import uuid

    import boto3

    from fruitdask.aws.stage import wheel_name

    bucket = s3.make_bucket()
    name = f"fruitdask-{uuid.uuid4().hex[:8]}"
    store = ["--endpoint-url", s3.endpoint_url, "--storage-option", f"key={s3.storage_options['key']}",
             "--storage-option", f"secret={s3.storage_options['secret']}"]  # fmt: skip
    proc = cli.start("emr", "run", "-i", f"{bucket}/in", "-o", f"{bucket}/out", "--name", name,
                     "--key-name", "my-key", "--json", *store, **_cli_env(aws))  # fmt: skip
    try:
        cluster_id, fake = _moto_cluster(name)
        client = boto3.client("emr")
        c = client.describe_cluster(ClusterId=cluster_id)["Cluster"]
        assert c["AutoTerminate"] is True  # KeepJobFlowAliveWhenNoSteps=False
        staging = f"{bucket}/fruitdask-staging"
        assert c["LogUri"] == f"{staging}/logs/"
        [ba] = client.list_bootstrap_actions(ClusterId=cluster_id)["BootstrapActions"]
        fs = s3.fs()
        script = fs.cat(ba["ScriptPath"])
        assert script == (REPO / "fruitdask" / "aws" / "emr_bootstrap.sh").read_bytes()
        wheel = ba["Args"][ba["Args"].index("--package") + 1]
        assert wheel == f"{staging}/wheels/{wheel_name()}" and fs.exists(wheel)
        pins = fs.cat(ba["Args"][ba["Args"].index("--constraints") + 1]).decode()
        assert "\ndask==" in pins and "distributed==" in pins
        [step] = client.list_steps(ClusterId=cluster_id)["Steps"]
        assert step["ActionOnFailure"] == "TERMINATE_CLUSTER"
        args = step["Config"]["Args"]
        assert args[args.index("--input") + 1] == f"{bucket}/in"
        assert args[args.index("--cluster") + 1] == "tcp://127.0.0.1:8786"
        assert args[args.index("--workers") + 1] == "2"
        # EMR runs the step and ends the cluster (moto never does: played here)
        fake.steps[0].state = "COMPLETED"
        fake.terminate()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    got = json.loads(out)
    assert got["output"] == f"{bucket}/out" and got["cluster_id"] == cluster_id
    assert got["state"] == "TERMINATED" and list(got["steps"].values()) == ["COMPLETED"]
    assert got["wall_s"] > 0 and got["usage"]["instances"] == {"m5.xlarge": 3}
    assert got["usage"]["estimated_usd"] > 0 and got["usage"]["service"] == "emr"
    states = [x.split(": ")[-1] for x in err.splitlines() if x.startswith(f"cluster {cluster_id}:")]
    assert states[-1] == "TERMINATED" and len(states) >= 2, err  # WAITING in moto, then the end
    assert "(fruitdask: Dask job): RUNNING" in err and "(fruitdask: Dask job): COMPLETED" in err
    assert "ssh -i my-key.pem -N -L 8787:localhost:8787 hadoop@" in err


@pytest.mark.s3
@pytest.mark.timeout(300)
def test_one_shot_stopped_terminates_the_cluster(aws, cli, s3):
    """Ctrl-C while the job runs: the cluster is terminated, exit 130."""
    import signal
    import uuid

    import boto3

    bucket = s3.make_bucket()
    name = f"fruitdask-{uuid.uuid4().hex[:8]}"
    store = ["--endpoint-url", s3.endpoint_url, "--storage-option", f"key={s3.storage_options['key']}",
             "--storage-option", f"secret={s3.storage_options['secret']}"]  # fmt: skip
    proc = cli.start("emr", "run", "-i", f"{bucket}/in", "-o", f"{bucket}/out", "--name", name,
                     *store, **_cli_env(aws))  # fmt: skip
    try:
        cluster_id, _ = _moto_cluster(name)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert f"terminating {cluster_id}" in err and "stopped by SIGINT" in err
    state = boto3.client("emr").describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]
    assert state["State"] in ("TERMINATING", "TERMINATED")
