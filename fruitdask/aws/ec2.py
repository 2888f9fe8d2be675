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
import contextlib
import functools
import ipaddress
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fruitdask.aws import RUN_TAG, AwsError, aws_config, install_hint, parse_tags
from fruitdask.aws.plan import PlanError, load_prices, parse_duration

__all__ = [
    "Ec2Settings",
    "caller_cidr",
    "check_cidr",
    "check_user_data",
    "cluster_kwargs",
    "create_security_group",
    "describe_plan",
    "ec2_cluster",
    "latest_ami",
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
    if not image:
        raise AwsError(
            "--image is required with --cluster ec2: a Docker image with fruitdask, built "
            "from deploy/Dockerfile and pushed where the instances can pull it "
            "(see deploy/README.md)"
        )
    cidrs = tuple(check_cidr(c) for c in (x.get("ec2_allow_cidr") or []))
    workers = spec.workers if spec.workers is not None else int(pick("workers", "workers"))
    try:
        start_timeout = parse_duration(aws_config("ec2.start-timeout"))
        for name in ("idle-timeout", "death-timeout"):
            parse_duration(pick(name.replace("-", "_"), name))
    except PlanError as exc:
        raise AwsError(str(exc)) from None
    return Ec2Settings(
        image=str(image),
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


def _cluster_classes():
    """Subclasses of dask-cloudprovider's classes (imported lazily: fruitdask[aws])."""
    from dask_cloudprovider.aws.ec2 import EC2Cluster, EC2Scheduler, EC2Worker

    class Scheduler(EC2Scheduler):
        async def configure_vm(self, client):
            await super().configure_vm(client)  # tags; waits for the public address
            # Workers get ``address`` (private: the in-group rule matches it); the
            # client gets ``external_address`` (public, open to --allow-cidr only).
            return self.instance["PrivateIpAddress"], self.instance.get("PublicIpAddress")

        async def wait_for_scheduler(self):
            timeout = self.cluster.fruitdask_start_timeout
            try:
                await asyncio.wait_for(super().wait_for_scheduler(), timeout)
            except TimeoutError:
                raise AwsError(
                    f"the scheduler instance {self.instance['InstanceId']} did not open "
                    f"port {self.port} within {timeout:.0f}s (first boot installs Docker "
                    "and pulls the image; its console log shows why)"
                ) from None

        async def destroy_vm(self):
            await _destroy_if_created(self, EC2Scheduler)

    class Worker(EC2Worker):
        async def destroy_vm(self):
            await _destroy_if_created(self, EC2Worker)

    class Cluster(EC2Cluster):
        def __init__(
            self,
            *,
            holder: list,
            start_timeout: float,
            secrets: tuple[str, ...],
            **kwargs: Any,
        ) -> None:
            # Registered before anything starts, so the caller can close a cluster
            # whose construction was interrupted (Ctrl-C while instances boot).
            holder.append(self)
            self.fruitdask_start_timeout = start_timeout
            self.fruitdask_secrets = secrets
            super().__init__(**kwargs)

        async def _start(self):
            self.scheduler_class = Scheduler
            self.worker_class = Worker
            await super()._start()

        def render_process_cloud_init(self, process):
            text = super().render_process_cloud_init(process)
            check_user_data(text, self.fruitdask_secrets)
            return text

    return Cluster


def cluster_kwargs(
    s: Ec2Settings, *, ami: str, vpc: str, subnet: str, group_id: str, tags: dict[str, str]
) -> dict[str, Any]:
    """Keyword arguments for ``EC2Cluster`` (no AWS call)."""
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
    return {
        "region": s.region,
        "ami": ami,
        "bootstrap": s.bootstrap,
        "auto_shutdown": True,  # the instance shuts down (= terminates) when Dask exits
        "docker_image": s.image,
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
        "env_vars": dict(WORKER_ENV),
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
) -> list[str]:
    """Close the cluster, terminate every instance of the run, delete the group.

    Every step runs even when an earlier one failed, and a Ctrl-C in the middle
    is held until the end. Returns the problems (empty when all is gone).
    """
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
    if interrupt is not None:
        for p in problems:
            print(f"fruitdask: teardown: {p}", file=sys.stderr)
        raise interrupt
    return problems


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


@contextlib.contextmanager
def ec2_cluster(spec, *, lookup_ip: Callable[[], str] | None = None) -> Iterator[Any]:
    """Start an ``EC2Cluster`` for ``spec``; tear everything down when the block exits.

    Parameters
    ----------
    spec : fruitdask.cluster.ClusterSpec
        ``kind="ec2"``; ``workers`` is the number of worker instances; the
        ``ec2_*`` entries of ``spec.extra`` are the command-line options.
    lookup_ip : callable, optional
        Returns the caller's address when no ``--allow-cidr`` is given
        (default: :func:`caller_cidr` against ``fruitdask.aws.ec2.ip-lookup-url``).

    Yields
    ------
    dask_cloudprovider.aws.EC2Cluster
        Running, with ``spec.workers`` workers, TLS on.

    Raises
    ------
    AwsError
        Bad settings, no credentials, or an AWS call failed (one line). Whatever
        was created is deleted before it propagates.
    """
    s = settings_from_spec(spec)
    try:
        import boto3

        cluster_cls = _cluster_classes()
    except ImportError as exc:
        raise install_hint(exc) from None

    if s.allow_cidrs:
        cidrs = s.allow_cidrs
    else:
        found = lookup_ip() if lookup_ip else caller_cidr(s.ip_lookup_url, s.ip_lookup_timeout_s)
        cidrs = (check_cidr(found),)
    run_id = new_run_id()
    tags = {**s.tags, RUN_TAG: run_id, "created-by": "fruitdask"}
    try:
        session = boto3.session.Session(region_name=s.region)
        ec2 = session.client("ec2")
        region = ec2.meta.region_name
    except Exception as exc:  # noqa: BLE001 - translated to one line
        raise translate(exc, "EC2") from None
    holder: list = []
    group_id: str | None = None
    failed: BaseException | None = None
    started = False
    try:
        try:
            vpc, subnet = _network(ec2, s.subnet_id)
            ami = s.ami or latest_ami(ec2, s.ami_name, s.ami_owner)
            group_id = create_security_group(
                ec2,
                vpc=vpc,
                run_id=run_id,
                tags=tags,
                cidrs=cidrs,
                scheduler_port=s.scheduler_port,
                dashboard_port=s.dashboard_port,
            )
            logger.info("run %s: security group %s in %s", run_id, group_id, vpc)
            kwargs = cluster_kwargs(
                s, ami=ami, vpc=vpc, subnet=subnet, group_id=group_id, tags=tags
            )
            kwargs["region"] = region
            cluster = cluster_cls(
                holder=holder,
                start_timeout=s.start_timeout_s,
                secrets=_caller_secrets(session),
                **kwargs,
            )
        except Exception as exc:  # noqa: BLE001 - translated; teardown below
            raise translate(exc, "starting the EC2 cluster") from None
        started = True
        # EC2Cluster returns once the worker *instances* exist; their Dask workers
        # connect minutes later. Wait, so the job partitions for the real thread
        # count and the manifest's per-core throughput is right.
        try:
            cluster.wait_for_workers(s.workers, timeout=s.start_timeout_s)
        except TimeoutError as exc:
            raise AwsError(
                f"the Dask workers did not all connect: {_one_line(exc)} (spot capacity? "
                "the instances' console logs show why)"
            ) from None
        yield cluster
    except BaseException as exc:
        failed = exc
        raise
    finally:
        # A start interrupted half-way (Ctrl-C while instances boot) may not close
        # cleanly; the sweep by run tag after it is what guarantees the teardown.
        problems = teardown(
            ec2,
            run_id,
            group_id,
            holder,
            s.teardown_timeout_s,
            close_timeout=120.0 if started else 30.0,
        )
        if problems:
            msg = "EC2 teardown incomplete: " + "; ".join(problems)
            if failed is None:
                raise AwsError(msg)
            print(f"fruitdask: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- dry run
def describe_plan(spec) -> str:
    """What :func:`ec2_cluster` would create for ``spec``, with $/hour; no AWS call.

    Raises
    ------
    AwsError
        The same setting errors as a real start.
    """
    s = settings_from_spec(spec)
    prices = load_prices()
    region = s.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")

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
    lines = [
        "EC2 plan (dry run: nothing created, no AWS call made)",
        f"region:         {region or 'the AWS default (AWS_DEFAULT_REGION or the profile)'}",
        "instances:",
        f"  scheduler     1 x {s.scheduler_instance_type:<12} {sd}  on-demand",
        f"  workers       {s.workers} x {s.worker_instance_type:<12} {wd}  "
        + ("spot (one-time; price shown is on-demand, the ceiling)" if s.spot else "on-demand"),
        f"  AMI           {s.ami or f'newest {s.ami_name} from {s.ami_owner} (looked up at start)'}",
        f"  Docker        {'installed at boot by cloud-init' if s.bootstrap else 'in the AMI'}; "
        f"image {s.image} (docker run --net=host)",
        f"  disk          {s.filesystem_size} GB gp3 each, deleted with the instance",
        "  credentials   "
        + (
            f"instance profile {s.instance_profile}; no AWS keys in user data"
            if s.instance_profile
            else "none: no instance profile, the workers can read only public data"
        ),
        "security group fruitdask-<run id> (created for this run, deleted at the end):",
        f"  tcp {s.scheduler_port:<5}  Dask scheduler (TLS)   from {cidrs}",
        f"  tcp {s.dashboard_port:<5}  Dask dashboard         from {cidrs}",
        "  all        scheduler <-> workers  from the group itself",
        "  egress     all (image pull, S3)",
        "TLS:            on (temporary self-signed certificates, passed in user data)",
        f"idle timeout:   scheduler exits after {s.idle_timeout} without work, workers "
        f"{s.death_timeout} after losing it; instances terminate on shutdown",
        "tags:           "
        + ", ".join(f"{k}={v}" for k, v in {**s.tags, RUN_TAG: "<run id>"}.items())
        + " (instances, volumes, security group)",
    ]
    if sp is not None and wp is not None:
        total = sp + s.workers * wp
        lines.append(
            f"estimated cost: ${total:.3f}/hour (1 x ${sp:.4f} + {s.workers} x ${wp:.4f}), "
            f"{prices.region} on-demand as of {prices.as_of}, billed per second"
        )
    else:
        missing = [
            t
            for t, p in ((s.scheduler_instance_type, sp), (s.worker_instance_type, wp))
            if p is None
        ]
        lines.append(
            f"estimated cost: unknown ({', '.join(missing)} not in the price table "
            f"as of {prices.as_of})"
        )
    if region and region != prices.region:
        lines.append(f"note: prices are {prices.region}'s; {region} may differ")
    return "\n".join(lines)
