"""A Dask cluster on EC2 through dask-cloudprovider, locked down and always torn down.

What :func:`ec2_cluster` adds to ``dask_cloudprovider.aws.EC2Cluster``:

- **its own security group**, created per run: the scheduler and dashboard ports
  open only to ``--allow-cidr`` (default: the caller's public address /32), all
  traffic allowed inside the group (scheduler <-> workers), nothing else. This
  also sidesteps dask-cloudprovider#481 (creating its default group fails) and
  that group's 0.0.0.0/0 rule;
- workers reach the scheduler on its **private** address: an AWS rule that
  references a group does not match traffic sent to a public address;
- TLS (``security=True``, temporary certificates), a scheduler **idle timeout**
  and a worker death timeout, so a forgotten cluster shuts its instances down
  (they terminate on shutdown);
- **no AWS keys in user data**: S3 access comes from the instance profile, and
  every rendered user data is checked for the caller's credentials before it is
  sent;
- **tags on everything** (instances, volumes, the group), with a per-run tag that
  the teardown also uses to find stragglers;
- a start-up timeout (dask-cloudprovider waits for the scheduler forever);
- **teardown always**: ``cluster.close()``, then terminate whatever still carries
  the run tag, wait, and delete the group, on success, error, Ctrl-C and SIGTERM.

:func:`describe_plan` prints what would be created, without calling AWS.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fruitdask.aws import RUN_TAG, AwsError, aws_config, install_hint, parse_tags
from fruitdask.aws.plan import PlanError, PriceTable, parse_duration

__all__ = [
    "HOST_DIR",
    "Ec2Settings",
    "bucket_region",
    "caller_cidr",
    "check_cidr",
    "check_credentials",
    "check_image",
    "check_user_data",
    "cluster_kwargs",
    "create_security_group",
    "default_image",
    "default_staging",
    "describe_plan",
    "ec2_cluster",
    "image_exists",
    "install_plan",
    "instance_ended",
    "is_public",
    "latest_ami",
    "preflight",
    "run_instances_by_tag",
    "security_group_rules",
    "settings_from_spec",
    "teardown",
    "translate",
]

logger = logging.getLogger(__name__)

# EC2 refuses user data over 16 KB. dask-cloudprovider's TLS material travels in
# it: measured with dask-cloudprovider 2025.9.0, a worker's user data was 14,471
# bytes, 13,116 of them the base64 Dask configuration carrying the certificates
# and key; so an oversized one is reported before the call.
USER_DATA_LIMIT = 16384
# Broader than this is "the internet" for practical purposes.
_MIN_PREFIX = {4: 8, 6: 16}
# One thread pool per worker thread is enough: BLAS/OpenMP pools inside each task
# would oversubscribe the cores (the same reason as fruitdask.cluster's local one).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_KEY_NAMES = re.compile(r"aws_secret_access_key|aws_session_token", re.IGNORECASE)


@dataclass(frozen=True)
class Ec2Settings:
    """Everything one EC2 cluster needs, validated; built by :func:`settings_from_spec`."""

    image: str
    region: str | None = None
    workers: int = 2
    scheduler_instance_type: str = "m5.large"
    worker_instance_type: str = "c6i.xlarge"
    ami: str | None = None
    ami_name: str = "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*"
    ami_owner: str = "099720109477"
    bootstrap: bool = True
    instance_profile: str | None = None
    allow_cidrs: tuple[str, ...] = ()  # empty = the caller's /32, looked up at start
    spot: bool = False
    subnet_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    threads_per_worker: int | None = None
    memory_limit: str | None = None
    filesystem_size: int = 40
    scheduler_port: int = 8786
    dashboard_port: int = 8787
    bind_host: str | None = None
    idle_timeout: str = "30m"
    death_timeout: str = "120s"
    start_timeout_s: float = 900.0
    teardown_timeout_s: float = 300.0
    ip_lookup_url: str = "https://checkip.amazonaws.com"
    ip_lookup_timeout_s: float = 5.0
    #: True when ``image`` is the stock Dask image and fruitdask is installed
    #: into it at start (the staged wheel + pinned packages); False for an
    #: image that has fruitdask already (``--image``).
    install: bool = False
    #: Where the wheel is staged (a folder URL the instances can read).
    staging: str | None = None
    #: The run's input and output URLs and their storage options (the CLI's).
    data: dict[str, Any] = field(default_factory=dict)
    #: Ask the image's registry whether the tag exists before starting anything.
    image_check: bool = True

    @property
    def ecr(self) -> bool:
        """The image is in a (private) Amazon ECR registry."""
        return bool(_ECR.match(self.image))

    @property
    def wheel_url(self) -> str | None:
        from fruitdask.aws.stage import wheel_name

        if not (self.install and self.staging):
            return None
        return f"{self.staging.rstrip('/')}/wheels/{wheel_name()}"


_ECR = re.compile(r"^\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/")


def default_image() -> str:
    """The official Dask image at this machine's dask version and Python minor
    (``fruitdask.aws.ec2.default-image``, a template with {dask} and {python})."""
    import dask

    template = str(aws_config("ec2.default-image"))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return template.format(dask=dask.__version__, python=python)


def default_staging(output: str | None) -> str | None:
    """``<scheme>://<bucket>/fruitdask-staging`` beside the output, or None."""
    if not output or "://" not in output:
        return None
    scheme, rest = output.split("://", 1)
    bucket = rest.split("/", 1)[0]
    return f"{scheme}://{bucket}/fruitdask-staging" if bucket else None


def check_cidr(text: str) -> str:
    """Validate an ``--allow-cidr`` value; return it normalised (a bare IP becomes /32).

    Raises
    ------
    AwsError
        Not a network, or one so broad that it opens the cluster to the internet
        (0.0.0.0/0 and anything broader than /8; ::/0 and broader than /16).
    """
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise AwsError(f"--allow-cidr {text!r} is not an address or network") from None
    if net.prefixlen < _MIN_PREFIX[net.version]:
        raise AwsError(
            f"--allow-cidr {text} would open the scheduler and dashboard to "
            f"{net.num_addresses:.3g} addresses; give your own address or network "
            f"(at least /{_MIN_PREFIX[net.version]})"
        )
    return str(net)


def settings_from_spec(spec) -> Ec2Settings:
    """Settings from a :class:`~fruitdask.cluster.ClusterSpec`: ``spec.extra``'s ``ec2_*``
    values (the command line), then dask.config ``fruitdask.aws.ec2.*``.

    Raises
    ------
    AwsError
        A missing or invalid setting.
    """
    x = dict(spec.extra)

    def pick(key: str, conf: str) -> Any:
        return aws_config(f"ec2.{conf}", x.get(f"ec2_{key}"))

    image = pick("image", "image")
    install = not image
    data = dict(x.get("ec2_data") or {})
    staging = pick("staging", "staging") or default_staging(data.get("output"))
    if staging and "://" not in str(staging):
        raise AwsError(f"--staging {staging}: must be a URL the instances can read (s3://...)")
    cidrs = tuple(check_cidr(c) for c in (x.get("ec2_allow_cidr") or []))
    workers = spec.workers if spec.workers is not None else int(pick("workers", "workers"))
    try:
        start_timeout = parse_duration(aws_config("ec2.start-timeout"))
        for name in ("idle-timeout", "death-timeout"):
            parse_duration(pick(name.replace("-", "_"), name))
    except PlanError as exc:
        raise AwsError(str(exc)) from None
    return Ec2Settings(
        image=str(image or default_image()),
        install=install,
        staging=str(staging) if staging else None,
        data=data,
        image_check=bool(aws_config("ec2.image-check")),
        region=aws_config("region", x.get("ec2_region")),
        workers=workers,
        scheduler_instance_type=pick("scheduler_instance_type", "scheduler-instance-type"),
        worker_instance_type=pick("worker_instance_type", "worker-instance-type"),
        ami=pick("ami", "ami"),
        ami_name=aws_config("ec2.ami-name"),
        ami_owner=str(aws_config("ec2.ami-owner")),
        bootstrap=False if x.get("ec2_no_bootstrap") else bool(aws_config("ec2.bootstrap")),
        instance_profile=pick("instance_profile", "instance-profile"),
        allow_cidrs=cidrs,
        spot=bool(x.get("ec2_spot")),
        subnet_id=pick("subnet_id", "subnet-id"),
        tags=parse_tags(x.get("ec2_tag"), aws_config("tags")),
        threads_per_worker=spec.threads_per_worker,
        memory_limit=spec.memory_limit,
        filesystem_size=int(aws_config("ec2.filesystem-size")),
        scheduler_port=int(aws_config("ec2.scheduler-port")),
        dashboard_port=int(aws_config("ec2.dashboard-port")),
        bind_host=aws_config("ec2.bind-host"),
        idle_timeout=str(pick("idle_timeout", "idle-timeout")),
        death_timeout=str(aws_config("ec2.death-timeout")),
        start_timeout_s=float(start_timeout or 900),
        teardown_timeout_s=float(aws_config("ec2.teardown-timeout")),
        ip_lookup_url=str(aws_config("ec2.ip-lookup-url")),
        ip_lookup_timeout_s=float(aws_config("ec2.ip-lookup-timeout")),
    )


# ---------------------------------------------------------------- caller address
def caller_cidr(
    url: str = "https://checkip.amazonaws.com",
    timeout: float = 5.0,
    fetch: Callable[[str, float], str] | None = None,
) -> str:
    """The caller's public address as a /32 (or /128), from an IP echo service.

    ``fetch(url, timeout) -> str`` replaces the HTTP call (tests, proxies).

    Raises
    ------
    AwsError
        The lookup failed or answered something that is not an address: the
        user must pass ``--allow-cidr``.
    """
    if fetch is None:
        fetch = _http_get
    try:
        text = fetch(url, timeout).strip()
        addr = ipaddress.ip_address(text)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise AwsError(
            f"cannot determine your public IP address from {url} ({reason}); pass "
            "--allow-cidr YOUR.ADDRESS/32 (the scheduler is never opened to 0.0.0.0/0)"
        ) from None
    return f"{addr}/{addr.max_prefixlen}"


def _http_get(url: str, timeout: float) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read(100).decode("ascii", "replace")


def security_group_rules(
    cidrs: tuple[str, ...] | list[str], group_id: str, scheduler_port: int, dashboard_port: int
) -> list[dict[str, Any]]:
    """``IpPermissions`` for our group: two ports from ``cidrs``, everything within the group."""

    def ranges(desc: str) -> dict[str, Any]:
        v4 = [c for c in cidrs if ipaddress.ip_network(c).version == 4]
        v6 = [c for c in cidrs if ipaddress.ip_network(c).version == 6]
        out: dict[str, Any] = {}
        if v4:
            out["IpRanges"] = [{"CidrIp": c, "Description": desc} for c in v4]
        if v6:
            out["Ipv6Ranges"] = [{"CidrIpv6": c, "Description": desc} for c in v6]
        return out

    return [
        {
            "IpProtocol": "tcp",
            "FromPort": scheduler_port,
            "ToPort": scheduler_port,
            **ranges("Dask scheduler (TLS), caller only"),
        },
        {
            "IpProtocol": "tcp",
            "FromPort": dashboard_port,
            "ToPort": dashboard_port,
            **ranges("Dask dashboard, caller only"),
        },
        {
            "IpProtocol": "-1",
            "UserIdGroupPairs": [
                {"GroupId": group_id, "Description": "scheduler <-> workers, inside the group"}
            ],
        },
    ]


# ---------------------------------------------------------------- user data guard
def check_user_data(text: str, secrets: tuple[str, ...] = ()) -> None:
    """Refuse user data that carries AWS credentials or exceeds EC2's 16 KB.

    The inherited Dask configuration inside it (``DASK_INTERNAL_INHERIT_CONFIG``,
    base64) is decoded and checked too: a credential set in dask.config would
    otherwise travel to every instance unseen.

    Raises
    ------
    AwsError
    """
    import dask.config

    size = len(text.encode())
    if size > USER_DATA_LIMIT:
        raise AwsError(
            f"instance user data is {size:,} bytes, over EC2's {USER_DATA_LIMIT:,}: "
            "drop custom dask configuration or environment variables"
        )
    texts = [text]
    for blob in re.findall(r'DASK_INTERNAL_INHERIT_CONFIG="?([A-Za-z0-9_=-]+)', text):
        with contextlib.suppress(ValueError):
            texts.append(json.dumps(dask.config.deserialize(blob)))
    for t in texts:
        leaked = [s for s in secrets if len(s) >= 16 and s in t]
        if leaked or _KEY_ID.search(t) or _KEY_NAMES.search(t):
            raise AwsError(
                "refusing to start: AWS credentials would be copied into the instances' "
                "user data (dask config or environment variables); the instances get "
                "theirs from --instance-profile"
            )


def _caller_secrets(session) -> tuple[str, ...]:
    creds = session.get_credentials()
    if creds is None:
        return ()
    frozen = creds.get_frozen_credentials()
    return tuple(s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s)


# ---------------------------------------------------------------- dask-cloudprovider
async def _destroy_if_created(vm, base) -> None:
    # dask-cloudprovider terminates ``self.instance["InstanceId"]`` even when
    # RunInstances failed (instance None): the TypeError then hides the real
    # error and leaves the cluster half-closed.
    if vm.instance is not None:
        await base.destroy_vm(vm)


#: Where the instance keeps fruitdask's start-up script (mounted into the container).
HOST_DIR = "/opt/fruitdask"
# Run inside the container by the image's entrypoint after it pip-installed
# EXTRA_PIP_PACKAGES (the pinned dependencies, s3fs among them): fetch the staged
# wheel with the instance profile's credentials, install it, then start Dask.
_START_SCRIPT = """set -eu
d=${TMPDIR:-/tmp}/fruitdask-wheel
w=$d/${FRUITDASK_WHEEL##*/}
mkdir -p $d
python -c 'import sys,fsspec;fs,p=fsspec.core.url_to_fs(sys.argv[1]);fs.get(p,sys.argv[2])' "$FRUITDASK_WHEEL" "$w"
python -m pip install --quiet --no-deps --disable-pip-version-check "$w"
exec "$@"
"""
# The Amazon ECR credential helper (Ubuntu's package): docker pulls from a
# private ECR registry with the instance profile's credentials.
_ECR_BOOTSTRAP = (
    "apt-get install -y -q amazon-ecr-credential-helper",
    'mkdir -p /root/.docker && echo \'{"credsStore": "ecr-login"}\' > /root/.docker/config.json',
)


def install_plan(s: Ec2Settings) -> dict[str, Any]:
    """How the instances get the image and fruitdask: ``env_vars``,
    ``docker_args``, ``extra_bootstrap`` (host commands before ``docker run``)
    and ``prefix`` (put before Dask's command inside the container)."""
    env = dict(WORKER_ENV)
    bootstrap: list[str] = []
    if s.ecr:
        bootstrap += _ECR_BOOTSTRAP
    plan: dict[str, Any] = {"env_vars": env, "docker_args": "", "prefix": ""}
    if s.install:
        from fruitdask.aws.stage import pinned_packages

        if not s.wheel_url:
            raise AwsError(
                "--staging is required: an s3:// folder the instances can read, where "
                "fruitdask's wheel is staged (default: beside the output)"
            )
        script = base64.b64encode(_START_SCRIPT.encode()).decode()
        bootstrap += [f"mkdir -p {HOST_DIR} && echo {script} | base64 -d > {HOST_DIR}/start.sh"]
        env["EXTRA_PIP_PACKAGES"] = " ".join(pinned_packages())
        env["FRUITDASK_WHEEL"] = s.wheel_url
        plan["docker_args"] = f"-v {HOST_DIR}:{HOST_DIR}:ro"
        plan["prefix"] = f"sh {HOST_DIR}/start.sh"
    # cloud-init's YAML takes each as a double-quoted scalar (JSON's quoting)
    plan["extra_bootstrap"] = [json.dumps(c) for c in bootstrap] or None
    return plan


def _cluster_classes():
    """Subclasses of dask-cloudprovider's classes (imported lazily: fruitdask[aws])."""
    from dask_cloudprovider.aws.ec2 import EC2Scheduler, EC2Worker

    class Scheduler(EC2Scheduler):
        async def configure_vm(self, client):
            await super().configure_vm(client)  # tags; waits for the public address
            # Workers get ``address`` (private: the in-group rule matches it); the
            # client gets ``external_address`` (public, open to --allow-cidr only).
            return self.instance["PrivateIpAddress"], self.instance.get("PublicIpAddress")

        async def wait_for_scheduler(self):
            """dask-cloudprovider's wait, bounded, stoppable, and cut short when
            the instance has ended (its container exited: a bad image or install)."""
            return await _bounded_wait(self, super().wait_for_scheduler())

        async def destroy_vm(self):
            await _destroy_if_created(self, EC2Scheduler)

    class Worker(EC2Worker):
        async def destroy_vm(self):
            await _destroy_if_created(self, EC2Worker)

    return _cluster_class(Scheduler, Worker)


async def _bounded_wait(scheduler, wait: Coroutine[Any, Any, Any]) -> Any:
    """Await ``wait`` (dask-cloudprovider's wait for ``scheduler``) within the
    cluster's start timeout, checking its stop token, and looking every 15 s
    whether the instance has ended."""
    cluster = scheduler.cluster
    loop = asyncio.get_running_loop()
    timeout = cluster.fruitdask_start_timeout
    deadline = loop.time() + timeout
    waiting = asyncio.ensure_future(wait)
    next_look = loop.time() + 15
    try:
        while not waiting.done():
            cluster.fruitdask_check_stop()
            if loop.time() >= deadline:
                raise AwsError(
                    f"the scheduler instance {scheduler.instance['InstanceId']} did not "
                    f"open port {scheduler.port} within {timeout:.0f}s (first boot installs "
                    "Docker, pulls the image and installs fruitdask; its console log "
                    "shows why: aws ec2 get-console-output --instance-id "
                    f"{scheduler.instance['InstanceId']})"
                )
            if loop.time() >= next_look:
                next_look = loop.time() + 15
                ended = await loop.run_in_executor(
                    None, cluster.fruitdask_ended, scheduler.instance["InstanceId"]
                )
                if ended:
                    raise AwsError(ended)
            await asyncio.wait({waiting}, timeout=0.5)
        return waiting.result()
    finally:
        if not waiting.done():
            waiting.cancel()


def _cluster_class(scheduler_class: type, worker_class: type):
    """dask-cloudprovider's ``EC2Cluster`` with these scheduler and worker
    classes, a start timeout, a stop token, and user data checked for secrets."""
    from dask_cloudprovider.aws.ec2 import EC2Cluster

    class Cluster(EC2Cluster):
        def __init__(
            self,
            *,
            holder: list,
            start_timeout: float,
            secrets: tuple[str, ...],
            prefix: str = "",
            stop=None,
            ec2=None,
            usage: Callable[[], dict[str, Any]] | None = None,
            **kwargs: Any,
        ) -> None:
            # Registered before anything starts, so the caller can close a cluster
            # whose construction was interrupted (Ctrl-C while instances boot).
            holder.append(self)
            self.fruitdask_start_timeout = start_timeout
            self.fruitdask_secrets = secrets
            self.fruitdask_prefix = prefix
            self.fruitdask_stop = stop
            self.fruitdask_ec2 = ec2
            if usage is not None:
                self.fruitdask_usage = usage
            super().__init__(**kwargs)

        def fruitdask_check_stop(self) -> None:
            if self.fruitdask_stop is not None:
                self.fruitdask_stop.check()

        def fruitdask_ended(self, instance_id: str) -> str | None:
            """Why ``instance_id`` is no longer running, or None while it is."""
            if self.fruitdask_ec2 is None:
                return None
            return instance_ended(self.fruitdask_ec2, instance_id)

        async def _start(self):
            self.scheduler_class = scheduler_class
            self.worker_class = worker_class
            await super()._start()

        def render_process_cloud_init(self, process):
            command = process.command
            if self.fruitdask_prefix:
                command = f"{self.fruitdask_prefix} {command}"
            text = self.render_cloud_init(
                image=process.docker_image,
                command=command,
                docker_args=process.docker_args,
                extra_bootstrap=process.extra_bootstrap,
                gpu_instance=process.gpu_instance,
                bootstrap=process.bootstrap,
                auto_shutdown=process.auto_shutdown,
                env_vars=process.env_vars,
            )
            check_user_data(text, self.fruitdask_secrets)
            return text

    return Cluster


def instance_ended(ec2, instance_id: str) -> str | None:
    """One line on why an instance stopped running before Dask started (with the
    tail of its console output when EC2 has it), or None while it runs."""
    try:
        [r] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        state = r["Instances"][0]["State"]["Name"]
    except Exception:  # noqa: BLE001 - a failed look is no verdict
        return None
    if state in ("pending", "running"):
        return None
    tail = ""
    with contextlib.suppress(Exception):
        out = ec2.get_console_output(InstanceId=instance_id, Latest=True).get("Output") or ""
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        if lines:
            tail = f"; the last line of its console: {lines[-1][:200]}"
    return (
        f"the scheduler instance {instance_id} is {state} before Dask started: its container "
        f"exited (image not pulled, or fruitdask not installed){tail}"
    )


def cluster_kwargs(
    s: Ec2Settings, *, ami: str, vpc: str, subnet: str, group_id: str, tags: dict[str, str]
) -> dict[str, Any]:
    """Keyword arguments for ``EC2Cluster`` (no AWS call); ``prefix`` is ours."""
    bind = s.bind_host
    scheduler_options: dict[str, Any] = {
        "port": s.scheduler_port,
        "dashboard_address": f"{bind or ''}:{s.dashboard_port}",
        "idle_timeout": s.idle_timeout,
    }
    worker_options: dict[str, Any] = {"death_timeout": s.death_timeout}
    if bind:
        scheduler_options["host"] = bind
        worker_options["host"] = bind
    if s.threads_per_worker:
        worker_options["nthreads"] = s.threads_per_worker
    if s.memory_limit:
        worker_options["memory_limit"] = s.memory_limit
    profile = None
    if s.instance_profile:
        key = "Arn" if s.instance_profile.startswith("arn:") else "Name"
        profile = {key: s.instance_profile}
    install = install_plan(s)
    return {
        "region": s.region,
        "ami": ami,
        "bootstrap": s.bootstrap,
        "auto_shutdown": True,  # the instance shuts down (= terminates) when Dask exits
        "docker_image": s.image,
        "docker_args": install["docker_args"],
        "extra_bootstrap": install["extra_bootstrap"],
        "prefix": install["prefix"],
        "scheduler_instance_type": s.scheduler_instance_type,
        "worker_instance_type": s.worker_instance_type,
        "vpc": vpc,
        "subnet_id": subnet,
        "security_groups": [group_id],
        "filesystem_size": s.filesystem_size,
        "iam_instance_profile": profile,
        "instance_tags": tags,
        "volume_tags": tags,
        "use_private_ip": False,
        "n_workers": s.workers,
        "spot": s.spot,
        "security": True,
        "env_vars": install["env_vars"],
        "scheduler_options": scheduler_options,
        "worker_options": worker_options,
        "silence_logs": logging.ERROR,
    }


# ---------------------------------------------------------------- AWS resources
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # "Cluster failed to start: An error occurred (X) when calling Y: msg"
    return text.splitlines()[0]


def translate(exc: BaseException, action: str) -> AwsError:
    """One clear line for a failed AWS call (credentials, region, API errors)."""
    name = type(exc).__name__
    if name == "NoCredentialsError":
        return AwsError(
            f"{action}: no AWS credentials (configure a profile, AWS_PROFILE or the "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY variables)"
        )
    if name == "NoRegionError":
        return AwsError(f"{action}: no AWS region: pass --region or set AWS_DEFAULT_REGION")
    if isinstance(exc, AwsError):
        return exc
    return AwsError(f"{action}: {_one_line(exc)}")


def new_run_id() -> str:
    """A per-run id for tags and names: UTC time plus randomness."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _network(ec2, subnet_id: str | None) -> tuple[str, str]:
    if subnet_id:
        [subnet] = ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
        return subnet["VpcId"], subnet_id
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise AwsError("the region has no default VPC: pass --subnet-id")
    vpc = vpcs[0]["VpcId"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    if not subnets:
        raise AwsError(f"the default VPC {vpc} has no subnet: pass --subnet-id")
    subnets.sort(key=lambda sn: (not sn.get("DefaultForAz", False), sn["AvailabilityZone"]))
    return vpc, subnets[0]["SubnetId"]


def latest_ami(ec2, name_glob: str, owner: str) -> str:
    """The newest available AMI named like ``name_glob`` owned by ``owner``."""
    images = ec2.describe_images(
        Owners=[owner],
        Filters=[
            {"Name": "name", "Values": [name_glob]},
            {"Name": "state", "Values": ["available"]},
        ],
    )["Images"]
    if not images:
        raise AwsError(f"no AMI named {name_glob} from owner {owner} in this region: pass --ami")
    return max(images, key=lambda i: (i.get("CreationDate", ""), i["ImageId"]))["ImageId"]


def _aws_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def create_security_group(
    ec2,
    *,
    vpc: str,
    run_id: str,
    tags: Mapping[str, str],
    cidrs: tuple[str, ...],
    scheduler_port: int,
    dashboard_port: int,
) -> str:
    """Create and fill the run's security group; return its id."""
    group_id = ec2.create_security_group(
        GroupName=f"fruitdask-{run_id}",
        Description=f"fruitdask Dask cluster {run_id}: scheduler and dashboard from the caller",
        VpcId=vpc,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": _aws_tags(tags)}],
    )["GroupId"]
    try:
        ec2.authorize_security_group_ingress(
            GroupId=group_id,
            IpPermissions=security_group_rules(cidrs, group_id, scheduler_port, dashboard_port),
        )
    except BaseException:
        with contextlib.suppress(Exception):
            ec2.delete_security_group(GroupId=group_id)
        raise
    return group_id


_LIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]


def run_instances_by_tag(ec2, run_id: str, states: list[str] | None = None) -> list[str]:
    """Ids of the instances carrying ``fruitdask-run=run_id`` (in ``states``)."""
    filters = [{"Name": f"tag:{RUN_TAG}", "Values": [run_id]}]
    if states:
        filters.append({"Name": "instance-state-name", "Values": states})
    ids = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for r in page["Reservations"]:
            ids += [i["InstanceId"] for i in r["Instances"]]
    return sorted(ids)


def teardown(
    ec2,
    run_id: str,
    group_id: str | None,
    clusters: list | None = None,
    timeout: float = 300.0,
    sleep: Callable[[float], None] = time.sleep,
    close_timeout: float = 120.0,
    say: Callable[[str], None] | None = None,
) -> list[str]:
    """Close the cluster, terminate every instance of the run, delete the group.

    Every step runs even when an earlier one failed. In the main thread,
    SIGINT and SIGTERM are held while it runs (a second Ctrl-C must not skip
    the terminate and delete steps) and re-raised at the end. Returns the
    problems (empty when all is gone).
    """
    with _signals_held(say) as held:
        problems, interrupt = _teardown(ec2, run_id, group_id, clusters, timeout, sleep,
                                        close_timeout)  # fmt: skip
    if interrupt is None and held:
        interrupt = KeyboardInterrupt() if held[0] == signal.SIGINT else SystemExit(128 + held[0])
    if interrupt is not None:
        for p in problems:
            (say or _stderr)(f"fruitdask: teardown: {p}")
        raise interrupt
    return problems


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


@contextlib.contextmanager
def _signals_held(say: Callable[[str], None] | None) -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of obeying them (main thread only; elsewhere
    the CLI's supervisor already only records them)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    got: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        got.append(signum)
        (say or _stderr)("fruitdask: terminating the EC2 instances first; this signal is held")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _teardown(
    ec2,
    run_id: str,
    group_id: str | None,
    clusters: list | None,
    timeout: float,
    sleep: Callable[[float], None],
    close_timeout: float,
) -> tuple[list[str], BaseException | None]:
    problems: list[str] = []
    interrupt: BaseException | None = None

    def step(what: str, fn: Callable[[], Any], critical: bool = True) -> Any:
        nonlocal interrupt
        try:
            return fn()
        except (KeyboardInterrupt, SystemExit) as exc:
            interrupt = interrupt or exc
        except Exception as exc:  # noqa: BLE001 - reported, the next steps still run
            if critical:
                problems.append(f"{what}: {_one_line(exc)}")
            else:
                logger.warning("%s: %s", what, _one_line(exc))
        return None

    # Closing the cluster is the polite way; what matters is the sweep after it,
    # so a close that fails or times out is only a warning when the sweep works.
    for cluster in clusters or []:
        close = functools.partial(_close_cluster, cluster, close_timeout)
        step("closing the Dask cluster", close, critical=False)
    live = step("listing instances", lambda: run_instances_by_tag(ec2, run_id, _LIVE)) or []
    if live:
        step("terminating", lambda: ec2.terminate_instances(InstanceIds=live))
        delay = 5
        step(
            "waiting for termination",
            lambda: ec2.get_waiter("instance_terminated").wait(
                InstanceIds=live,
                WaiterConfig={"Delay": delay, "MaxAttempts": max(1, int(timeout // delay))},
            ),
        )
    if group_id:
        step("deleting the security group", lambda: _delete_group(ec2, group_id, timeout, sleep))
    if problems:
        problems.append(
            f"check for leftovers: aws ec2 describe-instances --filters "
            f"Name=tag:{RUN_TAG},Values={run_id}"
            + (f"; aws ec2 delete-security-group --group-id {group_id}" if group_id else "")
        )
    return problems, interrupt


def _close_cluster(cluster, timeout: float) -> None:
    from distributed.core import Status

    # A cluster whose construction failed has closed itself (or never started
    # its event loop): the sweep by tag below covers what it left.
    if getattr(cluster, "status", Status.closed) in (Status.closed, Status.failed):
        return
    if getattr(cluster, "_loop_runner", None) is None:
        return
    cluster.close(timeout=timeout)


def _delete_group(ec2, group_id: str, timeout: float, sleep: Callable[[float], None]) -> None:
    # Network interfaces of just-terminated instances hold the group for a while.
    deadline = time.monotonic() + timeout
    while True:
        try:
            ec2.delete_security_group(GroupId=group_id)
            return
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code == "InvalidGroup.NotFound":
                return
            if code != "DependencyViolation" or time.monotonic() > deadline:
                raise
            sleep(5)


# ---------------------------------------------------------------- before anything starts
def _has_keys(storage_options: Mapping[str, Any]) -> bool:
    return any(storage_options.get(k) for k in ("key", "secret", "token", "profile"))


def _anonymous(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    so = {
        k: v for k, v in storage_options.items() if k not in ("key", "secret", "token", "profile")
    }
    so["anon"] = True
    return so


def is_public(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether anyone may list ``url`` (one anonymous listing call)."""
    from fruitdask import io
    from fruitdask.errors import FruitdaskError

    try:
        io.ls(url, _anonymous(storage_options or {}))
    except FruitdaskError:
        return False
    return True


def check_credentials(s: Ec2Settings) -> None:
    """Refuse a run whose instances would have no credentials for what they
    must read or write on S3 (no ``--instance-profile``).

    Raises
    ------
    AwsError
        One line naming the fix (``fruitdask aws iam``).
    """
    from fruitdask import io

    if s.instance_profile:
        return
    so = dict(s.data.get("storage_options") or {})
    if _has_keys(so):
        return  # explicit keys in the storage options travel with the tasks
    inp, out = s.data.get("input"), s.data.get("output")
    needs = []
    if inp and io.is_s3(inp) and not is_public(inp, so):
        needs.append(f"read the private input {inp}")
    if out and io.is_s3(out):
        needs.append(f"write {out}")
    if s.wheel_url and io.is_s3(s.wheel_url):
        needs.append(f"read fruitdask's wheel under {s.staging}")
    if needs:
        args = f" --input {inp} --output {out}" if inp and out else " --input URL --output URL"
        raise AwsError(
            f"no --instance-profile: the instances would have no AWS credentials to "
            f"{', '.join(needs)}; create a role for them once with `fruitdask aws iam{args}` "
            f"and pass --instance-profile {aws_config('iam.name')}"
        )


def bucket_region(url: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The region of an ``s3://`` URL's bucket (one HeadBucket), or None when
    the store does not say (a non-AWS endpoint) or the call fails."""
    from fruitdask import io

    if not io.is_s3(url):
        return None
    so = dict(storage_options or {})
    endpoint = so.get("endpoint_url") or (so.get("client_kwargs") or {}).get("endpoint_url")
    try:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=so.get("key"),
            aws_secret_access_key=so.get("secret"),
            aws_session_token=so.get("token"),
            config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}),
        )
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        try:
            meta = client.head_bucket(Bucket=bucket)["ResponseMetadata"]
        except Exception as exc:  # noqa: BLE001 - a 301/403 still names the region
            meta = getattr(exc, "response", {}).get("ResponseMetadata", {})
        return (meta.get("HTTPHeaders") or {}).get("x-amz-bucket-region")
    except Exception:  # noqa: BLE001 - no region known is not an error
        return None


def _image_ref(image: str) -> tuple[str, str, str]:
    """``(registry host, repository, tag or digest)`` of a Docker image reference."""
    name, ref = image, "latest"
    if "@" in name:
        name, ref = name.split("@", 1)
    else:
        head, sep, tail = name.rpartition(":")
        if sep and "/" not in tail:
            name, ref = head, tail
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first, rest, ref
    return "registry-1.docker.io", name if "/" in name else f"library/{name}", ref


_PUBLIC_REGISTRIES = ("ghcr.io", "registry-1.docker.io", "docker.io", "quay.io", "public.ecr.aws")


def image_exists(image: str, timeout: float = 10.0) -> bool | None:
    """Whether a public registry has ``image`` (Docker Registry HTTP API v2,
    anonymous token): True, False (the tag is not there), or None when it cannot
    tell (a private registry, no network). Loopback registries speak plain HTTP."""
    import urllib.error
    import urllib.parse
    import urllib.request

    host, repo, ref = _image_ref(image)
    loopback = host.split(":")[0] in ("127.0.0.1", "localhost", "[::1]")
    if host not in _PUBLIC_REGISTRIES and not loopback:
        return None
    base = f"{'http' if loopback else 'https'}://{host}/v2/{repo}/manifests/{ref}"
    accept = ", ".join((
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ))  # fmt: skip

    def head(headers: dict[str, str]) -> int:
        req = urllib.request.Request(base, method="HEAD", headers={"Accept": accept, **headers})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                head.challenge = exc.headers.get("WWW-Authenticate", "")  # type: ignore[attr-defined]
            return exc.code

    head.challenge = ""  # type: ignore[attr-defined]
    try:
        status = head({})
        if status == 401:
            params = dict(re.findall(r'(\w+)="([^"]*)"', head.challenge))  # type: ignore[attr-defined]
            realm = params.pop("realm", "")
            if not realm:
                return None
            token_url = realm + "?" + urllib.parse.urlencode(params)
            with urllib.request.urlopen(token_url, timeout=timeout) as r:
                doc = json.loads(r.read(65536))
            token = doc.get("token") or doc.get("access_token")
            status = head({"Authorization": f"Bearer {token}"})
    except (OSError, ValueError):
        return None
    if status == 200:
        return True
    if status == 404:
        return False
    return None


def check_image(s: Ec2Settings, say: Callable[[str], None]) -> None:
    """Refuse an image its registry says does not exist (the instances would
    wait out the start timeout for a scheduler that never starts)."""
    if not s.image_check:
        return
    found = image_exists(s.image)
    if found is False:
        what = "the official Dask image for this machine's dask and Python" if s.install else ""
        raise AwsError(
            f"image {s.image} does not exist in its registry{f' ({what})' if what else ''}: "
            "pass --image with one that does (the same dask, distributed and Python "
            "minor as this machine; deploy/README.md)"
        )
    if found is None and s.install:
        say(f"note: could not confirm that {s.image} exists; starting anyway")


def preflight(spec, say: Callable[[str], None] | None = None):
    """The checks :func:`ec2_cluster` makes before it creates anything, made
    earlier (before the output is locked); returns ``spec`` marked as checked."""
    from dataclasses import replace

    s = settings_from_spec(spec)
    check_credentials(s)
    check_image(s, say or _stderr)
    return replace(spec, extra={**spec.extra, "ec2_checked": True})


# ---------------------------------------------------------------- the cluster
@contextlib.contextmanager
def ec2_cluster(
    spec,
    *,
    lookup_ip: Callable[[], str] | None = None,
    stop=None,
    say: Callable[[str], None] | None = None,
) -> Iterator[Any]:
    """Start an ``EC2Cluster`` for ``spec``; tear everything down when the block exits.

    Before anything is created in the account: the caller's address, the
    instances' credentials (:func:`check_credentials`), the image
    (:func:`check_image`), and fruitdask's wheel staged for a stock image.

    Parameters
    ----------
    spec : fruitdask.config.ClusterSpec
        ``kind="ec2"``; ``workers`` is the number of worker instances; the
        ``ec2_*`` entries of ``spec.extra`` are the command-line options.
    lookup_ip : callable, optional
        Returns the caller's address when no ``--allow-cidr`` is given
        (default: :func:`caller_cidr` against ``fruitdask.aws.ec2.ip-lookup-url``).
    stop : fruitdask.cancel.StopToken, optional
        Checked while the instances boot; its supervisor waits for the teardown.
    say : callable, optional
        Where progress notes go (default: stderr).

    Yields
    ------
    dask_cloudprovider.aws.EC2Cluster
        Running, with ``spec.workers`` workers, TLS on; ``fruitdask_usage()``
        reports its instance-hours and estimated cost so far.

    Raises
    ------
    AwsError
        Bad settings, no credentials, or an AWS call failed (one line). Whatever
        was created is deleted before it propagates.
    """
    say = say or _stderr
    s = settings_from_spec(spec)
    try:
        import boto3

        cluster_cls = _cluster_classes()
    except ImportError as exc:
        raise install_hint(exc) from None

    cidrs = _allowed_cidrs(s, lookup_ip)
    region = _choose_region(s, say)
    if not spec.extra.get("ec2_checked"):
        check_credentials(s)
        check_image(s, say)
    _stage_wheel(s, say)
    run = _open_run(boto3, s, region)
    with _torn_down(run, s, stop, say):
        cluster = _start_cluster(cluster_cls, run, s, cidrs, stop, say)
        run.started = True
        # EC2Cluster returns once the worker *instances* exist; their Dask
        # workers connect minutes later. Wait, so the job partitions for the
        # real thread count and the manifest's per-core throughput is right.
        _wait_for_workers(cluster, s, stop)
        yield cluster


def _allowed_cidrs(s: Ec2Settings, lookup_ip: Callable[[], str] | None) -> tuple[str, ...]:
    """Who may reach the scheduler and dashboard: ``--allow-cidr``, else the
    caller's address (``lookup_ip``, else :func:`caller_cidr`)."""
    if s.allow_cidrs:
        return s.allow_cidrs
    found = lookup_ip() if lookup_ip else caller_cidr(s.ip_lookup_url, s.ip_lookup_timeout_s)
    return (check_cidr(found),)


def _stage_wheel(s: Ec2Settings, say: Callable[[str], None]) -> None:
    """Build this machine's fruitdask as a wheel and stage it where the
    instances fetch it (a stock image only; nothing is uploaded twice)."""
    if not (s.install and s.wheel_url):
        return
    from fruitdask.aws.stage import build_wheel, stage

    name, wheel = build_wheel()
    so = dict(s.data.get("storage_options") or {})
    if stage(s.wheel_url, wheel, so):
        say(f"staged {name} ({len(wheel) / 1e3:,.0f} kB) at {s.wheel_url}")


@dataclass
class _Ec2Run:
    """One run in the account: its id and tags, its EC2 client, and what it has
    created so far (what :func:`teardown` removes)."""

    run_id: str
    tags: dict[str, str]
    session: Any
    ec2: Any
    region: str | None
    #: The cluster registers itself here before it starts anything.
    clusters: list = field(default_factory=list)
    group_id: str | None = None
    #: The cluster object was built (its close gets its full time).
    started: bool = False


def _open_run(boto3: Any, s: Ec2Settings, region: str | None) -> _Ec2Run:
    """A new run id, its tags, and an EC2 client in ``region`` (boto's default
    when None); creates nothing."""
    run_id = new_run_id()
    tags = {**s.tags, RUN_TAG: run_id, "created-by": "fruitdask"}
    try:
        session = boto3.session.Session(region_name=region)
        ec2 = session.client("ec2")
        region = ec2.meta.region_name
    except Exception as exc:  # noqa: BLE001 - translated to one line
        raise translate(exc, "EC2") from None
    return _Ec2Run(run_id=run_id, tags=tags, session=session, ec2=ec2, region=region)


@contextlib.contextmanager
def _torn_down(run: _Ec2Run, s: Ec2Settings, stop, say: Callable[[str], None]) -> Iterator[None]:
    """Tear ``run`` down when the block exits, on success, error, Ctrl-C and
    SIGTERM, with ``stop``'s supervisor waiting for it. An incomplete teardown
    raises after a block that succeeded; after one that failed it is a note."""
    failed: BaseException | None = None
    note = f"terminating the EC2 instances of run {run.run_id} and deleting its security group"
    held = stop.holding(note) if stop is not None else contextlib.nullcontext()
    with held:
        try:
            yield
        except BaseException as exc:
            failed = exc
            raise
        finally:
            # A start interrupted half-way (Ctrl-C while instances boot) may not
            # close cleanly; the sweep by run tag after it guarantees the teardown.
            problems = teardown(
                run.ec2,
                run.run_id,
                run.group_id,
                run.clusters,
                s.teardown_timeout_s,
                close_timeout=120.0 if run.started else 30.0,
                say=say,
            )
            if problems:
                msg = "EC2 teardown incomplete: " + "; ".join(problems)
                if failed is None:
                    raise AwsError(msg)
                say(f"fruitdask: {msg}")


def _start_cluster(
    cluster_cls,
    run: _Ec2Run,
    s: Ec2Settings,
    cidrs: tuple[str, ...],
    stop,
    say: Callable[[str], None],
) -> Any:
    """Create the run's security group (recorded in ``run`` at once) and start
    the cluster in it; a failure is one line (a stop request raises as itself)."""
    try:
        vpc, subnet = _network(run.ec2, s.subnet_id)
        ami = s.ami or latest_ami(run.ec2, s.ami_name, s.ami_owner)
        run.group_id = group_id = create_security_group(
            run.ec2,
            vpc=vpc,
            run_id=run.run_id,
            tags=run.tags,
            cidrs=cidrs,
            scheduler_port=s.scheduler_port,
            dashboard_port=s.dashboard_port,
        )
        logger.info("run %s: security group %s in %s", run.run_id, group_id, vpc)
        kwargs = cluster_kwargs(
            s, ami=ami, vpc=vpc, subnet=subnet, group_id=group_id, tags=run.tags
        )
        kwargs["region"] = run.region
        say(
            f"starting {s.workers} x {s.worker_instance_type} + 1 x "
            f"{s.scheduler_instance_type} in {run.region} (run {run.run_id}); image {s.image}"
        )
        t0 = time.time()
        usage = functools.partial(_usage, s, run.region, t0)
        return cluster_cls(
            holder=run.clusters,
            start_timeout=s.start_timeout_s,
            secrets=_caller_secrets(run.session),
            stop=stop,
            ec2=run.ec2,
            usage=usage,
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - translated; the teardown follows
        if stop is not None and stop.requested:
            stop.check()
        raise translate(exc, "starting the EC2 cluster") from None


def _choose_region(s: Ec2Settings, say: Callable[[str], None]) -> str | None:
    """``--region``, else the input bucket's region, else boto's default; a
    note when the cluster and the data are in different regions."""
    inp = s.data.get("input")
    data_region = bucket_region(inp, s.data.get("storage_options")) if inp else None
    if s.region:
        if data_region and data_region != s.region:
            say(
                f"warning: the input bucket is in {data_region}, the cluster in {s.region}: "
                "reads cross regions (slower, and billed per GB); pass --region "
                f"{data_region} unless you mean it"
            )
        return s.region
    if data_region:
        return data_region
    return None


def _wait_for_workers(cluster, s: Ec2Settings, stop) -> None:
    deadline = time.monotonic() + s.start_timeout_s
    while True:
        if stop is not None:
            stop.check()
        try:
            cluster.wait_for_workers(s.workers, timeout=2)
            return
        except TimeoutError as exc:
            if time.monotonic() > deadline:
                raise AwsError(
                    f"the Dask workers did not all connect: {_one_line(exc)} (spot "
                    "capacity? the instances' console logs show why)"
                ) from None


def _usage(s: Ec2Settings, region: str | None, t0: float) -> dict[str, Any]:
    """Instance-hours so far and their estimated price (the cluster's
    ``fruitdask_usage``, recorded in the manifest at commit)."""
    from fruitdask.aws.plan import estimate_usage, instance_counts

    counts = instance_counts((s.scheduler_instance_type, 1), (s.worker_instance_type, s.workers))
    return estimate_usage(
        "ec2",
        region,
        counts,
        seconds=time.time() - t0,
        ebs_gb_each=s.filesystem_size,
        public_ipv4_each=1,
    )


# ---------------------------------------------------------------- dry run
def describe_plan(spec) -> str:
    """What :func:`ec2_cluster` would create for ``spec``, with $/hour; no AWS call.

    Raises
    ------
    AwsError
        The same setting errors as a real start.
    """
    from fruitdask.aws.plan import load_prices

    s = settings_from_spec(spec)
    region = s.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    prices = load_prices(region=region)

    def price(t: str) -> tuple[str, float | None]:
        inst = prices.instances.get(t)
        if inst is None:
            return "?", None
        return f"{inst.vcpu} vCPU {inst.memory_gib:g} GiB ${inst.usd_per_hour:.4f}/h", (
            inst.usd_per_hour
        )

    sd, sp = price(s.scheduler_instance_type)
    wd, wp = price(s.worker_instance_type)
    cidrs = ", ".join(s.allow_cidrs) or "your public address /32 (looked up at start)"
    default_region = "the input bucket's (looked up at start), else the AWS default"
    lines = [
        "EC2 plan (dry run: nothing created, no AWS call made)",
        f"region:         {region or default_region}",
        "instances:",
        f"  scheduler     1 x {s.scheduler_instance_type:<12} {sd}  on-demand",
        f"  workers       {s.workers} x {s.worker_instance_type:<12} {wd}  "
        + ("spot (one-time; price shown is on-demand, the ceiling)" if s.spot else "on-demand"),
        f"  AMI           {s.ami or f'newest {s.ami_name} from {s.ami_owner} (looked up at start)'}",
        f"  Docker        {'installed at boot by cloud-init' if s.bootstrap else 'in the AMI'}; "
        f"image {s.image} (docker run --net=host)",
        *_describe_install(s),
        f"  disk          {s.filesystem_size} GB gp3 each, deleted with the instance",
        "  credentials   "
        + (
            f"instance profile {s.instance_profile}; no AWS keys in user data"
            if s.instance_profile
            else "none (no --instance-profile): only public data can be read; a run that "
            "reads or writes private S3 is refused"
        ),
        "security group fruitdask-<run id> (created for this run, deleted at the end):",
        f"  tcp {s.scheduler_port:<5}  Dask scheduler (TLS)   from {cidrs}",
        f"  tcp {s.dashboard_port:<5}  Dask dashboard         from {cidrs}",
        "  all        scheduler <-> workers  from the group itself",
        "  egress     all (image pull, pip, S3)",
        "TLS:            on (temporary self-signed certificates, passed in user data)",
        f"idle timeout:   scheduler exits after {s.idle_timeout} without work, workers "
        f"{s.death_timeout} after losing it; instances terminate on shutdown",
        "version check:  at connect, Python minor, dask, distributed, cloudpickle, msgpack "
        "and fruitdask's files must match this machine's, or the run stops (one line)",
        "tags:           "
        + ", ".join(f"{k}={v}" for k, v in {**s.tags, RUN_TAG: "<run id>"}.items())
        + " (instances, volumes, security group)",
        _describe_cost(s, prices, sp, wp),
    ]
    if region and region != prices.region:
        lines.append(f"note: the price table has no {region}; prices shown are {prices.region}'s")
    return "\n".join(lines)


def _describe_cost(s: Ec2Settings, prices: PriceTable, sp: float | None, wp: float | None) -> str:
    """The plan's estimated $/hour, from the scheduler's and a worker's hourly
    prices (``sp``, ``wp``; None when the price table lacks the type)."""
    if sp is not None and wp is not None:
        n = 1 + s.workers
        extras = n * (s.filesystem_size * prices.ebs_gb_month / 730 + prices.ipv4_hour)
        total = sp + s.workers * wp + extras
        return (
            f"estimated cost: ${total:.3f}/hour (1 x ${sp:.4f} + {s.workers} x ${wp:.4f} "
            f"+ ${extras:.4f} EBS and public IPv4), {prices.region} on-demand as of "
            f"{prices.as_of}, billed per second"
        )
    missing = [
        t for t, p in ((s.scheduler_instance_type, sp), (s.worker_instance_type, wp)) if p is None
    ]
    return (
        f"estimated cost: unknown ({', '.join(missing)} not in the price table "
        f"as of {prices.as_of})"
    )


def _describe_install(s: Ec2Settings) -> list[str]:
    if not s.install:
        extra = "; the ECR credential helper is installed at boot" if s.ecr else ""
        return [f"  fruitdask     in the image (--image){extra}"]
    import dask

    from fruitdask.aws.stage import pinned_packages, wheel_name

    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    where = s.wheel_url or "<--staging>/wheels/" + wheel_name()
    return [
        f"                (the official Dask image at this machine's dask {dask.__version__} "
        f"and Python {py})",
        f"  fruitdask     {wheel_name()}: built from this machine's copy, staged to",
        f"                {where}, installed at container start",
        "                (pip --no-deps) after the image installs these pinned packages",
        f"                (EXTRA_PIP_PACKAGES): {' '.join(pinned_packages())}",
    ]
