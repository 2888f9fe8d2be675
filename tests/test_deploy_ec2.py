"""EC2 deployment through dask-cloudprovider, offline: moto's server on loopback.

The EC2 API is moto's, with instance-type, AMI and key-pair validation on; the
assertions are on what reached it (security-group rules, decoded user data,
instance types, tags, termination). The job itself runs **for real**: only the
VM start is patched, so that the command in each instance's real user data (as
stored by EC2) runs as a local process on 127.0.0.1, and ``fruitdask run
--cluster ec2`` then runs the pipeline on that TLS cluster. That part runs in a
subprocess (``python tests/test_deploy_ec2.py child ...``) because EC2Cluster
changes dask's TLS configuration for the whole process.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import http.server
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMAGE = "registry.example.invalid/fruitdask:test"
PROFILE = "fruitdask-test-profile"
CALLER = "198.51.100.7/32"  # TEST-NET-2: never routed
CANONICAL = "099720109477"

pytestmark = pytest.mark.cloud


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def aws():
    """moto's EC2/IAM on a free loopback port, for this module."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    from fruitdask.aws.testing import moto_server

    with moto_server() as endpoint:
        boto3.client("iam").create_instance_profile(InstanceProfileName=PROFILE)
        yield endpoint


@pytest.fixture
def ec2(aws):
    import boto3

    return boto3.client("ec2")


@pytest.fixture
def ami(ec2) -> str:
    """An Ubuntu AMI moto knows (validation refuses unknown ids)."""
    images = ec2.describe_images(Owners=[CANONICAL])["Images"]
    return sorted(i["ImageId"] for i in images)[0]


@pytest.fixture
def restore_dask_config():
    """EC2Cluster sets TLS in dask.config for the whole process; undo it."""
    import dask.config

    saved = copy.deepcopy(dask.config.config)
    yield
    dask.config.config.clear()
    dask.config.config.update(saved)


def _spec(**extra):
    from fruitdask.config import ClusterSpec

    extra.setdefault("ec2_image", IMAGE)
    extra.setdefault("ec2_allow_cidr", [CALLER])
    return ClusterSpec(kind="ec2", workers=extra.pop("workers", 2), extra=extra)


def _groups(ec2, run_tag: str | None = None) -> list[dict]:
    groups = ec2.describe_security_groups()["SecurityGroups"]
    groups = [g for g in groups if g["GroupName"].startswith("fruitdask-")]
    if run_tag:
        groups = [g for g in groups if {"Key": "fruitdask-run", "Value": run_tag} in g["Tags"]]
    return groups


def _instances(ec2, key: str, value: str) -> list[dict]:
    pages = ec2.describe_instances(Filters=[{"Name": f"tag:{key}", "Values": [value]}])
    return [i for r in pages["Reservations"] for i in r["Instances"]]


def _tags(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


# ---------------------------------------------------------------- pure checks
def test_allow_cidr_is_never_the_internet():
    from fruitdask.aws import AwsError
    from fruitdask.aws.ec2 import check_cidr, security_group_rules

    assert check_cidr("203.0.113.7") == "203.0.113.7/32"
    assert check_cidr("10.1.0.0/16") == "10.1.0.0/16"
    assert check_cidr("2001:db8::1") == "2001:db8::1/128"
    for bad in ("0.0.0.0/0", "::/0", "0.0.0.0/1", "10.0.0.0/4", "example.com", ""):
        with pytest.raises(AwsError):
            check_cidr(bad)

    rules = security_group_rules(["203.0.113.7/32", "2001:db8::/64"], "sg-1", 8786, 8787)
    assert [(r["IpProtocol"], r.get("FromPort"), r.get("ToPort")) for r in rules] == [
        ("tcp", 8786, 8786),
        ("tcp", 8787, 8787),
        ("-1", None, None),
    ]
    for r in rules[:2]:
        assert [x["CidrIp"] for x in r["IpRanges"]] == ["203.0.113.7/32"]
        assert [x["CidrIpv6"] for x in r["Ipv6Ranges"]] == ["2001:db8::/64"]
    assert rules[2]["UserIdGroupPairs"][0]["GroupId"] == "sg-1"
    assert "0.0.0.0/0" not in json.dumps(rules)


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    answer = b"203.0.113.9\n"

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.answer)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _echo_server(answer: bytes):
    handler = type("Handler", (_EchoHandler,), {"answer": answer})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_caller_address_lookup_on_loopback():
    """The default --allow-cidr: an IP echo service (here a loopback stand-in for
    checkip.amazonaws.com); any failure asks for --allow-cidr."""
    from fruitdask.aws import AwsError
    from fruitdask.aws.ec2 import caller_cidr
    from fruitdask.testing import free_port

    with _echo_server(b"203.0.113.9\n") as url:
        assert caller_cidr(url, timeout=5) == "203.0.113.9/32"
    with _echo_server(b"<html>captive portal</html>") as url:
        with pytest.raises(AwsError, match="--allow-cidr"):
            caller_cidr(url, timeout=5)
    with pytest.raises(AwsError, match="--allow-cidr"):
        caller_cidr(f"http://127.0.0.1:{free_port()}/", timeout=5)
    assert caller_cidr(fetch=lambda url, timeout: "2001:db8::5") == "2001:db8::5/128"


def test_user_data_guard():
    import dask.config

    from fruitdask.aws import AwsError
    from fruitdask.aws.ec2 import check_user_data

    ok = "#cloud-config\nruncmd:\n  - docker run img python -m distributed.cli.dask_scheduler\n"
    check_user_data(ok, ("a-secret-value-of-some-length",))
    with pytest.raises(AwsError, match="credentials"):
        check_user_data(ok + " -e AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE")
    with pytest.raises(AwsError, match="credentials"):
        check_user_data(
            ok + " -e X=a-secret-value-of-some-length", ("a-secret-value-of-some-length",)
        )
    # hidden in the base64 dask config the instances inherit
    blob = dask.config.serialize({"s3": {"secret": "a-secret-value-of-some-length"}})
    with pytest.raises(AwsError, match="credentials"):
        check_user_data(
            f'env DASK_INTERNAL_INHERIT_CONFIG="{blob}" python', ("a-secret-value-of-some-length",)
        )
    with pytest.raises(AwsError, match="16,384"):
        check_user_data("x" * 16385)


def test_dry_run_calls_nothing(monkeypatch, capsys):
    import botocore.client
    import dask

    from fruitdask.aws.stage import pinned_packages, wheel_name
    from fruitdask.cli import main

    calls = []
    monkeypatch.setattr(
        botocore.client.BaseClient, "_make_api_call", lambda self, op, kw: calls.append(op)
    )
    data = ["--input", "s3://in-bucket/fruits", "--output", "s3://out-bucket/features"]
    rc = main(
        [
            "run",
            "--cluster",
            "ec2",
            "--dry-run",
            *data,
            "--image",
            IMAGE,
            "--workers",
            "3",
            "--worker-instance-type",
            "c6i.2xlarge",
            "--allow-cidr",
            "203.0.113.7",
            "--instance-profile",
            PROFILE,
            "--spot",
            "--tag",
            "team=vision",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and calls == []
    assert "3 x c6i.2xlarge" in out and "1 x m5.large" in out
    assert "tcp 8786" in out and "tcp 8787" in out and "from 203.0.113.7/32" in out
    assert "0.0.0.0/0" not in out
    assert "spot" in out and "team=vision" in out and PROFILE in out
    assert f"image {IMAGE}" in out and "fruitdask     in the image (--image)" in out
    # 1 x m5.large $0.096 + 3 x c6i.2xlarge $0.34 + 4 x (40 GB gp3 + a public IPv4)
    hourly = 0.096 + 3 * 0.34 + 4 * (40 * 0.08 / 730 + 0.005)
    assert f"${hourly:.3f}/hour" in out

    # The default: the official Dask image at this machine's versions, and how
    # fruitdask gets onto it.
    assert main(["run", "--cluster", "ec2", "--dry-run", *data]) == 0
    out = capsys.readouterr().out
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"image ghcr.io/dask/dask:{dask.__version__}-py{py}" in out
    assert wheel_name() in out and "s3://out-bucket/fruitdask-staging/wheels/" in out
    assert " ".join(pinned_packages()) in out.replace("\n                ", " ")
    assert calls == []

    rc = main(["run", "--cluster", "ec2", "--dry-run"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("fruitdask: error: --input is required with --cluster ec2")
    assert err.count("\n") == 1


def test_remote_clusters_refuse_local_paths(cli, sample_dir, tmp_path):
    """With a cluster whose workers run elsewhere, a path on this machine is
    refused before anything is created: one line, exit 2, no output folder."""
    from fruitdask.cluster import is_remote

    assert not is_remote("local") and not is_remote("tcp://127.0.0.1:8786")
    assert not is_remote("tls://localhost:8786")
    assert is_remote("ec2") and is_remote("tcp://203.0.113.5:8786")
    out = tmp_path / "out"
    cases = [
        (["run", "--cluster", "ec2", "--input", str(sample_dir), "--output", "s3://b/o"],
         ["--input", "a path on this machine"]),
        (["run", "--cluster", "ec2", "--input", "s3://b/in", "--output", str(out)],
         ["--output", "a path on this machine"]),
        (["run", "--cluster", "tcp://203.0.113.5:8786", "--input", "s3://b/in"],
         ["--output is required", "s3://b/in-features"]),
        (["run", "--cluster", "ec2", "--output", "s3://b/o"], ["--input is required"]),
        (["pack", str(sample_dir), "s3://b/packed", "--cluster", "ec2"],
         ["SRC", "a path on this machine"]),
        (["run", "--cluster", "ec2", "--input", "file:///data", "--output", "s3://b/o",
          "--dry-run"], ["--input file:///data"]),
    ]  # fmt: skip
    for argv, needles in cases:
        cli.one_line(cli.run(*argv), *needles)
    assert not out.exists()


@pytest.mark.s3
def test_private_input_without_instance_profile_is_refused(cli, s3, sample_dir):
    """The instances would have no credentials for a private input: refused
    before anything is created in the account, with the command that fixes it."""
    from fruitdask.testing import S3_KEY, S3_SECRET

    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/in")
    keys = {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    r = cli.run("run", "--cluster", "ec2", "--input", f"{bucket}/in", "--output",
                f"{bucket}/out", "--endpoint-url", s3.endpoint_url, "--allow-cidr", CALLER,
                "--quiet", **keys)  # fmt: skip
    cli.one_line(r, "no --instance-profile", f"read the private input {bucket}/in",
                 f"fruitdask aws iam --input {bucket}/in --output {bucket}/out",
                 "--instance-profile fruitdask-cluster")  # fmt: skip
    assert s3.fs().find(f"{bucket.removeprefix('s3://')}/out") == []


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    # in the log's folder: `python -m` puts the working directory first on the path
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=fh, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(300)
def test_version_check_at_connect(cli, sample_dir, tmp_path):
    """A scheduler whose workers run other versions is refused at connect with
    one line: a different dask (as importlib.metadata reports it), then other
    fruitdask files. Real scheduler and worker processes on loopback."""
    import shutil

    import dask
    from distributed import Client

    from fruitdask.testing import free_port

    port = free_port()
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base_env["PYTHONPATH"] = str(REPO)
    scheduler = _start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                        "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                       base_env, tmp_path / "scheduler.log")  # fmt: skip
    # a worker that says dask 2020.1.0: a distribution's metadata ahead on its path
    old = tmp_path / "old-dask"
    (old / "dask-2020.1.0.dist-info").mkdir(parents=True)
    (old / "dask-2020.1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: dask\nVersion: 2020.1.0\n"
    )
    # a worker with fruitdask's files changed by one comment
    other = tmp_path / "other-fruitdask"
    shutil.copytree(REPO / "fruitdask", other / "fruitdask",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    with open(other / "fruitdask" / "features.py", "a") as fh:
        fh.write("# a local change\n")
    procs = [scheduler]
    address = f"tcp://127.0.0.1:{port}"
    argv = ["run", "--cluster", address, "--input", str(sample_dir), "--output",
            str(tmp_path / "out"), "--quiet"]  # fmt: skip
    try:
        with Client(address, timeout=60) as client:
            for path, needles in (
                (old, [f"dask {dask.__version__} here, 2020.1.0 on worker tcp://127.0.0.1:"]),
                (other, ["fruitdask's files differ", "on worker tcp://127.0.0.1:"]),
            ):
                env = {**base_env, "PYTHONPATH": f"{path}{os.pathsep}{REPO}"}
                worker = _start([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                 "--nthreads", "1", "--host", "127.0.0.1"],
                                env, tmp_path / "worker.log")  # fmt: skip
                procs.append(worker)
                client.wait_for_workers(1, timeout=120)
                cli.one_line(cli.run(*argv), "run different versions", *needles)
                _stop(worker)
                tick = threading.Event()
                for _ in range(600):  # the scheduler notices the worker has gone
                    if not client.scheduler_info()["workers"]:
                        break
                    tick.wait(0.1)
        assert not (tmp_path / "out" / "_SUCCESS").exists()
    finally:
        for p in procs:
            _stop(p)


def test_missing_aws_extra_gives_the_install_hint(monkeypatch):
    from fruitdask.aws import AwsError
    from fruitdask.aws.ec2 import ec2_cluster

    monkeypatch.setitem(sys.modules, "dask_cloudprovider.aws.ec2", None)
    with pytest.raises(AwsError, match=r"pip install fruitdask\[aws\]"):
        with ec2_cluster(_spec()):
            pass


# ---------------------------------------------------------------- against moto
def test_latest_ami_lookup(ec2):
    from fruitdask.aws import AwsError
    from fruitdask.aws.ec2 import latest_ami

    name = "ubuntu/images/hvm-ssd/ubuntu-*-amd64-server-*"
    found = latest_ami(ec2, name, CANONICAL)
    [image] = ec2.describe_images(ImageIds=[found])["Images"]
    assert image["OwnerId"] == CANONICAL and image["Name"].startswith("ubuntu/images/")
    with pytest.raises(AwsError, match="--ami"):
        latest_ami(ec2, "no-such-image-*", CANONICAL)


def test_no_caller_address_creates_nothing(ec2):
    """Without --allow-cidr and no way to find the caller's address: refuse before
    anything exists in the account."""
    import dask.config

    from fruitdask.aws import AwsError
    from fruitdask.aws.ec2 import ec2_cluster
    from fruitdask.testing import free_port

    def no_lookup() -> str:
        raise AwsError("cannot determine your public IP address (test); pass --allow-cidr")

    before = _groups(ec2)
    with pytest.raises(AwsError, match="--allow-cidr"):
        with ec2_cluster(_spec(ec2_allow_cidr=None), lookup_ip=no_lookup):
            pass
    # the default lookup, pointed at a loopback port where nothing listens
    url = f"http://127.0.0.1:{free_port()}/"
    with dask.config.set({"fruitdask.aws.ec2.ip-lookup-url": url}):
        with pytest.raises(AwsError, match="--allow-cidr"):
            with ec2_cluster(_spec(ec2_allow_cidr=None)):
                pass
    assert _groups(ec2) == before


def test_failed_start_leaves_nothing(ec2, ami, monkeypatch, restore_dask_config):
    """A bad scheduler instance type fails in RunInstances (moto validates it): one
    line, and the security group created before it is deleted."""
    from fruitdask.aws import AwsError
    from fruitdask.aws import ec2 as fec2

    seen = {}
    real = fec2.create_security_group

    def spy(client, **kw):
        group_id = real(client, **kw)
        seen["group"] = client.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
        return group_id

    monkeypatch.setattr(fec2, "create_security_group", spy)
    spec = _spec(ec2_ami=ami, ec2_scheduler_instance_type="m5.notatype", ec2_tag=["case=fail"])
    with pytest.raises(AwsError) as info:
        with fec2.ec2_cluster(spec):
            pytest.fail("the cluster must not start")
    msg = str(info.value)
    assert "InvalidInstanceType" in msg and "m5.notatype" in msg and "\n" not in msg

    group = seen["group"]
    run_id = _tags(group)["fruitdask-run"]
    assert _tags(group)["case"] == "fail" and _tags(group)["created-by"] == "fruitdask"
    ingress = json.dumps(group["IpPermissions"])
    assert "0.0.0.0/0" not in ingress and "::/0" not in ingress
    assert _groups(ec2, run_id) == []
    assert all(i["State"]["Name"] == "terminated" for i in _instances(ec2, "fruitdask-run", run_id))


def test_teardown_sweeps_by_tag(ec2, ami):
    """Instances that the cluster object lost track of are found by the run tag."""
    from fruitdask.aws.ec2 import create_security_group, teardown

    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
    tags = {"fruitdask-run": "sweep-1", "created-by": "fruitdask"}
    group = create_security_group(
        ec2,
        vpc=vpc["VpcId"],
        run_id="sweep-1",
        tags=tags,
        cidrs=(CALLER,),
        scheduler_port=8786,
        dashboard_port=8787,
    )
    ec2.run_instances(
        ImageId=ami,
        InstanceType="c6i.xlarge",
        MinCount=2,
        MaxCount=2,
        SecurityGroupIds=[group],
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ],
    )
    assert teardown(ec2, "sweep-1", group, clusters=[], timeout=30) == []
    states = {i["State"]["Name"] for i in _instances(ec2, "fruitdask-run", "sweep-1")}
    assert states == {"terminated"}
    assert _groups(ec2, "sweep-1") == []


def test_teardown_holds_a_second_signal(ec2, ami):
    """Outside the CLI (library use, main thread): a Ctrl-C during the teardown
    is held until every instance is terminated and the group deleted, then
    raised."""
    import signal

    from distributed.core import Status

    from fruitdask.aws.ec2 import create_security_group, teardown

    tags = {"fruitdask-run": "sweep-2", "created-by": "fruitdask"}
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    group = create_security_group(ec2, vpc=vpc, run_id="sweep-2", tags=tags,
                                  cidrs=(CALLER,), scheduler_port=8786, dashboard_port=8787)  # fmt: skip
    ec2.run_instances(
        ImageId=ami, InstanceType="c6i.xlarge", MinCount=2, MaxCount=2, SecurityGroupIds=[group],
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )  # fmt: skip

    class Interrupted:
        """A cluster whose close is interrupted by Ctrl-C (the first teardown step)."""

        status = Status.running
        _loop_runner = object()

        def close(self, timeout=None):
            os.kill(os.getpid(), signal.SIGINT)

    said = []
    with pytest.raises(KeyboardInterrupt):
        teardown(ec2, "sweep-2", group, clusters=[Interrupted()], timeout=30, say=said.append)
    assert said == ["fruitdask: terminating the EC2 instances first; this signal is held"]
    states = {i["State"]["Name"] for i in _instances(ec2, "fruitdask-run", "sweep-2")}
    assert states == {"terminated"}
    assert _groups(ec2, "sweep-2") == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_group_deletion_waits_for_network_interfaces():
    """Just-terminated instances hold the group (DependencyViolation) for a while."""
    import boto3
    from botocore.stub import Stubber

    from fruitdask.aws.ec2 import _delete_group

    client = boto3.client(
        "ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
    )
    sleeps = []
    with Stubber(client) as stub:
        for _ in range(2):
            stub.add_client_error("delete_security_group", "DependencyViolation")
        stub.add_response("delete_security_group", {}, {"GroupId": "sg-1"})
        _delete_group(client, "sg-1", timeout=60, sleep=sleeps.append)
        stub.assert_no_pending_responses()
    assert sleeps == [5, 5]


def test_container_recipe_pins_what_pyproject_allows():
    """deploy/requirements.txt pins every runtime dependency, within pyproject's ranges,
    and the Dockerfile installs fruitdask on top of exactly those."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "deploy" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            [spec] = list(req.specifier)
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    docker = (REPO / "deploy" / "Dockerfile").read_text()
    assert "COPY deploy/requirements.txt" in docker
    assert "pip install -r /tmp/requirements.txt" in docker
    assert "pip install --no-deps ." in docker
    instructions = [x.split()[0] for x in docker.splitlines() if x and not x.startswith("#")]
    assert "ENTRYPOINT" not in instructions  # dask-cloudprovider appends its own command
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text()
    for copied in ("fruitdask/**", "spark_parity/**", "pyproject.toml", "deploy/requirements.txt"):
        assert f"!{copied}" in ignore


# ---------------------------------------------------------------- the real thing
class _Registry(http.server.BaseHTTPRequestHandler):
    """A Docker registry's two calls, as ghcr.io answers them: a manifest HEAD
    that asks for an anonymous bearer token, and the token endpoint."""

    tags: set = set()

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/token"):
            self._send(200, json.dumps({"token": "anonymous-pull"}).encode())
        else:
            self.do_HEAD()

    def do_HEAD(self):
        host = f"127.0.0.1:{self.server.server_address[1]}"
        if self.headers.get("Authorization") != "Bearer anonymous-pull":
            challenge = f'Bearer realm="http://{host}/token",service="fake",scope="pull"'
            self._send(401, headers={"WWW-Authenticate": challenge})
            return
        tag = self.path.rsplit("/manifests/", 1)[-1]
        self._send(200 if tag in self.tags else 404)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _registry(*tags: str):
    handler = type("Registry", (_Registry,), {"tags": set(tags)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_image_check_against_a_registry():
    """The default image's tag is asked of its registry (anonymous token flow)
    before anything is created; a private registry is not asked."""
    from fruitdask.aws.ec2 import _image_ref, image_exists

    assert _image_ref("ghcr.io/dask/dask:2026.8.0-py3.11") == (
        "ghcr.io", "dask/dask", "2026.8.0-py3.11")  # fmt: skip
    assert _image_ref("python:3.11") == ("registry-1.docker.io", "library/python", "3.11")
    assert _image_ref("127.0.0.1:5000/a/b") == ("127.0.0.1:5000", "a/b", "latest")
    with _registry("1.0-py3.11") as host:
        assert image_exists(f"{host}/dask/dask:1.0-py3.11") is True
        assert image_exists(f"{host}/dask/dask:9.9-py3.11") is False
    assert image_exists("123456789012.dkr.ecr.us-east-1.amazonaws.com/fruitdask:1") is None


def _reference(root: Path):
    from fruitdask import features, io

    rows, descs = {}, collections.Counter()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name.lower().endswith(io.IMAGE_EXTENSIONS):
            f = features.extract(p.read_bytes())
            rel = p.relative_to(root).as_posix()
            rows[rel] = (f.status, len(f.descriptors))
            descs.update((rel, d.tobytes()) for d in f.descriptors)
    return rows, descs


def _decode_inherited(user_data: str) -> dict:
    import re

    import dask.config

    [blob] = re.findall(r'DASK_INTERNAL_INHERIT_CONFIG="?([A-Za-z0-9_=-]+)', user_data)
    return dask.config.deserialize(blob)


@pytest.mark.s3
@pytest.mark.timeout(600)
def test_ec2_cluster_runs_the_job(aws, ec2, ami, sample_dir, tmp_path, s3):
    """The whole EC2 path against moto, with the instances as local processes
    that share nothing with this machine but loopback: each runs in its own
    working directory and HOME, in its own environment without fruitdask,
    gets fruitdask the way a stock Dask image does (the staged wheel, fetched
    from S3 at start), and reads and writes only S3 (SeaweedFS)."""
    import dask

    from fruitdask.testing import committed_tables

    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/fruits")
    version = f"{dask.__version__}-py{sys.version_info.major}.{sys.version_info.minor}"
    scenarios = [
        {"name": "job", "case": f"job-{tmp_path.name}", "output": f"{bucket}/out"},
        {
            "name": "interrupt",
            "case": f"int-{tmp_path.name}",
            "output": f"{bucket}/o2",
            "image": IMAGE,
        },  # fmt: skip
        {
            "name": "bad-worker",
            "case": f"bad-{tmp_path.name}",
            "output": f"{bucket}/o3",
            "image": IMAGE,
            "args": ["--worker-instance-type", "c6i.notatype"],
        },
        {
            "name": "no-image",
            "case": f"noimg-{tmp_path.name}",
            "output": f"{bucket}/o4",
            "tag": "py0.0",
        },  # fmt: skip
    ]
    report = tmp_path / "report.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    groups_before = _groups(ec2)
    with _registry(version) as registry:
        params = {"input": f"{bucket}/fruits", "ami": ami, "scenarios": scenarios,
                  "registry": registry, "s3": s3.storage_options}  # fmt: skip
        proc = subprocess.run(
            [sys.executable, __file__, "child", str(report), json.dumps(params)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=560,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = {r["name"]: r for r in json.loads(report.read_text())}

    # No process of any scenario outlives it.
    import psutil

    for r in results.values():
        for vm in r["vms"]:
            assert not psutil.pid_exists(vm["pid"]) or (
                psutil.Process(vm["pid"]).status() == psutil.STATUS_ZOMBIE
            ), vm
        assert r["alive_after"] == [], r

    # ---- the job: complete on S3, equal to direct kernel calls
    job = results["job"]
    assert job["rc"] == 0, job["stderr"][-3000:] + _logs(job)
    assert "Dask dashboard: http://127.0.0.1:" in job["stderr"]
    snap = committed_tables(f"{bucket}/out", s3.storage_options)
    assert snap is not None, "no complete result on S3"
    ref_rows, ref_desc = _reference(sample_dir)
    got = {}
    for t in snap["tables"]["images"]:
        for r in t.select(["path", "status", "n_keypoints"]).to_pylist():
            got[r["path"]] = (r["status"], r["n_keypoints"])
    assert got == ref_rows
    desc = collections.Counter(
        (r["path"], r["descriptor"])
        for t in snap["tables"]["descriptors"]
        for r in t.select(["path", "descriptor"]).to_pylist()
    )
    assert desc == ref_desc
    assert sum(t.num_rows for t in snap["tables"]["features"]) == sum(desc.values())
    manifest = snap["manifest"]
    assert {k: manifest["cluster"][k] for k in ("workers", "threads")} == {
        "workers": 2, "threads": 2}  # fmt: skip
    usage = manifest["cluster"]["usage"]
    assert usage["instances"] == {"m5.large": 1, "c6i.xlarge": 2}
    assert usage["instance_hours"] > 0 and usage["estimated_usd"] > 0
    # nothing was written on this machine: not in the client's folder, not in
    # any instance's working directory or HOME
    assert not (tmp_path / "out").exists()
    for vm in job["vms"]:
        written = [p for p in Path(vm["cwd"]).rglob("*") if p.is_file()]
        assert written == [], written
    # the wheel is staged once, where the instances fetched it from
    from fruitdask import io

    wheel = job["wheel_url"]
    assert wheel.startswith(f"{bucket}/fruitdask-staging/wheels/fruitdask-")
    assert io.exists(wheel, s3.storage_options)

    # What EC2 was asked for: one scheduler, two workers, all terminated now.
    instances = _instances(ec2, "case", job["case"])
    by_type = collections.Counter(i["InstanceType"] for i in instances)
    assert by_type == {"m5.large": 1, "c6i.xlarge": 2}
    assert {i["State"]["Name"] for i in instances} == {"terminated"}
    run_id = _tags(instances[0])["fruitdask-run"]
    for i in instances:
        tags = _tags(i)
        assert tags["fruitdask-run"] == run_id and tags["created-by"] == "fruitdask"
        assert i["ImageId"] == ami
    for vm in job["vms"]:
        assert vm["groups"] == [job["group"]["GroupId"]]
        assert _tags({"Tags": vm["volume_tags"]})["fruitdask-run"] == run_id
        assert vm["profile"].endswith(f":instance-profile/{PROFILE}")

    # The security group as EC2 held it while the cluster ran; deleted since.
    group = job["group"]
    assert _tags(group)["fruitdask-run"] == run_id
    perms = sorted(group["IpPermissions"], key=lambda p: (p["IpProtocol"], p.get("FromPort", 0)))
    assert [(p["IpProtocol"], p.get("FromPort")) for p in perms] == [
        ("-1", None),
        *sorted(("tcp", job["ports"][k]) for k in ("scheduler", "dashboard")),
    ]
    assert [g["GroupId"] for g in perms[0]["UserIdGroupPairs"]] == [group["GroupId"]]
    assert perms[0]["IpRanges"] == []
    for p in perms[1:]:
        assert [r["CidrIp"] for r in p["IpRanges"]] == [CALLER] and p["Ipv6Ranges"] == []
    assert _groups(ec2, run_id) == []

    # The user data, decoded: the stock image, fruitdask's install, the Dask
    # commands, TLS, no AWS keys, under EC2's 16 KB.
    from fruitdask.aws.stage import pinned_packages
    from fruitdask.aws.testing import FAKE_KEY_ID, FAKE_SECRET

    roles = collections.Counter(vm["role"] for vm in job["vms"])
    assert roles == {"scheduler": 1, "worker": 2}
    for vm in job["vms"]:
        text = vm["user_data"]
        assert text.startswith("#cloud-config") and len(text.encode()) <= 16384
        assert FAKE_KEY_ID not in text and FAKE_SECRET not in text
        assert "AWS_SECRET" not in text.upper() and "AWS_ACCESS_KEY" not in text.upper()
        assert vm["image"] == f"{params['registry']}/dask/dask:{version}"
        assert vm["command"][:2] == ["sh", "/opt/fruitdask/start.sh"]
        assert vm["command"][2] == "env"
        assert vm["command"][3].startswith("DASK_INTERNAL_INHERIT_CONFIG=")
        assert "shutdown -h now" in text  # the instance ends when Dask does
        inherited = json.dumps(_decode_inherited(text))
        assert FAKE_KEY_ID not in inherited and FAKE_SECRET not in inherited
        assert '"require-encryption": true' in inherited and "BEGIN PRIVATE KEY" in inherited
        assert vm["env"] == {
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "EXTRA_PIP_PACKAGES": " ".join(pinned_packages()),
            "FRUITDASK_WHEEL": wheel,
        }
        assert vm["mounts"] == ["/opt/fruitdask:/opt/fruitdask:ro"]
        cmd = shlex.join(vm["command"])
        if vm["role"] == "scheduler":
            assert "-m distributed.cli.dask_scheduler" in cmd
            assert "--idle-timeout 30m" in cmd and f"--port {job['ports']['scheduler']}" in cmd
        else:
            assert "-m distributed.cli.dask_spec" in cmd
            assert f"tls://127.0.0.1:{job['ports']['scheduler']}" in cmd
            spec = json.loads(vm["command"][vm["command"].index("--spec") + 1])
            assert spec["cls"] == "dask.distributed.Nanny"
            assert spec["opts"]["death_timeout"] == "120s" and spec["opts"]["nthreads"] == 1
        # its own folders, and fruitdask only from the wheel it installed
        assert vm["cwd"] != vm["home"] and str(tmp_path) in vm["cwd"]
        where = f"fruitdask installed from the wheel: {vm['vm_dir']}/venv/lib/"
        assert where in vm["log"], vm["log"][-2000:]

    # ---- Ctrl-C in the middle of the job, a SIGTERM during the teardown:
    # exit 130, everything terminated and deleted all the same.
    r = results["interrupt"]
    assert r["rc"] == 130 and "stopped by SIGINT" in r["stderr"], r["stderr"][-2000:]
    assert "a further signal does not skip it" in r["stderr"], r["stderr"][-2000:]
    assert r["workers_seen"] == 2
    instances = _instances(ec2, "case", r["case"])
    assert len(instances) == 3 and {i["State"]["Name"] for i in instances} == {"terminated"}
    assert _groups(ec2, _tags(instances[0])["fruitdask-run"]) == []

    # ---- a worker type EC2 refuses: one line, exit 2, the scheduler terminated.
    r = results["bad-worker"]
    assert r["rc"] == 2
    [line] = r["stderr"].strip().splitlines()[-1:]
    assert line.startswith("fruitdask: error: ") and "c6i.notatype" in line, r["stderr"]
    instances = _instances(ec2, "case", r["case"])
    assert [i["InstanceType"] for i in instances] == ["m5.large"]
    assert instances[0]["State"]["Name"] == "terminated"
    assert _groups(ec2, _tags(instances[0])["fruitdask-run"]) == []
    assert committed_tables(f"{bucket}/o3", s3.storage_options) is None

    # ---- an image its registry does not have: one line, nothing created.
    r = results["no-image"]
    assert r["rc"] == 2 and r["vms"] == []
    [line] = r["stderr"].strip().splitlines()[-1:]
    assert "does not exist in its registry" in line and "--image" in line, r["stderr"]
    assert _instances(ec2, "case", r["case"]) == []
    assert {g["GroupId"] for g in _groups(ec2)} == {g["GroupId"] for g in groups_before}


def _logs(result: dict) -> str:
    return "".join(f"\n--- {vm['role']} {vm['instance_id']}\n{vm['log'][-1500:]}"
                   for vm in result.get("vms", []))  # fmt: skip


# ---------------------------------------------------------------- the child
def _user_data(text: str) -> dict:
    """What cloud-init would run: the host commands before Docker's, and the
    ``docker run`` line taken apart (image, -e variables, -v mounts, command)."""
    import yaml

    doc = yaml.safe_load(text)
    runcmd = [c for c in doc["runcmd"] if isinstance(c, str)]
    [line] = [c for c in runcmd if c.startswith("docker run")]
    tokens = shlex.split(line)
    env, mounts, j = {}, [], 2
    while tokens[j].startswith("-"):
        if tokens[j] == "-e":
            k, v = tokens[j + 1].split("=", 1)
            env[k] = v
            j += 2
        elif tokens[j] == "-v":
            mounts.append(tokens[j + 1])
            j += 2
        else:  # --net=host
            j += 1
    return {"host": runcmd[: runcmd.index(line)], "image": tokens[j], "env": env,
            "mounts": mounts, "command": tokens[j + 1 :]}  # fmt: skip


# The stock Dask image's entrypoint (dask-docker base/prepare.sh): install
# EXTRA_PIP_PACKAGES, then run the command. Offline, --no-index: every pin must
# be satisfied by the client's own environment, that is, be its exact versions.
_PREPARE = """set -e
if [ -n "${EXTRA_PIP_PACKAGES:-}" ]; then
  python -m pip install --no-index --quiet --disable-pip-version-check $EXTRA_PIP_PACKAGES
fi
exec "$@"
"""
# After start.sh's install, before Dask: where fruitdask comes from.
_WHERE = "import fruitdask, sys; print('fruitdask installed from the wheel:', fruitdask.__file__)"


def _boot(vm_dir: Path, ud: dict, image_has_fruitdask: bool, instance_env: dict) -> tuple:
    """A machine of its own: a venv without fruitdask (unless the image has it),
    its own working directory, HOME and temp folder; the host's start-up
    commands, then the container's command, with /opt/fruitdask mapped."""
    import base64
    import re

    from fruitdask.aws.ec2 import HOST_DIR

    for sub in ("cwd", "home", "tmp", "opt"):
        (vm_dir / sub).mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(vm_dir / "venv")], check=True)  # fmt: skip
    for cmd in ud["host"]:  # the others install Docker, which this "VM" has
        m = re.fullmatch(rf"mkdir -p {HOST_DIR} && echo (\S+) \| base64 -d > {HOST_DIR}/(\S+)", cmd)
        if m:
            (vm_dir / "opt" / m.group(2)).write_bytes(base64.b64decode(m.group(1)))
    command = [c.replace(HOST_DIR, str(vm_dir / "opt")) for c in ud["command"]]
    if command[:1] == ["sh"]:  # show where fruitdask was imported from, then go on
        script = vm_dir / "opt" / "start.sh"
        text = script.read_text().replace('exec "$@"', f'python -c "{_WHERE}"\nexec "$@"')
        script.write_text(text)
    env = {
        "PATH": str(vm_dir / "venv" / "bin") + os.pathsep + "/usr/bin:/bin",
        "HOME": str(vm_dir / "home"),
        "TMPDIR": str(vm_dir / "tmp"),
        **instance_env,
        **ud["env"],
    }
    if image_has_fruitdask:
        env["PYTHONPATH"] = str(REPO)
    return ["sh", "-c", _PREPARE, "prepare", *command], env


def _child(report_path: str, params_json: str) -> None:  # pragma: no cover - subprocess
    import asyncio
    import contextlib
    import io as _io
    import signal
    import time

    import boto3
    import dask.config
    from dask_cloudprovider.aws import ec2 as dcp

    import fruitdask.aws.ec2 as fec2
    from fruitdask import pipeline
    from fruitdask.cli import main
    from fruitdask.testing import free_port

    params = json.loads(params_json)
    workdir = Path(report_path).parent
    so = params["s3"]
    client = boto3.client("ec2")
    orig_create, orig_destroy = dcp.EC2Instance.create_vm, dcp.EC2Instance.destroy_vm
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    state: dict = {}
    # What an instance profile and the region's S3 endpoint give a real instance.
    instance_env = {
        "AWS_ACCESS_KEY_ID": so["key"],
        "AWS_SECRET_ACCESS_KEY": so["secret"],
        "AWS_ENDPOINT_URL_S3": so["endpoint_url"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }

    async def create_vm(self):
        await orig_create(self)  # RunInstances, tags, addresses: all in moto
        iid = self.instance["InstanceId"]
        blob = client.describe_instance_attribute(InstanceId=iid, Attribute="userData")
        text = base64.b64decode(blob["UserData"]["Value"]).decode()
        ud = _user_data(text)
        [described] = client.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"]
        volumes = client.describe_volumes(
            Filters=[{"Name": "attachment.instance-id", "Values": [iid]}]
        )["Volumes"]
        vm_dir = workdir / "vms" / iid
        loop = asyncio.get_running_loop()
        command, env = await loop.run_in_executor(
            None, _boot, vm_dir, ud, state["image_has_fruitdask"], instance_env
        )
        logs[iid] = vm_dir / "console.log"
        with open(logs[iid], "wb") as log:
            # "The VM boots": the command from its user data, as a local process.
            proc = subprocess.Popen(command, env=env, cwd=vm_dir / "cwd", stdout=log,
                                    stderr=subprocess.STDOUT)  # fmt: skip
        procs[iid] = proc
        state["vms"].append(
            {
                "instance_id": iid,
                "role": "scheduler" if isinstance(self, dcp.EC2Scheduler) else "worker",
                "user_data": text,
                "command": ud["command"],
                "env": ud["env"],
                "mounts": ud["mounts"],
                "image": ud["image"],
                "pid": proc.pid,
                "vm_dir": str(vm_dir),
                "cwd": str(vm_dir / "cwd"),
                "home": str(vm_dir / "home"),
                "volume_tags": volumes[0].get("Tags", []) if volumes else [],
                # while it runs: EC2 drops the profile association on termination
                "profile": described.get("IamInstanceProfile", {}).get("Arn"),
                "groups": [
                    g["GroupId"] for n in described["NetworkInterfaces"] for g in n["Groups"]
                ],
            }
        )
        return "127.0.0.1", None

    def stop(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    async def destroy_vm(self):
        await orig_destroy(self)  # TerminateInstances in moto
        proc = procs.get(self.instance["InstanceId"])
        if proc is not None:  # "the VM is gone"
            await asyncio.get_running_loop().run_in_executor(None, stop, proc)

    dcp.EC2Instance.create_vm = create_vm
    dcp.EC2Instance.destroy_vm = destroy_vm

    real_group = fec2.create_security_group

    def spy_group(ec2_client, **kw):
        group_id = real_group(ec2_client, **kw)
        [g] = ec2_client.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
        state["group"] = g
        return group_id

    fec2.create_security_group = spy_group

    real_run = pipeline.run
    real_listing = fec2.run_instances_by_tag

    def interrupted_run(cfg, client, progress=None, stop=None, *args, **kw):
        # Ctrl-C for real: the signal reaches the CLI's handler, which records
        # it; the run stops at its next check.
        client.wait_for_workers(2, timeout=60)
        state["workers_seen"] = len(client.scheduler_info()["workers"])
        os.kill(os.getpid(), signal.SIGINT)
        tick = threading.Event()
        for _ in range(1200):  # the handler runs between bytecodes of the main thread
            if stop.requested:
                break
            tick.wait(0.05)
        stop.check()
        raise AssertionError("the stop was not noticed")

    def listing_then_sigterm(ec2_client, run_id, states=None):
        # the teardown's first call: a second signal arrives in the middle of it
        if states is not None and not state.get("second_signal"):
            state["second_signal"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return real_listing(ec2_client, run_id, states)

    results = []
    for sc in params["scenarios"]:
        state.clear()
        state["vms"] = []
        state["image_has_fruitdask"] = "image" in sc
        ports = {"scheduler": free_port(), "dashboard": free_port()}
        interrupt = sc["name"] == "interrupt"
        pipeline.run = interrupted_run if interrupt else real_run
        fec2.run_instances_by_tag = listing_then_sigterm if interrupt else real_listing
        argv = [
            "run",
            "--cluster",
            "ec2",
            "--input",
            params["input"],
            "--output",
            sc["output"],
            "--endpoint-url",
            so["endpoint_url"],
            "--storage-option",
            f"key={so['key']}",
            "--storage-option",
            f"secret={so['secret']}",
            "--partition-size",
            "20",
            "--workers",
            "2",
            "--threads-per-worker",
            "1",
            "--region",
            "us-east-1",
            "--ami",
            params["ami"],
            "--instance-profile",
            PROFILE,
            "--allow-cidr",
            CALLER,
            "--tag",
            f"case={sc['case']}",
            *(["--image", sc["image"]] if "image" in sc else []),
            *sc.get("args", []),
        ]
        tag = sc.get("tag", "{dask}-py{python}")
        settings = {
            "fruitdask.aws.ec2.scheduler-port": ports["scheduler"],
            "fruitdask.aws.ec2.dashboard-port": ports["dashboard"],
            "fruitdask.aws.ec2.bind-host": "127.0.0.1",
            "fruitdask.aws.ec2.start-timeout": "180s",
            "fruitdask.aws.ec2.teardown-timeout": 30,
            "fruitdask.aws.ec2.default-image": f"{params['registry']}/dask/dask:{tag}",
        }
        out, err = _io.StringIO(), _io.StringIO()
        t = time.perf_counter()
        with (
            dask.config.set(settings),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            rc = main(argv)
            from fruitdask.aws.stage import wheel_name

            wheel_url = (
                f"{params['input'].rsplit('/', 1)[0]}/fruitdask-staging/wheels/{wheel_name()}"
            )
        alive = [iid for iid, p in procs.items() if p.poll() is None]
        for p in procs.values():
            stop(p)
        procs.clear()
        for vm in state["vms"]:
            vm["log"] = logs[vm["instance_id"]].read_text(errors="replace")
        results.append(
            {
                **sc,
                "rc": rc,
                "stdout": out.getvalue(),
                "stderr": err.getvalue(),
                "seconds": round(time.perf_counter() - t, 1),
                "ports": ports,
                "alive_after": alive,
                "wheel_url": wheel_url,
                **state,
            }
        )
    Path(report_path).write_text(json.dumps(results))


if __name__ == "__main__":  # pragma: no cover - run by test_ec2_cluster_runs_the_job
    if sys.argv[1:2] == ["child"]:
        _child(sys.argv[2], sys.argv[3])
