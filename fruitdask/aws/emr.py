"""fruitdask on Amazon EMR: the API payloads, and the few calls that send them.

An EMR cluster for fruitdask is a plain EMR cluster (Hadoop + Spark) whose
bootstrap action (``deploy/emr/bootstrap.sh``) installs fruitdask in a venv on
every node and starts ``dask scheduler`` on the primary node and ``dask worker``
on the others. Then:

- the **Dask job** is a ``command-runner.jar`` step on the primary node:
  ``python -m fruitdask run --cluster tcp://127.0.0.1:8786 ...``;
- the **Spark parity job** is a ``spark-submit`` step running
  ``python -m spark_parity run --master yarn ...`` through a two-line launcher
  script, with its Python either the bootstrap's venv (default) or a packed venv
  archive shipped with ``--archives`` (``venv_archive``).

Payload builders are pure functions (``--dry-run`` prints their output); the
calls take a boto3 EMR client so tests can pass moto's or a Stubber's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fruitdask.aws import AwsError, aws_config, install_hint

__all__ = [
    "EmrSettings",
    "check_release",
    "StepResult",
    "add_steps",
    "create_cluster",
    "create_payload",
    "dask_step",
    "describe",
    "emr_client",
    "spark_step",
    "steps_payload",
    "terminate",
    "terminate_payload",
    "wait_for_step",
]

TERMINAL_STEP_STATES = ("COMPLETED", "CANCELLED", "FAILED", "INTERRUPTED")
LAUNCHER = "spark_parity_main.py"  # written by the bootstrap into PREFIX


@dataclass(frozen=True)
class EmrSettings:
    """One fruitdask EMR cluster (``run_job_flow``)."""

    bootstrap_uri: str
    package: str
    log_uri: str
    name: str = "fruitdask"
    release: str = "emr-7.9.0"
    primary_instance_type: str = "m5.xlarge"
    core_instance_type: str = "m5.xlarge"
    core_count: int = 2
    core_spot: bool = False
    idle_timeout_s: int = 3600
    service_role: str = "EMR_DefaultRole"
    instance_profile: str = "EMR_EC2_DefaultRole"
    subnet_id: str | None = None
    key_name: str | None = None
    constraints: str | None = None
    prefix: str = "/opt/fruitdask"
    scheduler_port: int = 8786
    dashboard_port: int = 8787
    tags: dict[str, str] = field(default_factory=dict)
    #: False: one-shot, the cluster terminates after its last step (``emr run``);
    #: True: it waits for more steps until idle for ``idle_timeout_s`` (``emr create``).
    keep_alive: bool = True

    def __post_init__(self) -> None:
        check_release(self.release)
        for name in ("bootstrap_uri", "log_uri"):
            value = getattr(self, name)
            if not str(value).startswith("s3://"):
                raise AwsError(
                    f"--{name.replace('_', '-')} must be an s3:// URL (EMR reads it), got {value!r}"
                )
        if not self.package:
            raise AwsError("--package is required: an s3:// wheel of fruitdask or a pip spec")
        if self.core_count < 1:
            raise AwsError(f"--core-count must be >= 1, got {self.core_count}")
        # EMR's limits for auto-termination: one minute to seven days.
        if not 60 <= self.idle_timeout_s <= 7 * 24 * 3600:
            raise AwsError(f"--idle-timeout must be 1m..7d, got {self.idle_timeout_s}s")


_RELEASE = re.compile(r"emr-(\d+)\.(\d+)\.(\d+)")


def check_release(label: str) -> None:
    """Accept the EMR releases the bootstrap works on: 7.x (Amazon Linux 2023,
    whose dnf has python3.11).

    Raises
    ------
    AwsError
        One line: not a release label, or a release whose OS has no Python 3.11
        (emr-6.x and older run Amazon Linux 2: Python 3.7, no 3.11 package).
    """
    m = _RELEASE.fullmatch(str(label))
    if not m:
        raise AwsError(f"--release {label!r}: not an EMR release label like emr-7.9.0")
    if int(m.group(1)) < 7:
        raise AwsError(
            f"--release {label}: EMR {m.group(1)}.x runs Amazon Linux 2, which has no Python "
            "3.11 for fruitdask (its own is 3.7); use emr-7.x (Amazon Linux 2023)"
        )


def _aws_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def bootstrap_args(s: EmrSettings) -> list[str]:
    """Arguments of ``deploy/emr/bootstrap.sh`` for these settings."""
    args = [
        "--package",
        s.package,
        "--prefix",
        s.prefix,
        "--scheduler-port",
        str(s.scheduler_port),
        "--dashboard-port",
        str(s.dashboard_port),
    ]
    if s.constraints:
        args += ["--constraints", s.constraints]
    # the Dask daemons' logs, copied to the cluster's log folder as they grow
    args += ["--log-uri", s.log_uri]
    return args


def create_payload(s: EmrSettings, steps: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The ``run_job_flow`` keyword arguments; with ``steps`` they run as soon as
    the cluster is up (and a one-shot cluster terminates after the last)."""
    instances: dict[str, Any] = {
        "InstanceGroups": [
            {
                "Name": "primary (Dask scheduler, Spark driver)",
                "InstanceRole": "MASTER",
                "Market": "ON_DEMAND",
                "InstanceType": s.primary_instance_type,
                "InstanceCount": 1,
            },
            {
                "Name": "core (Dask workers, Spark executors)",
                "InstanceRole": "CORE",
                "Market": "SPOT" if s.core_spot else "ON_DEMAND",
                "InstanceType": s.core_instance_type,
                "InstanceCount": s.core_count,
            },
        ],
        # Long-lived: alive between steps so `emr submit` can add more, and the
        # auto-termination policy below ends it once idle. One-shot: it ends
        # after its last step.
        "KeepJobFlowAliveWhenNoSteps": s.keep_alive,
        "TerminationProtected": False,
    }
    if s.subnet_id:
        instances["Ec2SubnetId"] = s.subnet_id
    if s.key_name:
        instances["Ec2KeyName"] = s.key_name
    payload: dict[str, Any] = {
        "Name": s.name,
        "ReleaseLabel": s.release,
        "LogUri": s.log_uri,
        "Applications": [{"Name": "Hadoop"}, {"Name": "Spark"}],
        "Instances": instances,
        "BootstrapActions": [
            {
                "Name": "fruitdask: install, start Dask scheduler/workers",
                "ScriptBootstrapAction": {"Path": s.bootstrap_uri, "Args": bootstrap_args(s)},
            }
        ],
        "AutoTerminationPolicy": {"IdleTimeout": int(s.idle_timeout_s)},
        "ServiceRole": s.service_role,
        "JobFlowRole": s.instance_profile,
        "VisibleToAllUsers": True,
        "StepConcurrencyLevel": 1,
        "Tags": _aws_tags({**s.tags, "created-by": "fruitdask"}),
    }
    if steps:
        payload["Steps"] = [dict(step) for step in steps]
    return payload


def _check_urls(input: str, output: str) -> None:
    for name, url in (("--input", input), ("--output", output)):
        if "://" not in url:
            raise AwsError(
                f"{name} {url!r} must be a URL every node can reach (s3://...), not a path "
                "on one node"
            )


def dask_step(
    input: str,
    output: str,
    job_args: Sequence[str] = (),
    *,
    prefix: str = "/opt/fruitdask",
    scheduler_port: int = 8786,
    name: str = "fruitdask: Dask job",
    action_on_failure: str = "CONTINUE",
    workers: int | None = None,
) -> dict[str, Any]:
    """The step that runs ``fruitdask run`` on the primary node against its
    scheduler (waiting for ``workers`` workers: the core nodes' start with it)."""
    _check_urls(input, output)
    wait = ["--workers", str(workers)] if workers else []
    args = [
        f"{prefix}/venv/bin/python",
        "-m",
        "fruitdask",
        "run",
        # The scheduler listens on every interface of the primary node; steps run there.
        "--cluster",
        f"tcp://127.0.0.1:{scheduler_port}",
        "--input",
        input,
        "--output",
        output,
        "--json",
        *wait,
        *job_args,
    ]
    return {
        "Name": name,
        "ActionOnFailure": action_on_failure,
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": args},
    }


def spark_step(
    input: str,
    output: str,
    job_args: Sequence[str] = (),
    *,
    prefix: str = "/opt/fruitdask",
    venv_archive: str | None = None,
    launcher_uri: str | None = None,
    native_s3: bool = True,
    name: str = "fruitdask: Spark parity job",
    action_on_failure: str = "CONTINUE",
) -> dict[str, Any]:
    """The ``spark-submit`` step running ``python -m spark_parity run`` on YARN.

    Without ``venv_archive``, driver (client mode, on the primary node) and
    executors use the venv the bootstrap built on every node. With it (an
    ``s3://`` venv-pack archive), YARN unpacks it in every container and the
    driver runs in the cluster (``launcher_uri``: the launcher on S3).
    """
    _check_urls(input, output)
    if venv_archive:
        if not (launcher_uri and launcher_uri.startswith("s3://")):
            raise AwsError(
                "--venv-archive needs --launcher-uri s3://.../spark_parity_main.py "
                "(deploy/emr/spark_parity_main.py uploaded next to it)"
            )
        py = "./environment/bin/python"
        submit = [
            "spark-submit",
            "--master",
            "yarn",
            "--deploy-mode",
            "cluster",
            "--archives",
            f"{venv_archive}#environment",
            "--conf",
            f"spark.yarn.appMasterEnv.PYSPARK_PYTHON={py}",
            "--conf",
            f"spark.executorEnv.PYSPARK_PYTHON={py}",
            launcher_uri,
        ]
    else:
        py = f"{prefix}/venv/bin/python"
        submit = [
            "spark-submit",
            "--master",
            "yarn",
            "--deploy-mode",
            "client",
            "--conf",
            f"spark.pyspark.python={py}",
            "--conf",
            f"spark.pyspark.driver.python={py}",
            f"{prefix}/{LAUNCHER}",
        ]
    job = ["run", "--master", "yarn", "--input", input, "--output", output, "--json"]
    if native_s3 and input.startswith("s3://"):
        job.append("--native-s3")  # EMRFS reads s3:// natively on EMR
    return {
        "Name": name,
        "ActionOnFailure": action_on_failure,
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": [*submit, *job, *job_args]},
    }


def steps_payload(cluster_id: str, steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``add_job_flow_steps`` keyword arguments."""
    return {"JobFlowId": cluster_id, "Steps": list(steps)}


def terminate_payload(cluster_id: str) -> dict[str, Any]:
    """The ``terminate_job_flows`` keyword arguments."""
    return {"JobFlowIds": [cluster_id]}


# ---------------------------------------------------------------- calls
def emr_client(region: str | None = None):
    """A boto3 EMR client (``region``, else ``fruitdask.aws.region``, else boto's default)."""
    try:
        import boto3
    except ImportError as exc:
        raise install_hint(exc) from None
    return boto3.client("emr", region_name=aws_config("region", region))


def _call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    from fruitdask.aws.ec2 import translate

    try:
        return fn(**kwargs)
    except AwsError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line at the boundary
        raise translate(exc, what) from None


def create_cluster(client, payload: Mapping[str, Any]) -> str:
    """``run_job_flow``; returns the cluster id."""
    return _call("EMR RunJobFlow", client.run_job_flow, **payload)["JobFlowId"]


def add_steps(client, payload: Mapping[str, Any]) -> list[str]:
    """``add_job_flow_steps``; returns the step ids in order."""
    return list(_call("EMR AddJobFlowSteps", client.add_job_flow_steps, **payload)["StepIds"])


def terminate(client, cluster_id: str) -> None:
    """``terminate_job_flows`` for one cluster."""
    _call("EMR TerminateJobFlows", client.terminate_job_flows, **terminate_payload(cluster_id))


def describe(client, cluster_id: str) -> dict[str, Any]:
    """The cluster's state, primary node address and steps, newest first."""
    c = _call("EMR DescribeCluster", client.describe_cluster, ClusterId=cluster_id)["Cluster"]
    steps = _call("EMR ListSteps", client.list_steps, ClusterId=cluster_id).get("Steps", [])
    status = c.get("Status", {})
    return {
        "id": c.get("Id", cluster_id),
        "name": c.get("Name"),
        "state": status.get("State"),
        "reason": (status.get("StateChangeReason") or {}).get("Message"),
        "primary": c.get("MasterPublicDnsName"),
        "release": c.get("ReleaseLabel"),
        "steps": [
            {
                "id": s["Id"],
                "name": s.get("Name"),
                "state": s.get("Status", {}).get("State"),
            }
            for s in steps
        ],
    }


@dataclass(frozen=True)
class StepResult:
    """A step's last observed state (``ok`` when it COMPLETED)."""

    step_id: str
    state: str
    reason: str | None = None
    log_file: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def wait_for_step(
    client,
    cluster_id: str,
    step_id: str,
    *,
    poll_s: float = 15.0,
    timeout_s: float | None = None,
    on_change: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> StepResult:
    """Poll ``describe_step`` until the step ends (or ``timeout_s`` passes).

    ``on_change(state)`` is called whenever the state changes. A step that ends
    other than COMPLETED is returned, not raised: its reason and log file are
    in the result.

    Raises
    ------
    AwsError
        An API error, or the timeout passed with the step still running.
    """
    t0 = clock()
    last = None
    while True:
        step = _call(
            "EMR DescribeStep", client.describe_step, ClusterId=cluster_id, StepId=step_id
        )["Step"]
        status = step.get("Status", {})
        state = status.get("State", "?")
        if state != last and on_change is not None:
            on_change(state)
        last = state
        if state in TERMINAL_STEP_STATES:
            failure = status.get("FailureDetails") or {}
            reason = failure.get("Message") or failure.get("Reason")
            if reason is None and state != "COMPLETED":
                reason = (status.get("StateChangeReason") or {}).get("Message")
            return StepResult(
                step_id=step_id,
                state=state,
                reason=reason,
                log_file=failure.get("LogFile"),
                seconds=clock() - t0,
            )
        if timeout_s is not None and clock() - t0 >= timeout_s:
            raise AwsError(
                f"step {step_id} of {cluster_id} still {state} after {timeout_s:.0f}s "
                f"(it keeps running: `python -m fruitdask emr status {cluster_id}`)"
            )
        sleep(poll_s)


# ---------------------------------------------------------------- logs
def ship_logs(src: str, dest: str) -> int:
    """Copy the ``*.log`` files of folder ``src`` to folder URL ``dest`` (the
    bootstrap runs this on every node, with the node's credentials); returns
    how many were copied."""
    import os

    from fruitdask import io

    n = 0
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.endswith(".log") and os.path.isfile(path):
            with open(path, "rb") as fh:
                io.write_bytes(io.join(dest, name), fh.read())
            n += 1
    return n


# ---------------------------------------------------------------- one shot
BOOTSTRAP_SCRIPT = "emr_bootstrap.sh"  # package data of fruitdask.aws


def staged_files(staging: str) -> dict[str, tuple[str, bytes]]:
    """What ``emr run`` uploads under ``staging`` before it creates the cluster:
    ``{"package"|"bootstrap"|"constraints": (url, bytes)}``, content-addressed
    names (a rerun with the same files uploads nothing)."""
    import hashlib
    import os

    from fruitdask.aws.stage import build_wheel, constraints

    base = staging.rstrip("/")
    name, wheel = build_wheel()
    with open(os.path.join(os.path.dirname(__file__), BOOTSTRAP_SCRIPT), "rb") as fh:
        script = fh.read()
    pins = constraints().encode()

    def tag(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:12]

    return {
        "package": (f"{base}/wheels/{name}", wheel),
        "bootstrap": (f"{base}/emr/bootstrap-{tag(script)}.sh", script),
        "constraints": (f"{base}/emr/constraints-{tag(pins)}.txt", pins),
    }


TERMINAL_CLUSTER_STATES = ("TERMINATED", "TERMINATED_WITH_ERRORS")


@dataclass
class Outcome:
    """How a one-shot cluster ended."""

    cluster_id: str
    state: str
    steps: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    failure: str | None = None
    log_file: str | None = None
    created: Any = None
    ended: Any = None

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(v == "COMPLETED" for v in self.steps.values())


def watch(
    client,
    cluster_id: str,
    *,
    poll_s: float = 15.0,
    timeout_s: float | None = None,
    on_event: Callable[[str], None] | None = None,
    check: Callable[[], None] | None = None,
    key_name: str | None = None,
    dashboard_port: int = 8787,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Follow a cluster until it terminates: its state, its steps' states, and
    (once the primary node has an address) how to reach the Dask dashboard.

    ``check`` is called between polls (a stop request raises there).

    Raises
    ------
    AwsError
        An API error, or ``timeout_s`` passed (the cluster is left as it is).
    """
    say = on_event or (lambda line: None)
    t0 = clock()
    last: dict[str, str] = {}
    hinted = False
    while True:
        if check is not None:
            check()
        c = _call("EMR DescribeCluster", client.describe_cluster, ClusterId=cluster_id)["Cluster"]
        status = c.get("Status", {})
        state = status.get("State", "?")
        if last.get(cluster_id) != state:
            say(f"cluster {cluster_id}: {state}")
            last[cluster_id] = state
        dns = c.get("MasterPublicDnsName")
        if dns and not hinted:
            hinted = True
            if key_name:
                say(
                    f"dashboard: ssh -i {key_name}.pem -N -L {dashboard_port}:localhost:"
                    f"{dashboard_port} hadoop@{dns}, then http://localhost:{dashboard_port} "
                    "(Spark's UI: -L 20888:localhost:20888)"
                )
            else:
                say(f"primary node {dns} (no --key-name: no SSH tunnel to its dashboard)")
        steps = _call("EMR ListSteps", client.list_steps, ClusterId=cluster_id).get("Steps", [])
        states = {}
        for st in reversed(steps):  # oldest first
            sid, sstate = st["Id"], st.get("Status", {}).get("State", "?")
            states[sid] = sstate
            if last.get(sid) != sstate:
                say(f"step {sid} ({st.get('Name', '')}): {sstate}")
                last[sid] = sstate
        if state in TERMINAL_CLUSTER_STATES:
            timeline = status.get("Timeline") or {}
            out = Outcome(
                cluster_id=cluster_id,
                state=state,
                steps=states,
                reason=(status.get("StateChangeReason") or {}).get("Message"),
                created=timeline.get("CreationDateTime"),
                ended=timeline.get("EndDateTime"),
            )
            failed = [sid for sid, v in states.items() if v != "COMPLETED"]
            if failed:
                step = _call(
                    "EMR DescribeStep", client.describe_step, ClusterId=cluster_id, StepId=failed[0]
                )["Step"]
                details = step.get("Status", {}).get("FailureDetails") or {}
                out.failure = details.get("Message") or details.get("Reason")
                out.log_file = details.get("LogFile")
            return out
        if timeout_s is not None and clock() - t0 >= timeout_s:
            raise AwsError(f"cluster {cluster_id} still {state} after {timeout_s:.0f}s")
        sleep(poll_s)
