"""The instances' IAM role, least privilege: ``fruitdask aws iam``.

One role and an instance profile of the same name (EMR requires the two names
to match), trusted by EC2, with one inline policy that allows exactly:

- **read** the input prefix (``s3:GetObject`` on ``input/*``; ``s3:ListBucket``
  on its bucket, for keys under the prefix only; ``s3:GetBucketLocation``);
- **read and write** the output prefix (get, put, delete, abort multipart
  uploads: the output lifecycle writes, replaces and cleans up its own files);
- **read** the staging prefix (fruitdask's wheel, the EMR bootstrap script) and
  **write** its ``logs/`` folder (EMR's log URI);
- for an image in Amazon ECR, **pull** that one repository (plus
  ``ecr:GetAuthorizationToken``, which AWS only grants on ``*``).

Nothing else: no other bucket, no other prefix, no ``s3:*``. :func:`policy`
builds the document (pure; ``--dry-run`` prints it and ``deploy/iam/`` keeps an
example); :func:`ensure_role` creates or updates the role in the account.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fruitdask.aws import AwsError, aws_config

__all__ = [
    "POLICY_NAME",
    "ensure_role",
    "policy",
    "s3_location",
    "trust_policy",
]

POLICY_NAME = "fruitdask-s3"
_ECR = re.compile(r"^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/([^:@]+)")


def s3_location(url: str, flag: str) -> tuple[str, str]:
    """``(bucket, prefix without slashes)`` of an ``s3://`` URL.

    Raises
    ------
    AwsError
        Not an ``s3://`` URL with a bucket.
    """
    if not url.startswith(("s3://", "s3a://")):
        raise AwsError(f"{flag} {url}: must be an s3:// URL")
    rest = url.split("://", 1)[1]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise AwsError(f"{flag} {url}: no bucket")
    return bucket, prefix.strip("/")


def _one_or_list(resources: list[str]) -> str | list[str]:
    unique = sorted(set(resources))
    return unique[0] if len(unique) == 1 else unique


def _objects(bucket: str, prefix: str) -> str:
    return f"arn:aws:s3:::{bucket}/{prefix}/*" if prefix else f"arn:aws:s3:::{bucket}/*"


def _listing(sid: str, bucket: str, prefix: str) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Sid": sid,
        "Effect": "Allow",
        "Action": ["s3:ListBucket"],
        "Resource": f"arn:aws:s3:::{bucket}",
    }
    if prefix:
        statement["Condition"] = {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}
    return statement


def _listings(sid: str, places: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One ListBucket statement per bucket, for all its prefixes."""
    out = []
    for n, bucket in enumerate(sorted({b for b, _ in places})):
        prefixes = sorted({p for b, p in places if b == bucket})
        statement = _listing(sid if n == 0 else f"{sid}{n + 1}", bucket, prefixes[0])
        if "" not in prefixes and len(prefixes) > 1:
            statement["Condition"]["StringLike"]["s3:prefix"] = [
                x for p in prefixes for x in (p, f"{p}/*")
            ]
        elif "" in prefixes:
            statement.pop("Condition", None)
        out.append(statement)
    return out


def policy(
    input: str, output: str | Sequence[str], staging: str, image: str | None = None
) -> dict[str, Any]:
    """The inline policy for a run reading ``input``, writing ``output`` (one
    prefix or several: the Dask job's, the Spark job's ...), with fruitdask
    staged (and EMR's logs written) under ``staging``."""
    ib, ip = s3_location(input, "--input")
    outs = [s3_location(o, "--output") for o in ([output] if isinstance(output, str) else output)]
    if not outs:
        raise AwsError("--output: give at least one output prefix")
    sb, sp = s3_location(staging, "--staging")
    logs = f"{sp}/logs" if sp else "logs"
    statements: list[dict[str, Any]] = [
        {"Sid": "ReadInput", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": _objects(ib, ip)},
        _listing("ListInput", ib, ip),
        {"Sid": "WriteOutput", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                    "s3:AbortMultipartUpload"],
         "Resource": _one_or_list([_objects(b, p) for b, p in outs])},
        *_listings("ListOutput", outs),
        {"Sid": "ReadStaging", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": _objects(sb, sp)},
        _listing("ListStaging", sb, sp),
        {"Sid": "WriteLogs", "Effect": "Allow", "Action": ["s3:PutObject"],
         "Resource": _objects(sb, logs)},
        # which region a bucket is in (clients ask before their first request)
        {"Sid": "BucketRegions", "Effect": "Allow", "Action": ["s3:GetBucketLocation"],
         "Resource": sorted({f"arn:aws:s3:::{b}" for b in (ib, sb, *(b for b, _ in outs))})},
    ]  # fmt: skip
    m = _ECR.match(image or "")
    if m:
        account, region, repo = m.groups()
        statements += [
            {"Sid": "EcrLogin", "Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"],
             "Resource": "*"},
            {"Sid": "EcrPull", "Effect": "Allow",
             "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
                        "ecr:BatchCheckLayerAvailability"],
             "Resource": f"arn:aws:ecr:{region}:{account}:repository/{repo}"},
        ]  # fmt: skip
    return {"Version": "2012-10-17", "Statement": statements}


def trust_policy() -> dict[str, Any]:
    """Only EC2 instances (EMR's nodes are EC2 instances) may take the role."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ec2.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def ensure_role(
    iam,
    document: Mapping[str, Any],
    *,
    name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Create the role and its instance profile, or bring existing ones up to
    date (trust, policy, membership); returns their ARNs and what changed.

    Raises
    ------
    AwsError
        An IAM call failed (one line).
    """
    from fruitdask.aws.ec2 import translate

    name = name or str(aws_config("iam.name"))
    tag_list = [
        {"Key": k, "Value": v} for k, v in {**(tags or {}), "created-by": "fruitdask"}.items()
    ]
    done: list[str] = []
    try:
        try:
            role = iam.get_role(RoleName=name)["Role"]
            iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(trust_policy()))
            done.append(f"updated role {name}")
        except Exception as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            role = iam.create_role(
                RoleName=name,
                AssumeRolePolicyDocument=json.dumps(trust_policy()),
                Description="fruitdask cluster instances: the run's S3 prefixes only",
                Tags=tag_list,
            )["Role"]
            done.append(f"created role {name}")
        iam.put_role_policy(
            RoleName=name, PolicyName=POLICY_NAME, PolicyDocument=json.dumps(document)
        )
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        except Exception as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            profile = iam.create_instance_profile(InstanceProfileName=name, Tags=tag_list)[
                "InstanceProfile"
            ]
            done.append(f"created instance profile {name}")
        if name not in [r["RoleName"] for r in profile.get("Roles", [])]:
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
            done.append(f"added role {name} to instance profile {name}")
    except AwsError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line at the boundary
        raise translate(exc, "IAM") from None
    return {
        "role": name,
        "role_arn": role["Arn"],
        "instance_profile": name,
        "instance_profile_arn": profile["Arn"],
        "policy": POLICY_NAME,
        "changes": done,
    }
