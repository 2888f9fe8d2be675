"""``fruitdask aws iam``: the instances' role, least privilege, through moto's IAM
on loopback (moto stores policies but does not enforce them: what is checked
here is the document, statement by statement)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INPUT = "s3://in-bucket/datasets/fruits"
OUTPUT = "s3://out-bucket/runs/features"

pytestmark = pytest.mark.cloud


@pytest.fixture(scope="module")
def aws():
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    from fruitdask.aws.testing import moto_server

    with moto_server() as endpoint:
        yield endpoint


def _resources(statement: dict) -> list[str]:
    r = statement["Resource"]
    return r if isinstance(r, list) else [r]


def _check_least_privilege(doc: dict, input: str, output: str | list, staging: str) -> None:
    """Every S3 right is on one of the given prefixes (or, for listing and the
    bucket's region, on their buckets, limited to the prefixes by condition)."""

    def split(url: str) -> tuple[str, str]:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return bucket, prefix.strip("/")

    (ib, ip), (sb, sp) = split(input), split(staging)
    outs = [split(o) for o in ([output] if isinstance(output, str) else output)]
    written = {f"arn:aws:s3:::{ob}/{op}/*" for ob, op in outs}
    objects = {
        "s3:GetObject": {f"arn:aws:s3:::{ib}/{ip}/*", f"arn:aws:s3:::{sb}/{sp}/*", *written},
        "s3:PutObject": {f"arn:aws:s3:::{sb}/{sp}/logs/*", *written},
        "s3:DeleteObject": written,
        "s3:AbortMultipartUpload": written,
    }
    listed: dict[str, set] = {}
    for bucket, prefix in ((ib, ip), (sb, sp), *outs):
        listed.setdefault(bucket, set()).add(prefix)
    seen: dict[str, set] = {}
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow"
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        for action in actions:
            assert action != "s3:*" and "*" not in action.split(":")[1], action
            for res in _resources(st):
                seen.setdefault(action, set()).add(res)
                if action in objects:
                    assert res in objects[action], (action, res)
                elif action == "s3:ListBucket":
                    bucket = res.removeprefix("arn:aws:s3:::")
                    prefixes = st["Condition"]["StringLike"]["s3:prefix"]
                    bare = [p for p in prefixes if not p.endswith("/*")]
                    assert set(bare) <= listed[bucket] and sorted(prefixes) == sorted(
                        [x for p in bare for x in (p, f"{p}/*")]
                    ), st
                elif action == "s3:GetBucketLocation":
                    assert res.removeprefix("arn:aws:s3:::") in listed, res
                else:
                    raise AssertionError(f"unexpected action {action} on {res}")
    assert seen["s3:GetObject"] == objects["s3:GetObject"]
    assert seen["s3:PutObject"] == objects["s3:PutObject"]


def test_policy_is_least_privilege_and_the_example_is_current():
    from fruitdask.aws.iam import policy

    doc = policy(INPUT, OUTPUT, "s3://out-bucket/fruitdask-staging")
    _check_least_privilege(doc, INPUT, OUTPUT, "s3://out-bucket/fruitdask-staging")
    # the file kept in deploy/ is what the command prints for its placeholders
    example = json.loads((REPO / "deploy" / "iam" / "policy.example.json").read_text())
    expected = policy(
        "s3://INPUT-BUCKET/input-prefix",
        "s3://OUTPUT-BUCKET/output-prefix",
        "s3://OUTPUT-BUCKET/fruitdask-staging",
    )
    assert example == expected

    # several outputs (the Dask job's, EMR's, its Spark job's): each one writable,
    # listed under its own prefix, and nothing between them
    outs = [OUTPUT, f"{OUTPUT}-emr", f"{OUTPUT}-emr-spark", "s3://other-bucket/x"]
    many = policy(INPUT, outs, "s3://out-bucket/fruitdask-staging")
    _check_least_privilege(many, INPUT, outs, "s3://out-bucket/fruitdask-staging")
    [write] = [st for st in many["Statement"] if st["Sid"] == "WriteOutput"]
    assert len(_resources(write)) == 4

    ecr = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/fruitdask:0.1.0"
    extra = [st for st in policy(INPUT, OUTPUT, "s3://s/x", ecr)["Statement"]
             if st["Sid"].startswith("Ecr")]  # fmt: skip
    assert {st["Sid"]: _resources(st) for st in extra} == {
        "EcrLogin": ["*"],  # AWS grants GetAuthorizationToken on * only
        "EcrPull": ["arn:aws:ecr:eu-west-1:123456789012:repository/team/fruitdask"],
    }


def test_dry_run_prints_the_policy_and_calls_nothing(monkeypatch, capsys):
    import botocore.client

    from fruitdask.aws.iam import policy
    from fruitdask.cli import main

    calls = []
    monkeypatch.setattr(
        botocore.client.BaseClient, "_make_api_call", lambda self, op, kw: calls.append(op)
    )
    assert main(["aws", "iam", "--input", INPUT, "--output", OUTPUT, "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == policy(INPUT, OUTPUT, "s3://out-bucket/fruitdask-staging")
    assert calls == []
    assert main(["aws", "iam", "--input", "/data/fruits", "--output", OUTPUT, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fruitdask: error: --input /data/fruits: must be an s3:// URL")
    assert err.count("\n") == 1


def test_role_and_profile_through_moto(aws, capsys):
    import boto3

    from fruitdask.cli import main

    iam = boto3.client("iam")
    argv = ["aws", "iam", "--input", INPUT, "--output", OUTPUT, "--tag", "team=vision"]
    assert main(argv) == 0
    done = json.loads(capsys.readouterr().out)
    name = done["role"]
    assert name == done["instance_profile"] == "fruitdask-cluster"  # EMR needs the same name
    role = iam.get_role(RoleName=name)["Role"]
    trust = role["AssumeRolePolicyDocument"]
    trust = json.loads(trust) if isinstance(trust, str) else trust
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]
    assert {"Key": "team", "Value": "vision"} in role.get("Tags", [])
    assert iam.list_role_policies(RoleName=name)["PolicyNames"] == ["fruitdask-s3"]
    assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
    doc = iam.get_role_policy(RoleName=name, PolicyName="fruitdask-s3")["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    _check_least_privilege(doc, INPUT, OUTPUT, "s3://out-bucket/fruitdask-staging")
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]

    # again, for another output: the same role, its policy replaced, nothing duplicated
    other = "s3://out-bucket/runs/second"
    assert main(["aws", "iam", "--input", INPUT, "--output", other]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["changes"] == [f"updated role {name}"]
    doc = iam.get_role_policy(RoleName=name, PolicyName="fruitdask-s3")["PolicyDocument"]
    doc = json.loads(doc) if isinstance(doc, str) else doc
    _check_least_privilege(doc, INPUT, other, "s3://out-bucket/fruitdask-staging")
    assert "runs/features" not in json.dumps(doc)
    profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [name]
    assert [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]
            ].count(name) == 1  # fmt: skip
