"""``fruitdask run --cluster ec2 ...``, ``fruitdask emr ...``, ``fruitdask plan ...``.

Argument parsing and printing only; the work is in :mod:`fruitdask.aws`.
``register`` adds the ``emr`` and ``plan`` sub-commands, and the EC2 options
of ``run`` (dests prefixed ``ec2_``, handed to
:func:`fruitdask.aws.ec2.ec2_cluster` through ``ClusterSpec.extra``).
"""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

from fruitdask.cli._common import add_storage_arguments, positive, storage_options_from_args, term
from fruitdask.errors import InputError, JobError

__all__ = ["add_run_arguments", "register"]


def _d(key: str) -> str:
    """`` (default: X)`` from ``fruitdask/aws/aws.yaml`` (as overridden in
    dask.config): the one place the AWS defaults are written."""
    from fruitdask.aws import aws_config

    value = aws_config(key)
    return "" if value is None else f" (default: {value})".replace("%", "%%")


def add_run_arguments(run_parser: argparse.ArgumentParser) -> None:
    """The EC2 options of ``run`` (used with ``--cluster ec2``)."""
    g = run_parser.add_argument_group(
        "EC2 (with --cluster ec2; pip install fruitdask[aws]; deploy/README.md)"
    )
    _add_instance_arguments(g)
    _add_account_arguments(g)


def _add_instance_arguments(g) -> None:
    """Where the instances start, of which types, and what they run."""
    g.add_argument(
        "--region", dest="ec2_region", metavar="REGION", help="AWS region (default: boto's)"
    )
    g.add_argument(
        "--image",
        dest="ec2_image",
        metavar="IMAGE",
        help="a Docker image with fruitdask in it (deploy/Dockerfile; ECR works). Default: "
        "the official Dask image at this machine's dask and Python, with this machine's "
        "fruitdask installed at start",
    )
    g.add_argument(
        "--staging",
        dest="ec2_staging",
        metavar="URL",
        help="where fruitdask's wheel is staged for the instances (default: "
        "s3://<output bucket>/fruitdask-staging)",
    )
    g.add_argument(
        "--worker-instance-type",
        dest="ec2_worker_instance_type",
        metavar="TYPE",
        help=f"worker instance type{_d('ec2.worker-instance-type')}; --workers sets how many",
    )
    g.add_argument(
        "--scheduler-instance-type",
        dest="ec2_scheduler_instance_type",
        metavar="TYPE",
        help=f"scheduler instance type{_d('ec2.scheduler-instance-type')}",
    )
    g.add_argument(
        "--ami", dest="ec2_ami", metavar="AMI", help="AMI id (default: newest Ubuntu 22.04)"
    )
    g.add_argument(
        "--no-bootstrap",
        dest="ec2_no_bootstrap",
        action="store_true",
        help="the AMI already has Docker: skip installing it at boot",
    )


def _add_account_arguments(g) -> None:
    """How the cluster sits in the account: its credentials, who may reach it,
    spot, subnet, tags and idle timeout; and --dry-run."""
    g.add_argument(
        "--instance-profile",
        dest="ec2_instance_profile",
        metavar="NAME|ARN",
        help="IAM instance profile giving the instances S3 access (no keys are sent)",
    )
    g.add_argument(
        "--allow-cidr",
        dest="ec2_allow_cidr",
        action="append",
        metavar="CIDR",
        help="who may reach the scheduler and dashboard (repeatable; default: your "
        "public address /32; never 0.0.0.0/0)",
    )
    g.add_argument("--spot", dest="ec2_spot", action="store_true", help="workers on spot instances")
    g.add_argument(
        "--subnet-id",
        dest="ec2_subnet_id",
        metavar="SUBNET",
        help="subnet (default: default VPC's)",
    )
    g.add_argument(
        "--tag",
        dest="ec2_tag",
        action="append",
        metavar="KEY=VALUE",
        help="extra tag on everything created (repeatable)",
    )
    g.add_argument(
        "--idle-timeout",
        dest="ec2_idle_timeout",
        metavar="DURATION",
        help=f"the scheduler (and so the cluster) shuts down after this long idle{_d('ec2.idle-timeout')}",
    )
    g.add_argument(
        "--dry-run",
        dest="ec2_dry_run",
        action="store_true",
        help="print what would be created and its $/hour; call nothing",
    )


def register(subparsers) -> None:
    """Add the ``aws``, ``emr`` and ``plan`` sub-commands, and the EC2 options of ``run``."""
    add_run_arguments(subparsers.choices["run"])
    _register_plan(subparsers)
    _register_emr(subparsers)
    _register_aws(subparsers)


# ---------------------------------------------------------------- aws iam
def _register_aws(subparsers) -> None:
    a = subparsers.add_parser(
        "aws",
        help="set up an AWS account for fruitdask (the instances' IAM role)",
        description="One-time set-up in your AWS account.",
    )
    sub = a.add_subparsers(dest="aws_command", metavar="ACTION", parser_class=type(a))
    sub.required = True
    i = sub.add_parser(
        "iam",
        help="create or update the instances' least-privilege role and instance profile",
        description="Create (or bring up to date) an IAM role and an instance profile of "
        "the same name for the cluster's instances, EC2 or EMR: read the input prefix, "
        "read and write the output prefix, read the staging prefix (fruitdask's wheel, "
        "the EMR bootstrap) and write its logs/ folder; nothing else. Pass the name to "
        "--instance-profile. --dry-run prints the policy and calls nothing.",
    )
    i.add_argument("--input", "-i", required=True, metavar="S3_URL", help="the input prefix")
    i.add_argument("--output", "-o", required=True, action="append", metavar="S3_URL",
                   help="an output prefix (repeatable: the Dask job's, the Spark job's ...)")  # fmt: skip
    i.add_argument(
        "--staging",
        metavar="S3_URL",
        help="where fruitdask is staged (default: s3://<output bucket>/fruitdask-staging)",
    )
    i.add_argument("--image", help="an ECR image the instances pull (adds pull rights on it)")
    i.add_argument("--name", help="role and instance profile name (fruitdask-cluster)")
    i.add_argument("--tag", action="append", metavar="KEY=VALUE", help="(repeatable)")
    i.add_argument("--dry-run", action="store_true", help="print the policy as JSON; call nothing")
    i.set_defaults(func=cmd_aws_iam)


def cmd_aws_iam(args: argparse.Namespace) -> int:
    from fruitdask.aws import aws_config, iam, parse_tags
    from fruitdask.aws.ec2 import default_staging

    name = args.name or str(aws_config("iam.name"))
    try:
        staging = args.staging or default_staging(args.output[0]) or ""
        document = iam.policy(args.input, args.output, staging, args.image)
        tags = parse_tags(args.tag, aws_config("tags"))
        if args.dry_run:
            term.result(json.dumps(document, indent=1))
            term.say(
                f"dry run: role and instance profile {name} (trusted by ec2.amazonaws.com) "
                f"with inline policy {iam.POLICY_NAME} above; nothing created"
            )
            return 0
        try:
            import boto3
        except ImportError as exc:
            from fruitdask.aws import install_hint

            raise install_hint(exc) from None
        done = iam.ensure_role(boto3.client("iam"), document, name=name, tags=tags)
    except _aws_errors() as exc:
        raise InputError(str(exc)) from None
    term.result(json.dumps(done))
    term.say(
        f"{'; '.join(done['changes']) or 'up to date'}: pass --instance-profile {name} to "
        "`run --cluster ec2` or `emr run/create` (launching needs iam:PassRole on "
        f"{done['role_arn']})"
    )
    return 0


# ---------------------------------------------------------------- plan
def _register_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="workers, wall time and cost to process N images by a deadline on AWS",
        description="Estimate the workers needed, the wait (start-up, install, work, "
        "teardown) and the cost of a run on EC2 or EMR, from a measured per-core "
        "throughput (fruitdask/aws/throughput.json, or a run's manifest.json) and a "
        "dated on-demand price table. Calls nothing.",
    )
    p.add_argument("--images", type=int, required=True, help="number of images")
    p.add_argument(
        "--deadline",
        help=f"wall-clock budget to the result, start-up included, e.g. 10m, 1h{_d('plan.deadline')}",
    )
    p.add_argument(
        "--workers", type=int, help="plan this many workers instead of meeting a deadline"
    )
    p.add_argument(
        "--instance-type", help="worker instance type (default: compare all, pick the cheapest)"
    )
    p.add_argument("--head-instance-type", help="scheduler / EMR primary instance type")
    p.add_argument(
        "--manifest",
        metavar="PATH|URL",
        help="a run's manifest.json (or its output folder): its images_per_s_per_core",
    )
    p.add_argument("--prices", metavar="FILE", help="price table JSON (default: the shipped one)")
    p.add_argument(
        "--region",
        help="price region (default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1; "
        "run --cluster ec2 defaults to the input bucket's)",
    )
    p.add_argument("--service", choices=("ec2", "emr"), help="EC2 (default) or EMR pricing")
    p.add_argument(
        "--startup",
        metavar="DURATION",
        help="start-up and install before any work "
        "(default: the sum of the start and install figures printed)",
    )
    p.add_argument(
        "--rate", type=float, help="images/s per vCPU (overrides --manifest and the default)"
    )
    p.add_argument(
        "--efficiency", type=float, help=f"scaling efficiency in (0, 1]{_d('plan.efficiency')}"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    import os

    from fruitdask.aws import aws_config
    from fruitdask.aws import plan as pl

    positive("--images", args.images)
    positive("--workers", args.workers)
    notes: list[str] = []
    try:
        service = args.service or aws_config("plan.service")
        d = pl.defaults(service)
        region = args.region or os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION")  # fmt: skip
        prices = pl.load_prices(args.prices, region)
        if region and region != prices.region:
            notes.append(
                f"note: {prices.path} has no prices for {region} (it has "
                f"{', '.join(prices.regions)}): {prices.region}'s are used"
            )
        if args.rate is not None:
            rate, source = args.rate, "--rate"
        elif args.manifest:
            rate, source, warning = pl.throughput_from_manifest(args.manifest)
            if warning:
                notes.append(warning)
        else:
            rate, source = d["rate_per_core"], d["rate_source"]
        deadline = pl.parse_duration(args.deadline) if args.deadline else d["deadline_s"]
        startup = pl.parse_duration(args.startup) if args.startup else d["startup_s"]
        kwargs: dict[str, Any] = {
            "rate_per_core": rate,
            "deadline_s": None if args.workers else deadline,
            "workers": args.workers,
            "efficiency": args.efficiency if args.efficiency is not None else d["efficiency"],
            "startup_s": startup,
            "teardown_s": d["teardown_s"],
            "extras_per_hour": prices.extras_per_hour(d["ebs_gb"]),
            "service": service,
            "minimum_seconds": prices.minimum_seconds,
        }
        head = prices.get(args.head_instance_type or d["head"])
        options = pl.compare(args.images, prices, head, **kwargs)
        if args.instance_type:
            best = pl.plan_job(args.images, prices.get(args.instance_type), head, **kwargs)
        else:
            if not options:
                raise pl.PlanError(f"no instance type in {prices.path} has a {service} price")
            best = options[0]
        parts = pl.waits(service, best.job_s, source)
        if args.startup:
            parts = [w for w in parts if w.name not in ("start", "install")]
            parts.insert(0, pl.Wait("start", float(startup or 0.0), "--startup"))
    except pl.PlanError as exc:
        raise InputError(str(exc)) from None
    for note in notes:
        if note.startswith("warning:"):
            term.say(note)
    if args.json:
        term.result(json.dumps(_plan_json(best, prices, source, parts, notes)))
    else:
        term.result(
            pl.format_plan(
                best,
                prices,
                source,
                options[:8] if not args.instance_type else None,
                waits=parts,
                notes=[n for n in notes if not n.startswith("warning:")],
            )
        )
    return 0


def _plan_json(p, prices, source: str, parts, notes: list[str]) -> dict[str, Any]:
    return {
        "service": p.service,
        "images": p.images,
        "instance_type": p.instance.name,
        "workers": p.workers,
        "vcpus": p.vcpus,
        "head_instance_type": p.head.name,
        "images_per_s_per_core": p.rate_per_core,
        "throughput_source": source,
        "efficiency": p.efficiency,
        "startup_s": round(p.startup_s, 1),
        "job_s": round(p.job_s, 1),
        "wall_s": round(p.wall_s, 1),
        "teardown_s": round(p.teardown_s, 1),
        "total_s": round(p.total_s, 1),
        "waits": [
            {"name": w.name, "seconds": round(w.seconds, 1), "source": w.source, "cut": w.cut}
            for w in parts
        ],
        "deadline_s": p.deadline_s,
        "meets_deadline": p.meets_deadline,
        "usd_per_hour": round(p.usd_per_hour, 4),
        "cost_usd": round(p.cost_usd, 4),
        "prices_as_of": prices.as_of,
        "prices_region": prices.region,
        "notes": notes,
    }


# ---------------------------------------------------------------- emr
def _register_emr(subparsers) -> None:
    e = subparsers.add_parser(
        "emr",
        help="create an EMR cluster running Dask, submit the Dask and Spark jobs, poll, terminate",
        description="Amazon EMR with the Dask scheduler and workers started by "
        "deploy/emr/bootstrap.sh. Every sub-command takes --dry-run (print the exact API "
        "payload as JSON, call nothing) and --region.",
    )
    sub = e.add_subparsers(dest="emr_command", metavar="ACTION", parser_class=type(e))
    sub.required = True
    _register_emr_run(sub)
    _register_emr_create(sub)
    _register_emr_submit(sub)
    _register_emr_status(sub)
    _register_emr_terminate(sub)


def _emr_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every ``emr`` sub-command takes."""
    p.add_argument("--region", help="AWS region (default: boto's)")
    p.add_argument("--dry-run", action="store_true", help="print the API payload as JSON")


def _register_emr_run(sub) -> None:
    r = sub.add_parser(
        "run",
        help="one shot: stage fruitdask, start a cluster that runs the job and terminates",
        description="Upload the bootstrap script, this machine's fruitdask (a wheel) and its "
        "pinned dependencies to --staging, create a cluster whose only step is the job "
        "(KeepJobFlowAliveWhenNoSteps=False: it terminates when the step ends, or fails), "
        "follow it (cluster and step states, the SSH tunnel to the dashboard), then print "
        "the output, the wall time and the estimated cost. Ctrl-C terminates the cluster.",
    )
    r.add_argument("--input", "-i", required=True, help="s3:// folder of images or shards")
    r.add_argument("--output", "-o", required=True, help="s3:// output folder")
    r.add_argument(
        "--engine", choices=("dask", "spark"), default="dask", help="the Dask job or the Spark one"
    )
    r.add_argument("--timeout", metavar="DURATION", help="terminate the cluster after this")
    r.add_argument(
        "--job-args",
        default="",
        metavar="'ARGS'",
        help="more arguments for the job, one quoted string: --job-args='--partition-size 2000'",
    )
    r.add_argument("--json", action="store_true", help="print the outcome as JSON")
    _cluster_arguments(r, one_shot=True)
    _emr_common_arguments(r)
    r.set_defaults(func=cmd_emr_run)


def _register_emr_create(sub) -> None:
    c = sub.add_parser(
        "create",
        help="run_job_flow: a long-lived cluster with Dask on it (auto-terminates when idle)",
        description="A cluster that stays up for `emr submit` until idle for --idle-timeout. "
        "Without --bootstrap-uri and --package, this machine's fruitdask and the bootstrap "
        "script are staged under --staging first.",
    )
    c.add_argument(
        "--idle-timeout", metavar="DURATION", help=f"auto-terminate after{_d('emr.idle-timeout')}"
    )
    _cluster_arguments(c, one_shot=False)
    _emr_common_arguments(c)
    c.set_defaults(func=cmd_emr_create)


def _register_emr_submit(sub) -> None:
    s = sub.add_parser(
        "submit",
        help="add the Dask job and/or the Spark parity job as steps",
        description="Add the steps; --job-args are passed on to `fruitdask run` / "
        "`spark_parity run`.",
    )
    s.add_argument("cluster_id")
    s.add_argument("--input", "-i", required=True, help="s3:// folder of images or shards")
    s.add_argument("--output", "-o", required=True, help="s3:// output folder")
    s.add_argument(
        "--job",
        choices=("dask", "spark", "both"),
        default="dask",
        help="dask (default), spark, or both (spark writes to OUTPUT-spark)",
    )
    s.add_argument(
        "--venv-archive",
        metavar="S3_URL",
        help="Spark: a venv-pack archive shipped with --archives instead of the bootstrap's venv",
    )
    s.add_argument(
        "--launcher-uri",
        metavar="S3_URL",
        help="Spark with --venv-archive: deploy/emr/spark_parity_main.py on S3",
    )
    s.add_argument("--wait", action="store_true", help="poll until the steps end")
    s.add_argument("--timeout", metavar="DURATION", help="stop waiting after this (none)")
    s.add_argument(
        "--job-args",
        default="",
        metavar="'ARGS'",
        help="more arguments for the job, one quoted string: --job-args='--overwrite "
        "--partition-size 2000'",
    )
    _emr_common_arguments(s)
    s.set_defaults(func=cmd_emr_submit)


def _register_emr_status(sub) -> None:
    st = sub.add_parser("status", help="cluster state and steps; --wait for a step")
    st.add_argument("cluster_id")
    st.add_argument("--step", metavar="STEP_ID", help="the step to --wait for")
    st.add_argument("--wait", action="store_true", help="poll until --step ends")
    st.add_argument("--timeout", metavar="DURATION")
    st.add_argument("--json", action="store_true")
    _emr_common_arguments(st)
    st.set_defaults(func=cmd_emr_status)


def _register_emr_terminate(sub) -> None:
    t = sub.add_parser("terminate", help="terminate_job_flows")
    t.add_argument("cluster_id")
    _emr_common_arguments(t)
    t.set_defaults(func=cmd_emr_terminate)


def _cluster_arguments(p: argparse.ArgumentParser, one_shot: bool) -> None:
    p.add_argument("--name", default="fruitdask", help="cluster name (fruitdask)")
    p.add_argument(
        "--staging",
        metavar="S3_URL",
        help="where fruitdask, the bootstrap script and the logs go"
        + (" (default: s3://<output bucket>/fruitdask-staging)" if one_shot else ""),
    )
    p.add_argument(
        "--log-uri", metavar="S3_URL", help="EMR's log folder (default: <staging>/logs/)"
    )
    if not one_shot:
        p.add_argument(
            "--bootstrap-uri", metavar="S3_URL", help="deploy/emr/bootstrap.sh, uploaded by hand"
        )
        p.add_argument(
            "--package", help="fruitdask for the nodes, by hand: an s3:// wheel or a pip spec"
        )
        p.add_argument("--constraints", metavar="URL", help="pip constraints, by hand")
    p.add_argument("--release", help=f"EMR release label, 7.x{_d('emr.release')}")
    p.add_argument("--primary-instance-type", metavar="TYPE", help=_d("emr.primary-instance-type"))
    p.add_argument("--core-instance-type", metavar="TYPE", help=_d("emr.core-instance-type"))
    p.add_argument(
        "--core-count", type=int, help=f"core nodes = Dask workers{_d('emr.core-count')}"
    )
    p.add_argument("--core-spot", action="store_true", help="core nodes on spot")
    p.add_argument("--service-role", help=f"EMR service role{_d('emr.service-role')}")
    p.add_argument(
        "--instance-profile",
        help=f"the nodes' instance profile{_d('emr.instance-profile')}; `fruitdask aws iam` "
        "makes a least-privilege one",
    )
    p.add_argument("--subnet-id")
    p.add_argument("--key-name", help="EC2 key pair for SSH (none by default)")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="(repeatable)")
    add_storage_arguments(p)


def _emr_settings(args: argparse.Namespace, staging: str | None, keep_alive: bool):
    """``(EmrSettings, uploads)``: what is given by hand, the rest staged."""
    from fruitdask.aws import AwsError, aws_config, emr, parse_tags

    def conf(value: Any, key: str) -> Any:
        return aws_config(f"emr.{key}", value)

    positive("--core-count", args.core_count)
    by_hand = {
        "bootstrap": getattr(args, "bootstrap_uri", None),
        "package": getattr(args, "package", None),
        "constraints": getattr(args, "constraints", None),
    }
    uploads: dict[str, tuple[str, bytes]] = {}
    if not (by_hand["bootstrap"] and by_hand["package"]):
        if not staging:
            raise AwsError(
                "--staging S3_URL is required (or --bootstrap-uri and --package): where "
                "fruitdask and the bootstrap script are uploaded for the nodes"
            )
        staged = emr.staged_files(staging)
        uploads = {k: v for k, v in staged.items() if not by_hand.get(k)}
    urls = {k: by_hand.get(k) or uploads[k][0] for k in ("bootstrap", "package")}
    constraints = by_hand["constraints"] or (uploads["constraints"][0] if uploads else None)
    log_uri = args.log_uri or (f"{staging.rstrip('/')}/logs/" if staging else None)
    if not log_uri:
        raise AwsError("--log-uri S3_URL is required (or --staging)")
    idle = _duration(conf(getattr(args, "idle_timeout", None), "idle-timeout"))
    s = emr.EmrSettings(
        bootstrap_uri=urls["bootstrap"],
        package=urls["package"],
        log_uri=log_uri,
        name=args.name,
        release=conf(args.release, "release"),
        primary_instance_type=conf(args.primary_instance_type, "primary-instance-type"),
        core_instance_type=conf(args.core_instance_type, "core-instance-type"),
        core_count=int(conf(args.core_count, "core-count")),
        core_spot=args.core_spot,
        idle_timeout_s=int(idle or 3600),
        service_role=conf(args.service_role, "service-role"),
        instance_profile=conf(args.instance_profile, "instance-profile"),
        subnet_id=args.subnet_id,
        key_name=args.key_name,
        constraints=constraints,
        prefix=conf(None, "prefix"),
        scheduler_port=int(conf(None, "scheduler-port")),
        dashboard_port=int(conf(None, "dashboard-port")),
        tags=parse_tags(args.tag, aws_config("tags")),
        keep_alive=keep_alive,
    )
    return s, uploads


def _upload(uploads: dict[str, tuple[str, bytes]], args: argparse.Namespace) -> None:
    from fruitdask.aws.stage import stage

    so = storage_options_from_args(args)
    for kind, (url, data) in uploads.items():
        if stage(url, data, so):
            term.say(f"staged the {kind}: {url}")


def _aws_errors() -> tuple[type[BaseException], ...]:
    from fruitdask.aws import AwsError

    return (AwsError,)


def _dry(operation: str, payload: dict[str, Any], uploads: dict | None = None) -> int:
    doc: dict[str, Any] = {"operation": operation, "payload": payload}
    if uploads:
        doc["uploads"] = {kind: url for kind, (url, _) in uploads.items()}
    term.result(json.dumps(doc, indent=1))
    return 0


def _job_args(text: str) -> list[str]:
    """``--job-args``, split as a shell would."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise InputError(f"--job-args: {exc}") from None


def _duration(text: str | None) -> float | None:
    from fruitdask.aws.plan import PlanError, parse_duration

    try:
        return parse_duration(text)
    except PlanError as exc:
        raise InputError(str(exc)) from None


def cmd_emr_create(args: argparse.Namespace) -> int:
    from fruitdask.aws import emr

    try:
        s, uploads = _emr_settings(args, args.staging, keep_alive=True)
        payload = emr.create_payload(s)
        if args.dry_run:
            return _dry("RunJobFlow", payload, uploads)
        client = emr.emr_client(args.region)
        _upload(uploads, args)
        cluster_id = emr.create_cluster(client, payload)
    except _aws_errors() as exc:
        raise InputError(str(exc)) from None
    term.result(cluster_id)
    term.say(
        f"created {cluster_id}; submit with: python -m fruitdask emr submit {cluster_id} "
        "--input s3://... --output s3://..."
    )
    return 0


def cmd_emr_run(args: argparse.Namespace) -> int:
    import functools
    import time

    from fruitdask.aws import emr
    from fruitdask.cli._common import Supervisor

    timeout = _duration(args.timeout)
    job_args = _job_args(args.job_args)
    try:
        s, uploads, payload = _one_shot_payload(args, job_args)
        if args.dry_run:
            return _dry("RunJobFlow", payload, uploads)
        client = emr.emr_client(args.region)
        region = client.meta.region_name
    except _aws_errors() as exc:
        raise InputError(str(exc)) from None
    t0 = time.monotonic()
    body = functools.partial(_one_shot, client, payload, uploads, args, s, timeout)
    try:
        outcome = Supervisor().run(body)
    except _aws_errors() as exc:
        raise InputError(str(exc)) from None
    wall = time.monotonic() - t0
    usage = _one_shot_usage(outcome, s, region, wall)
    if not outcome.ok:
        raise _one_shot_error(outcome, s)
    _print_one_shot(args, outcome, s, wall, usage)
    return 0


def _one_shot_payload(
    args: argparse.Namespace, job_args: list[str]
) -> tuple[Any, dict[str, tuple[str, bytes]], dict[str, Any]]:
    """``(EmrSettings, uploads, RunJobFlow payload)`` of ``emr run``: a cluster
    whose only step is the job, terminated when the step ends or fails."""
    from fruitdask.aws import emr
    from fruitdask.aws.ec2 import default_staging

    staging = args.staging or default_staging(args.output)
    s, uploads = _emr_settings(args, staging, keep_alive=False)
    if args.engine == "dask":
        step = emr.dask_step(
            args.input, args.output, job_args, prefix=s.prefix,
            scheduler_port=s.scheduler_port, workers=s.core_count,
            action_on_failure="TERMINATE_CLUSTER",
        )  # fmt: skip
    else:
        step = emr.spark_step(args.input, args.output, job_args, prefix=s.prefix,
                              action_on_failure="TERMINATE_CLUSTER")  # fmt: skip
    return s, uploads, emr.create_payload(s, [step])


def _one_shot(client, payload, uploads, args, s, timeout, stop):
    """The body of ``emr run`` (the supervisor's thread): stage, create the
    cluster, follow it to its end; returns :class:`fruitdask.aws.emr.Outcome`."""
    import contextlib
    import threading

    from fruitdask.aws import aws_config, emr

    _upload(uploads, args)
    cluster_id = emr.create_cluster(client, payload)
    term.say(
        f"created {cluster_id}: 1 x {s.primary_instance_type} + {s.core_count} x "
        f"{s.core_instance_type}, {s.release}; it terminates after its step"
    )
    wake = threading.Event()
    unregister = stop.on_stop(wake.set)
    try:
        return emr.watch(
            client,
            cluster_id,
            poll_s=float(aws_config("emr.poll-interval")),
            timeout_s=timeout,
            on_event=term.say,
            check=stop.check,
            key_name=s.key_name,
            dashboard_port=s.dashboard_port,
            sleep=wake.wait,
        )
    except BaseException:
        # stopped, timed out or lost track: the cluster must not outlive this command
        with stop.holding(f"terminating the EMR cluster {cluster_id}"):
            with contextlib.suppress(Exception):
                emr.terminate(client, cluster_id)
        term.say(f"terminating {cluster_id}")
        raise
    finally:
        unregister()


def _one_shot_usage(outcome, s, region: str | None, wall: float) -> dict[str, Any]:
    """The cluster's instance-hours and estimated cost: over its lifetime as
    EMR reports it, else over the command's wall time."""
    import contextlib

    from fruitdask.aws import aws_config
    from fruitdask.aws.plan import estimate_usage, instance_counts

    lifetime = wall
    if outcome.created is not None and outcome.ended is not None:
        with contextlib.suppress(TypeError, AttributeError):
            lifetime = (outcome.ended - outcome.created).total_seconds()
    return estimate_usage(
        "emr", region,
        instance_counts((s.primary_instance_type, 1), (s.core_instance_type, s.core_count)),
        seconds=lifetime, ebs_gb_each=float((aws_config("plan.ebs-gb") or {}).get("emr", 0)),
    )  # fmt: skip


def _one_shot_error(outcome, s) -> JobError:
    """The one line of a one-shot cluster whose step did not complete."""
    failed = next((k for k, v in outcome.steps.items() if v != "COMPLETED"), None)
    return JobError(
        f"{outcome.cluster_id} {outcome.state}"
        + (f": step {failed} {outcome.steps[failed]}" if failed else ": its step never ran")
        + (f": {outcome.failure or outcome.reason}" if outcome.failure or outcome.reason else "")
        + (f" (log: {outcome.log_file})" if outcome.log_file else f" (logs: {s.log_uri})")
    )


def _print_one_shot(
    args: argparse.Namespace, outcome, s, wall: float, usage: dict[str, Any]
) -> None:
    """The output, wall time, cluster, cost and logs of a completed ``emr run``."""
    from fruitdask.aws.plan import format_duration as duration

    cost = usage["estimated_usd"]
    if args.json:
        term.result(json.dumps({
            "output": args.output, "cluster_id": outcome.cluster_id, "state": outcome.state,
            "steps": outcome.steps, "wall_s": round(wall, 1), "usage": usage,
            "logs": s.log_uri,
        }))  # fmt: skip
    else:
        term.result(
            f"output: {args.output}\n"
            f"wall time: {duration(wall)} (upload, cluster start, job, termination)\n"
            f"cluster: {outcome.cluster_id} {outcome.state}, {usage['instance_hours']:.2f} "
            "instance-hours\n"
            + (f"estimated cost: ${cost:.2f} ({usage['prices']}, EC2 + EMR + EBS + IPv4)\n"
               if cost is not None else "estimated cost: unknown (instance type not in the "
               "price table)\n")
            + f"logs: {s.log_uri}"
        )  # fmt: skip


def cmd_emr_submit(args: argparse.Namespace) -> int:
    from fruitdask.aws import aws_config, emr

    timeout = _duration(args.timeout)
    prefix = aws_config("emr.prefix")
    job_args = _job_args(args.job_args)
    try:
        steps = []
        if args.job in ("dask", "both"):
            steps.append(
                emr.dask_step(
                    args.input,
                    args.output,
                    job_args,
                    prefix=prefix,
                    scheduler_port=int(aws_config("emr.scheduler-port")),
                )
            )
        if args.job in ("spark", "both"):
            out = args.output.rstrip("/") + "-spark" if args.job == "both" else args.output
            steps.append(
                emr.spark_step(
                    args.input,
                    out,
                    job_args,
                    prefix=prefix,
                    venv_archive=args.venv_archive,
                    launcher_uri=args.launcher_uri,
                )
            )
        payload = emr.steps_payload(args.cluster_id, steps)
        if args.dry_run:
            return _dry("AddJobFlowSteps", payload)
        client = emr.emr_client(args.region)
        step_ids = emr.add_steps(client, payload)
        for sid, step in zip(step_ids, steps, strict=True):
            term.result(f"{sid}\t{step['Name']}")
        if not args.wait:
            return 0
        return _wait_all(client, args.cluster_id, step_ids, timeout)
    except _aws_errors() as exc:
        raise InputError(str(exc)) from None


def _wait_all(client, cluster_id: str, step_ids: list[str], timeout: float | None) -> int:
    from fruitdask.aws import aws_config, emr

    code = 0
    for sid in step_ids:

        def show(state: str, sid: str = sid) -> None:
            term.say(f"{sid}: {state}")

        r = emr.wait_for_step(
            client,
            cluster_id,
            sid,
            poll_s=float(aws_config("emr.poll-interval")),
            timeout_s=timeout,
            on_change=show,
        )
        if not r.ok:
            code = 1
            term.say(
                f"fruitdask: error: step {sid} {r.state}"
                + (f": {r.reason}" if r.reason else "")
                + (f" (log: {r.log_file})" if r.log_file else "")
            )
    return code


def cmd_emr_status(args: argparse.Namespace) -> int:
    from fruitdask.aws import emr

    timeout = _duration(args.timeout)
    if args.dry_run:
        return _dry("DescribeCluster", {"ClusterId": args.cluster_id})
    try:
        client = emr.emr_client(args.region)
        if args.wait:
            if not args.step:
                raise InputError("--wait needs --step STEP_ID")
            return _wait_all(client, args.cluster_id, [args.step], timeout)
        d = emr.describe(client, args.cluster_id)
    except _aws_errors() as exc:
        raise InputError(str(exc)) from None
    if args.json:
        term.result(json.dumps(d))
        return 0
    term.result(
        f"{d['id']} {d['name']}: {d['state']}"
        + (f" ({d['reason']})" if d["reason"] else "")
        + (f", primary {d['primary']}" if d["primary"] else "")
    )
    for s in d["steps"]:
        term.result(f"  {s['id']}  {s['state']:<11} {s['name']}")
    return 0


def cmd_emr_terminate(args: argparse.Namespace) -> int:
    from fruitdask.aws import emr

    payload = emr.terminate_payload(args.cluster_id)
    if args.dry_run:
        return _dry("TerminateJobFlows", payload)
    try:
        emr.terminate(emr.emr_client(args.region), args.cluster_id)
    except _aws_errors() as exc:
        raise InputError(str(exc)) from None
    term.result(f"terminating {args.cluster_id}")
    return 0
