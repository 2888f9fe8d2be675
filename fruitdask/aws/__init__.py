"""Running fruitdask on AWS: EC2 (dask-cloudprovider), EMR, and cost planning.

Importing this package adds the ``fruitdask.aws`` defaults (``aws.yaml``) to
dask.config, the way :mod:`fruitdask.config` adds the run settings' defaults.
The AWS libraries (boto3, dask-cloudprovider) are imported only inside the
functions that call AWS: ``pip install -e ".[aws]"``.

Submodules
----------
ec2
    :func:`~fruitdask.aws.ec2.ec2_cluster` (the stock Dask image with this machine's
    fruitdask, checks before anything is created, teardown always) and
    :func:`~fruitdask.aws.ec2.describe_plan`.
emr
    EMR API payloads, the one-shot run (:func:`~fruitdask.aws.emr.watch`),
    create/submit/status/terminate, step polling, the daemons' log copier.
iam
    The instances' least-privilege role and instance profile.
stage
    This machine's fruitdask as a wheel, its pinned dependencies, uploads.
plan
    Workers, wait and cost for a number of images and a deadline; prices.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import dask.config
import yaml

from fruitdask.config import config_get
from fruitdask.errors import ClusterError

__all__ = ["RUN_TAG", "AwsError", "aws_config", "install_hint", "parse_tags"]

# The per-run tag on everything fruitdask creates; teardown finds stragglers by it.
RUN_TAG = "fruitdask-run"

_YAML = os.path.join(os.path.dirname(__file__), "aws.yaml")
with open(_YAML) as _f:
    dask.config.update_defaults(yaml.safe_load(_f))


class AwsError(ClusterError):
    """An AWS call or an AWS setting failed.

    A :class:`~fruitdask.errors.ClusterError`, so ``python -m fruitdask`` prints
    it as one line and exits 2.
    """


def aws_config(key: str, value: Any = None) -> Any:
    """``value`` if given, else ``fruitdask.aws.<key>`` from dask.config."""
    return config_get(f"aws.{key}", value)


def install_hint(exc: ImportError) -> AwsError:
    """The error to raise when boto3 or dask-cloudprovider is missing."""
    return AwsError(f"{exc.name or exc}: AWS support is not installed: pip install fruitdask[aws]")


def parse_tags(items: list[str] | None, base: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Tags from ``KEY=VALUE`` strings over ``base``; reserved keys are refused."""
    tags = {str(k): str(v) for k, v in (base or {}).items()}
    for item in items or []:
        if "=" not in item:
            raise AwsError(f"--tag expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        tags[k.strip()] = v.strip()
    for k in tags:
        if not k or k.lower().startswith("aws:") or k == RUN_TAG:
            raise AwsError(f"tag key {k!r} is reserved or empty")
    return tags
