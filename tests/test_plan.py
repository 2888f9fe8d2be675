"""``fruitdask plan``: workers and cost from a run's manifest and a dated price table.

The planner is checked against a brute-force search over worker counts, against
a manifest written by a real pipeline run, and through the CLI.
"""

from __future__ import annotations

import datetime
import json

import pytest

pytestmark = pytest.mark.cloud


def _table():
    from fruitdask.aws.plan import load_prices

    return load_prices()


def test_shipped_price_table_is_dated_and_sane():
    from fruitdask.aws.plan import load_prices

    for region in ("us-east-1", "eu-west-1"):
        t = load_prices(region=region)
        assert t.region == region and set(t.regions) == {"us-east-1", "eu-west-1"}
        datetime.date.fromisoformat(t.as_of)
        assert t.currency == "USD" and t.minimum_seconds == 60
        assert 0.05 < t.ebs_gb_month < 0.2 and t.ipv4_hour == 0.005
        for inst in t.instances.values():
            assert inst.vcpu > 0 and inst.usd_per_hour > 0 and inst.memory_gib > 0
        # Within a family the price is linear in size: a transcription typo shows here.
        for family in ("c5", "c6i", "c7i", "m5", "m6i", "m7i"):
            sizes = [i for n, i in t.instances.items() if n.startswith(family + ".")]
            per_vcpu = {round(i.usd_per_hour / i.vcpu, 6) for i in sizes}
            assert len(sizes) >= 3 and len(per_vcpu) == 1, (region, family, per_vcpu)
        for name in ("m5.large", "c6i.xlarge", "m5.xlarge"):  # the defaults in aws.yaml
            assert name in t.instances
    us, eu = load_prices(region="us-east-1"), load_prices(region="eu-west-1")
    assert eu.get("c6i.xlarge").usd_per_hour > us.get("c6i.xlarge").usd_per_hour
    # a region the table lacks: the default region's table, which says so
    assert load_prices(region="ap-south-1").region == "us-east-1"


def test_usage_estimate():
    from fruitdask.aws.plan import estimate_usage, load_prices

    t = load_prices(region="us-east-1")
    u = estimate_usage("ec2", "us-east-1", {"m5.large": 1, "c6i.xlarge": 2}, seconds=1800,
                       ebs_gb_each=40)  # fmt: skip
    assert u["instance_hours"] == 1.5
    extras = 3 * 0.5 * (40 * t.ebs_gb_month / 730 + t.ipv4_hour)
    assert u["estimated_usd"] == pytest.approx(0.5 * (0.096 + 2 * 0.17) + extras, abs=1e-4)
    assert u["prices"].startswith("us-east-1 on-demand as of ")
    # an unknown type: hours, no price
    u = estimate_usage("ec2", None, {"z9.mega": 1}, seconds=60, ebs_gb_each=40)
    assert u["estimated_usd"] is None and u["instance_hours"] == pytest.approx(1 / 60, abs=1e-4)


def test_parse_duration():
    from fruitdask.aws.plan import PlanError, parse_duration

    assert parse_duration("10m") == 600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90 and parse_duration(45) == 45
    assert parse_duration("2 h") == 7200
    for bad in ("soon", "10 parsecs", "1h-5m", ""):
        with pytest.raises(PlanError):
            parse_duration(bad)


def _brute_force(images, per_worker_rate, startup, deadline):
    """The fewest workers whose wall time meets the deadline, by trying them all."""
    for w in range(1, 100_000):
        if startup + images / (per_worker_rate * w) <= deadline:
            return w
    raise AssertionError("no worker count meets it")


@pytest.mark.parametrize(
    "images,rate,eff,startup,deadline,itype",
    [
        (90_483, 1450, 0.8, 240, 600, "c6i.xlarge"),
        (10_000_000, 1450, 0.8, 240, 1800, "c6i.xlarge"),
        (10_000_000, 700, 1.0, 240, 1800, "c6i.4xlarge"),
        (50_000_000, 1200, 0.75, 600, 3600, "m5.2xlarge"),
        (1, 1000, 1.0, 0, 1, "c5.large"),
    ],
)
def test_fewest_workers_that_meet_the_deadline(images, rate, eff, startup, deadline, itype):
    from fruitdask.aws.plan import plan_job

    t = _table()
    inst, head = t.get(itype), t.get("m5.large")
    p = plan_job(
        images,
        inst,
        head,
        rate_per_core=rate,
        efficiency=eff,
        startup_s=startup,
        deadline_s=deadline,
    )
    assert p.workers == _brute_force(images, rate * eff * inst.vcpu, startup, deadline)
    assert p.meets_deadline and p.wall_s <= deadline
    assert p.job_s == pytest.approx(images / (rate * eff * inst.vcpu * p.workers))
    hourly = head.usd_per_hour + p.workers * inst.usd_per_hour
    assert p.usd_per_hour == pytest.approx(hourly)
    assert p.cost_usd == pytest.approx(hourly * max(60, startup + p.job_s) / 3600)


def test_emr_adds_the_surcharge_and_refuses_unknown_prices():
    from fruitdask.aws.plan import PlanError, plan_job

    t = _table()
    inst, head = t.get("m5.xlarge"), t.get("m5.xlarge")
    p = plan_job(1_000_000, inst, head, rate_per_core=1000, workers=3, service="emr")
    assert p.usd_per_hour == pytest.approx(4 * (0.192 + 0.048))
    with pytest.raises(PlanError, match="EMR price"):
        plan_job(10, t.get("c7i.xlarge"), head, rate_per_core=1000, workers=1, service="emr")
    with pytest.raises(PlanError, match="start-up"):
        plan_job(10, inst, head, rate_per_core=1000, deadline_s=300, startup_s=300)
    with pytest.raises(PlanError, match="not in the price table"):
        t.get("z9.mega")


def test_compare_picks_the_cheapest_non_burstable():
    from fruitdask.aws.plan import compare, plan_job

    t = _table()
    head = t.get("m5.large")
    kw = {"rate_per_core": 1450, "efficiency": 0.8, "startup_s": 240, "deadline_s": 1200}
    plans = compare(20_000_000, t, head, **kw)
    assert not any(p.instance.name.startswith("t3.") for p in plans)
    every = [plan_job(20_000_000, i, head, **kw) for n, i in t.instances.items() if n[:2] != "t3"]
    assert plans[0].cost_usd == pytest.approx(min(p.cost_usd for p in every))
    assert [p.cost_usd for p in plans] == sorted(p.cost_usd for p in plans)


@pytest.fixture
def manifest(dask_client, sample_dir, tmp_path):
    """A manifest written by a real run of the pipeline."""
    from fruitdask import pipeline
    from fruitdask.config import RunConfig

    out = tmp_path / "run"
    pipeline.run(RunConfig(input=str(sample_dir), output=str(out)), dask_client)
    return out / "manifest.json"


def test_cli_plans_from_a_real_manifest(manifest, capsys):
    from fruitdask.aws.plan import defaults
    from fruitdask.cli import main

    measured = json.loads(manifest.read_text())["throughput"]["images_per_s_per_core"]
    assert measured > 0
    startup = defaults("ec2")["startup_s"]
    argv = ["plan", "--images", "2000000", "--deadline", "15m", "--manifest", str(manifest)]
    assert main([*argv, "--instance-type", "c6i.2xlarge", "--json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert got["images_per_s_per_core"] == measured
    assert got["instance_type"] == "c6i.2xlarge" and got["head_instance_type"] == "m5.large"
    per_worker = measured * 0.8 * 8
    assert got["workers"] == _brute_force(2_000_000, per_worker, startup, 900)
    assert got["meets_deadline"] and got["prices_as_of"] == _table().as_of
    assert str(manifest) in got["throughput_source"]
    # 96 images: fixed costs dominate, and the plan says so, naming them
    [warning] = captured.err.strip().splitlines()
    assert warning.startswith("warning: the manifest's run is too small to extrapolate")
    assert "pca fit" in warning and "listing" in warning

    # the output folder works as well as the file; the text form lists alternatives
    assert main(["plan", "--images", "2000000", "--manifest", str(manifest.parent)]) == 0
    text = capsys.readouterr().out
    assert "alternatives (cheapest first):" in text and "<- chosen" in text
    assert f"{measured:,.0f} images/s per vCPU" in text


def test_plan_names_its_measurements_and_the_wait(capsys):
    """The default rate is the committed benchmark result, named; the wait is
    broken down into start, install, work and teardown, each with its source
    and what would cut it."""
    from fruitdask.aws.plan import THROUGHPUT_JSON, default_throughput
    from fruitdask.cli import main

    doc = json.loads(open(THROUGHPUT_JSON).read())
    rate, source, _ = default_throughput()
    assert rate == doc["images_per_s_per_core"] > 0
    assert "fruitdask/aws/throughput.json" in source and doc["command"] in source
    for service in ("ec2", "emr"):
        assert main(["plan", "--images", "1000000", "--service", service]) == 0
        text = capsys.readouterr().out
        assert "fruitdask/aws/throughput.json" in text
        section = text.split(f"what you wait for on {service.upper()}:")[1]
        for part in ("start", "install", "work", "teardown", "total"):
            assert f"\n  {part} " in section, (part, section)
        assert section.count("cut it: ") >= 3
        assert (
            "estimate, not measured" in section
            and "measured here" in section
            or (service == "emr" and "estimate" in section)
        )
    assert main(["plan", "--images", "1000000", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [w["name"] for w in got["waits"]] == ["start", "install", "work", "teardown"]
    assert all(w["source"] for w in got["waits"])
    assert got["total_s"] == pytest.approx(sum(w["seconds"] for w in got["waits"]), abs=0.5)


def test_plan_regions(capsys, monkeypatch):
    from fruitdask.cli import main

    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    argv = ["plan", "--images", "1000000", "--workers", "4", "--instance-type", "c6i.xlarge"]
    assert main([*argv, "--json"]) == 0
    us = json.loads(capsys.readouterr().out)
    assert main([*argv, "--json", "--region", "eu-west-1"]) == 0
    eu = json.loads(capsys.readouterr().out)
    assert us["prices_region"] == "us-east-1" and eu["prices_region"] == "eu-west-1"
    assert eu["usd_per_hour"] > us["usd_per_hour"]
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prices_region"] == "eu-west-1"
    assert main([*argv, "--region", "ap-south-1"]) == 0
    assert "has no prices for ap-south-1" in capsys.readouterr().out


def test_cli_price_override_and_errors(tmp_path, capsys):
    from fruitdask.cli import main

    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps(
            {
                "as_of": "2030-01-01",
                "region": "eu-north-1",
                "instances": {
                    "x1.huge": {"vcpu": 64, "memory_gib": 128, "usd_per_hour": 2.0},
                    "x1.head": {"vcpu": 2, "memory_gib": 4, "usd_per_hour": 0.05},
                },
            }
        )
    )
    argv = ["plan", "--images", "10000000", "--prices", str(prices), "--rate", "1000"]
    argv += ["--head-instance-type", "x1.head", "--efficiency", "1", "--startup", "0"]
    assert main([*argv, "--workers", "4", "--instance-type", "x1.huge", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["workers"] == 4 and got["job_s"] == round(10_000_000 / (1000 * 64 * 4), 1)
    assert got["usd_per_hour"] == pytest.approx(0.05 + 4 * 2.0)
    assert got["prices_as_of"] == "2030-01-01" and got["prices_region"] == "eu-north-1"

    cases = [
        (["plan", "--images", "0"], "--images must be >= 1"),
        (["plan", "--images", "10", "--deadline", "soon"], "not a duration"),
        (["plan", "--images", "10", "--deadline", "3m"], "start-up overhead"),
        (["plan", "--images", "10", "--prices", str(tmp_path / "none.json")], "cannot read"),
        (["plan", "--images", "10", "--manifest", str(tmp_path / "m.json")], "no such manifest"),
        (["plan", "--images", "10", "--instance-type", "z9.mega"], "not in the price table"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fruitdask: error: ") and message in err and err.count("\n") == 1


def test_defaults_come_from_dask_config(capsys):
    import dask.config

    from fruitdask.aws.plan import default_throughput, defaults
    from fruitdask.cli import main

    d = defaults("ec2")
    assert d["rate_per_core"] == default_throughput()[0] and d["efficiency"] == 0.8
    assert d["startup_s"] == 180 + 80 and d["teardown_s"] == 60 and d["head"] == "m5.large"
    e = defaults("emr")
    assert e["startup_s"] == 480 + 120 and e["head"] == "m5.xlarge" and e["ebs_gb"] == 79
    settings = {
        "fruitdask.aws.plan.images-per-s-per-core": 100,
        "fruitdask.aws.plan.service": "emr",
    }
    with dask.config.set(settings):
        assert main(["plan", "--images", "1000", "--json", "--instance-type", "c5.xlarge"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["service"] == "emr" and got["images_per_s_per_core"] == 100


def test_small_run_warning_is_about_size_and_fixed_costs(tmp_path):
    from fruitdask.aws.plan import throughput_from_manifest

    def manifest(images: int, **timings: float) -> str:
        path = tmp_path / f"m-{images}-{len(timings)}-{sum(timings.values())}.json"
        path.write_text(json.dumps({
            "engine": "dask", "counts": {"images": images}, "cluster": {"threads": 2},
            "timings": timings, "throughput": {"images_per_s_per_core": 900.0},
        }))  # fmt: skip
        return str(path)

    big = {"startup": 4.0, "listing": 0.3, "extract": 10.0, "pca_fit": 0.8,
           "transform_write": 1.0}  # fmt: skip
    assert throughput_from_manifest(manifest(20_000, **big))[2] is None
    # many images, but mostly fixed costs (a slow listing, say): still warned
    slow = {**big, "listing": 9.0}
    warning = throughput_from_manifest(manifest(20_000, **slow))[2]
    assert warning and "listing 9.00s" in warning and "pca fit 0.80s" in warning
    # few images: warned whatever the timings
    warning = throughput_from_manifest(manifest(96, **big))[2]
    assert warning and "96 images" in warning and "cluster start-up 4.00s" in warning
