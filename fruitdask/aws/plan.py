"""Capacity and cost planning: how many workers for N images by a deadline, at what cost.

The model is deliberately simple and every input is printed with the plan:

- throughput scales linearly with vCPUs at ``rate x efficiency`` images/s per vCPU,
  where ``rate`` is a run's measured ``images_per_s_per_core`` (its
  ``manifest.json``) or the measured default in ``aws.yaml``;
- the cluster first spends ``startup`` seconds (boot, Docker, image pull, or EMR
  provisioning and bootstrap) billed but doing no work;
- every instance (the head node and the workers) is billed for the whole
  wall time, per second with a 60-second minimum, at the prices of a dated table
  shipped with fruitdask (``prices.json``) or the user's own (``--prices``).

No AWS call is made.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from dask.utils import parse_timedelta

from fruitdask.aws import AwsError, aws_config

__all__ = [
    "DEFAULT_REGION",
    "InstancePrice",
    "Plan",
    "Wait",
    "PlanError",
    "PriceTable",
    "compare",
    "default_throughput",
    "defaults",
    "estimate_usage",
    "format_duration",
    "format_plan",
    "instance_counts",
    "load_prices",
    "parse_duration",
    "plan_job",
    "throughput_from_manifest",
    "waits",
]

PRICES_JSON = os.path.join(os.path.dirname(__file__), "prices.json")
THROUGHPUT_JSON = os.path.join(os.path.dirname(__file__), "throughput.json")
SERVICES = ("ec2", "emr")
# Burstable instances run sustained CPU work on credits (or pay for "unlimited"):
# an ORB job would throttle, so they are left out of the automatic comparison.
_BURSTABLE = ("t2.", "t3.", "t3a.", "t4g.")


class PlanError(AwsError):
    """The plan cannot be made from these inputs (one-line message)."""


@dataclass(frozen=True)
class InstancePrice:
    """One instance type of a price table."""

    name: str
    vcpu: int
    memory_gib: float
    usd_per_hour: float
    emr_usd_per_hour: float | None = None

    def hourly(self, service: str) -> float:
        """Dollars per hour on ``service``: EC2, or EC2 plus the EMR surcharge."""
        if service == "emr":
            if self.emr_usd_per_hour is None:
                raise PlanError(
                    f"the price table has no EMR price for {self.name}: add emr_usd_per_hour "
                    "to a --prices file"
                )
            return self.usd_per_hour + self.emr_usd_per_hour
        return self.usd_per_hour


@dataclass(frozen=True)
class PriceTable:
    """One region of a dated on-demand price table (``prices.json``, format
    ``fruitdask-prices/2``: regions, each with instances, EBS and public IPv4)."""

    as_of: str
    region: str
    currency: str
    source: str
    minimum_seconds: int
    instances: dict[str, InstancePrice]
    path: str
    #: gp3 volumes, $ per GB-month (730 hours)
    ebs_gb_month: float = 0.0
    #: a public IPv4 address, $ per hour (every instance here has one)
    ipv4_hour: float = 0.0
    #: the regions the file has
    regions: tuple[str, ...] = ()

    def get(self, name: str) -> InstancePrice:
        try:
            return self.instances[name]
        except KeyError:
            raise PlanError(
                f"{name}: not in the price table {self.path} for {self.region} (as of "
                f"{self.as_of}); pass --prices FILE with it"
            ) from None

    def extras_per_hour(self, ebs_gb: float) -> float:
        """$ per hour of one instance's ``ebs_gb`` of gp3 and its public IPv4 address."""
        return ebs_gb * self.ebs_gb_month / 730 + self.ipv4_hour


DEFAULT_REGION = "us-east-1"


def load_prices(path: str | None = None, region: str | None = None) -> PriceTable:
    """Read a price table: ``path``, or the one shipped with fruitdask, for
    ``region`` (default us-east-1). A region the file lacks gives its first
    region's table (``.region`` says which: the caller notes the difference).

    Raises
    ------
    PlanError
        The file is missing, not JSON, or lacks a field.
    """
    path = path or PRICES_JSON
    try:
        with open(path) as f:
            doc = json.load(f)
        if "regions" in doc:
            regions = doc["regions"]
            chosen = region if region in regions else (
                DEFAULT_REGION if DEFAULT_REGION in regions else next(iter(regions)))  # fmt: skip
            table = {**doc, **regions[chosen], "region": chosen}
            names = tuple(regions)
        else:  # format 1: one region at the top level
            table, names = doc, (str(doc.get("region", "?")),)
        instances = {
            name: InstancePrice(
                name=name,
                vcpu=int(row["vcpu"]),
                memory_gib=float(row.get("memory_gib", 0)),
                usd_per_hour=float(row["usd_per_hour"]),
                emr_usd_per_hour=(
                    None if row.get("emr_usd_per_hour") is None else float(row["emr_usd_per_hour"])
                ),
            )
            for name, row in table["instances"].items()
        }
        return PriceTable(
            as_of=str(table["as_of"]),
            region=str(table.get("region", "?")),
            currency=str(doc.get("currency", "USD")),
            source=str(table.get("source", "")),
            minimum_seconds=int(doc.get("billing", {}).get("minimum_seconds", 60)),
            instances=instances,
            path=path,
            ebs_gb_month=float(table.get("ebs_gp3_usd_per_gb_month", 0.0)),
            ipv4_hour=float(table.get("public_ipv4_usd_per_hour", 0.0)),
            regions=names,
        )
    except OSError as exc:
        raise PlanError(f"{path}: cannot read the price table: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration) as exc:
        raise PlanError(
            f"{path}: not a price table (format fruitdask-prices/2): {type(exc).__name__} {exc}"
        ) from None


def instance_counts(*pairs: tuple[str, int]) -> dict[str, int]:
    """``{instance type: how many}`` from ``(type, n)`` pairs, a type named
    twice counted once with their sum (``estimate_usage``'s ``counts``)."""
    out: dict[str, int] = {}
    for itype, n in pairs:
        out[itype] = out.get(itype, 0) + n
    return out


def estimate_usage(
    service: str,
    region: str | None,
    counts: dict[str, int],
    *,
    seconds: float,
    ebs_gb_each: float,
    public_ipv4_each: int = 1,
    prices: PriceTable | None = None,
) -> dict[str, Any]:
    """Instance-hours of ``counts`` (instance type -> how many) running for
    ``seconds``, and their estimated price from the shipped table (for a
    manifest; the bill is AWS's)."""
    table = prices or load_prices(region=region)
    hours = seconds / 3600
    n = sum(counts.values())
    usd: float | None = 0.0
    for itype, count in counts.items():
        inst = table.instances.get(itype)
        if inst is None or usd is None:
            usd = None
            continue
        hourly = inst.hourly(service) if (service != "emr" or inst.emr_usd_per_hour) else None
        usd = (
            None
            if hourly is None
            else usd + count * hourly * max(hours, table.minimum_seconds / 3600)
        )
    if usd is not None:
        usd += (
            n
            * hours
            * (ebs_gb_each * table.ebs_gb_month / 730 + public_ipv4_each * table.ipv4_hour)
        )
    return {
        "service": service,
        "region": region or table.region,
        "instances": dict(counts),
        "seconds": round(seconds, 1),
        "instance_hours": round(n * hours, 4),
        "estimated_usd": None if usd is None else round(usd, 4),
        "prices": f"{table.region} on-demand as of {table.as_of} ({os.path.basename(table.path)})",
    }


#: A manifest whose fixed costs (listing, PCA fit, publish) are more than this
#: share of its work time measured mostly those: its per-core rate says little
#: about a large run (a 96-image run gave a rate ~6.5x below a 20,000-image one).
FIXED_SHARE_WARNING = 0.25
#: Below this many images a run's rate is not extrapolated without a warning,
#: whatever its timings say (they are a few seconds, and noisy).
SMALL_RUN_IMAGES = 10_000
_FIXED_STAGES = ("listing", "pca_fit", "publish")


def throughput_from_manifest(url: str) -> tuple[float, str, str | None]:
    """``(images_per_s_per_core, description, warning)`` from a run's ``manifest.json``.

    ``url`` is the manifest itself or the run's output folder (local or a URL).
    ``warning`` is set when the run was too small to extrapolate from: it names
    the fixed costs it saw.
    """
    from fruitdask import io

    if not url.endswith(".json"):
        url = io.join(url, "manifest.json")
    try:
        text = io.read_text(url)
    except io.StorageError as exc:
        raise PlanError(str(exc)) from None
    if text is None:
        raise PlanError(f"{url}: no such manifest")
    try:
        m = json.loads(text)
        rate = float(m["throughput"]["images_per_s_per_core"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PlanError(
            f"{url}: no throughput.images_per_s_per_core in it ({type(exc).__name__})"
        ) from None
    if not rate > 0:
        raise PlanError(f"{url}: images_per_s_per_core is {rate}")
    threads = (m.get("cluster") or {}).get("threads")
    images = (m.get("counts") or {}).get("images")
    what = f"{m.get('engine', 'dask')} run of {images:,} images" if images else "a run"
    on = f" on {threads} threads" if threads else ""
    return rate, f"measured: {what}{on} ({url})", _small_run_warning(m)


def _small_run_warning(m: dict[str, Any]) -> str | None:
    timings = {k: float(v) for k, v in (m.get("timings") or {}).items() if v is not None}
    images = int((m.get("counts") or {}).get("images") or 0)
    work = sum(v for k, v in timings.items() if k != "startup")
    fixed = {k: timings[k] for k in _FIXED_STAGES if k in timings}
    share = sum(fixed.values()) / work if work else 1.0
    if images >= SMALL_RUN_IMAGES and share <= FIXED_SHARE_WARNING:
        return None
    seen = ", ".join(f"{k.replace('_', ' ')} {v:.2f}s" for k, v in fixed.items())
    if "startup" in timings:
        seen += f"; cluster start-up {timings['startup']:.2f}s (not in the rate)"
    return (
        f"warning: the manifest's run is too small to extrapolate from: {images:,} images, "
        f"{share:.0%} of its {work:.2f}s of work were fixed costs ({seen}), so its "
        "per-core rate is pessimistic for a large run; plan from a run of "
        f"{SMALL_RUN_IMAGES:,} images or more, or without --manifest (the measured default)"
    )


def default_throughput(path: str | None = None) -> tuple[float, str, dict[str, Any]]:
    """``(images_per_s_per_core, description, document)`` from the committed
    benchmark result ``throughput.json`` (``benchmarks/throughput.py``)."""
    path = path or THROUGHPUT_JSON
    try:
        with open(path) as f:
            doc = json.load(f)
        rate = float(doc["images_per_s_per_core"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PlanError(f"{path}: no measured throughput ({type(exc).__name__}: {exc})") from None
    desc = (
        f"measured: {doc.get('images', 0):,} images, {doc.get('input', '?')}, "
        f"{doc.get('threads', '?')} threads, {doc.get('date', '?')}, by "
        f"{doc.get('command', 'benchmarks/throughput.py')} "
        f"(fruitdask/aws/{os.path.basename(path)})"
    )
    return rate, desc, doc


def parse_duration(text: str | float | int | None) -> float | None:
    """``"10m"``, ``"1h30m"`` (pieces summed), ``"90"`` or ``90`` as seconds."""
    if text is None:
        return None
    if isinstance(text, int | float):
        return float(text)
    import re

    pieces = re.findall(r"\d+(?:\.\d+)?\s*[a-zA-Z]*", text.strip())
    if not pieces or "".join(pieces).replace(" ", "") != text.replace(" ", ""):
        raise PlanError(f"not a duration: {text!r} (use 10m, 1h, 90s)")
    try:
        return float(sum(parse_timedelta(p.replace(" ", ""), default="s") for p in pieces))
    except (ValueError, KeyError):
        raise PlanError(f"not a duration: {text!r} (use 10m, 1h, 90s)") from None


@dataclass(frozen=True)
class Wait:
    """One part of what the person running the job waits for, with where the
    figure comes from and what would shorten it."""

    name: str
    seconds: float
    source: str
    cut: str = ""


@dataclass(frozen=True)
class Plan:
    """Workers and cost for one instance type; all times in seconds."""

    service: str
    images: int
    instance: InstancePrice
    head: InstancePrice
    workers: int
    rate_per_core: float
    efficiency: float
    startup_s: float
    deadline_s: float | None
    job_s: float
    usd_per_hour: float
    cost_usd: float
    teardown_s: float = 0.0

    @property
    def vcpus(self) -> int:
        return self.workers * self.instance.vcpu

    @property
    def wall_s(self) -> float:
        """Until the result is committed (start-up and work)."""
        return self.startup_s + self.job_s

    @property
    def total_s(self) -> float:
        """Until the command returns (the teardown after the commit included)."""
        return self.wall_s + self.teardown_s

    @property
    def meets_deadline(self) -> bool:
        return self.deadline_s is None or self.wall_s <= self.deadline_s + 1e-9


def plan_job(
    images: int,
    instance: InstancePrice,
    head: InstancePrice,
    *,
    rate_per_core: float,
    deadline_s: float | None = None,
    workers: int | None = None,
    efficiency: float = 1.0,
    startup_s: float = 0.0,
    teardown_s: float = 0.0,
    extras_per_hour: float = 0.0,
    service: str = "ec2",
    minimum_seconds: int = 60,
) -> Plan:
    """Plan ``images`` on ``instance`` workers plus one ``head`` node.

    Give ``deadline_s`` (the fewest workers that commit the result by it,
    start-up included) or ``workers`` (how long and how much with that many).
    Every instance is billed from start-up to the end of the teardown, at its
    hourly price plus ``extras_per_hour`` (its EBS volume and public IPv4).

    Raises
    ------
    PlanError
        Inconsistent inputs, or a deadline shorter than the start-up overhead.
    """
    if images < 1:
        raise PlanError(f"--images must be >= 1, got {images}")
    if not rate_per_core > 0:
        raise PlanError(f"throughput must be > 0 images/s per core, got {rate_per_core}")
    if not 0 < efficiency <= 1:
        raise PlanError(f"--efficiency must be in (0, 1], got {efficiency}")
    if service not in SERVICES:
        raise PlanError(f"service must be one of {SERVICES}, got {service!r}")
    per_worker = rate_per_core * efficiency * instance.vcpu  # images/s
    if workers is None:
        if deadline_s is None:
            raise PlanError("give a deadline or a number of workers")
        budget = deadline_s - startup_s
        if budget <= 0:
            raise PlanError(
                f"the deadline ({format_duration(deadline_s)}) is not longer than the start-up "
                f"overhead ({format_duration(startup_s)}): nothing is left for the work"
            )
        workers = max(1, math.ceil(images / (per_worker * budget) - 1e-9))
    elif workers < 1:
        raise PlanError(f"--workers must be >= 1, got {workers}")
    job_s = images / (per_worker * workers)
    usd_per_hour = (
        head.hourly(service) + workers * instance.hourly(service)
        + (workers + 1) * extras_per_hour
    )  # fmt: skip
    billed = max(startup_s + job_s + teardown_s, minimum_seconds)
    return Plan(
        service=service,
        images=images,
        instance=instance,
        head=head,
        workers=workers,
        rate_per_core=rate_per_core,
        efficiency=efficiency,
        startup_s=startup_s,
        deadline_s=deadline_s,
        job_s=job_s,
        usd_per_hour=usd_per_hour,
        cost_usd=usd_per_hour * billed / 3600,
        teardown_s=teardown_s,
    )


def compare(images: int, prices: PriceTable, head: InstancePrice, **kwargs: Any) -> list[Plan]:
    """:func:`plan_job` for every non-burstable type of the table, cheapest first.

    Types without a price for the service (EMR) are skipped.
    """
    service = kwargs.get("service", "ec2")
    plans = []
    for inst in prices.instances.values():
        if inst.name.startswith(_BURSTABLE):
            continue
        if service == "emr" and inst.emr_usd_per_hour is None:
            continue
        plans.append(plan_job(images, inst, head, **kwargs))
    # Ties (same cost) go to fewer, larger instances: fewer boots to fail.
    return sorted(plans, key=lambda p: (round(p.cost_usd, 4), p.workers, p.instance.name))


def _money(usd: float) -> str:
    return f"${usd:,.3f}" if usd < 1 else f"${usd:,.2f}"


def format_duration(s: float) -> str:
    """``95`` -> ``1m35s``, ``3900`` -> ``1h05m``."""
    s = round(s)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s" if s else f"{m}m"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def format_plan(
    best: Plan,
    prices: PriceTable,
    rate_source: str,
    alternatives: list[Plan] | None = None,
    waits: list[Wait] | None = None,
    notes: list[str] | None = None,
) -> str:
    """The human-readable plan: the inputs, the answer, what the person waits
    for (each figure with its source and what would cut it), the alternatives."""
    p = best
    head_role = "primary node (scheduler)" if p.service == "emr" else "scheduler instance"
    surcharge = " + EMR" if p.service == "emr" else ""
    lines = [
        f"plan: {p.images:,} images on {p.service.upper()}"
        + (f" by a deadline of {format_duration(p.deadline_s)}" if p.deadline_s else ""),
        f"  throughput:  {p.rate_per_core:,.0f} images/s per vCPU x efficiency {p.efficiency:g}"
        f" ({rate_source})",
        f"  start-up:    {format_duration(p.startup_s)} (billed, no work done)",
        f"  prices:      {prices.region} on-demand {prices.currency}{surcharge} with gp3 EBS "
        f"(${prices.ebs_gb_month:g}/GB-month) and a public IPv4 (${prices.ipv4_hour:g}/h) "
        f"per instance, as of {prices.as_of} ({os.path.basename(prices.path)})",
        "",
        f"workers:       {p.workers} x {p.instance.name} ({p.instance.vcpu} vCPU, "
        f"{p.instance.memory_gib:g} GiB) = {p.vcpus} vCPUs"
        f", plus 1 x {p.head.name} {head_role}",
        f"run time:      {format_duration(p.wall_s)} to the result ({format_duration(p.startup_s)} start-up "
        f"+ {format_duration(p.job_s)} work), {format_duration(p.total_s)} with the teardown"
        + ("" if p.meets_deadline else "  ** misses the deadline **"),
        f"cost:          {_money(p.cost_usd)} (${p.usd_per_hour:,.3f}/hour while up"
        + (", spot is cheaper but can be reclaimed" if p.service == "ec2" else "")
        + ")",
        f"quota:         {p.vcpus + p.head.vcpu} vCPUs of 'Running On-Demand Standard "
        "instances' (Service Quotas L-1216C47A) in the region",
    ]
    if waits:
        lines += ["", f"what you wait for on {p.service.upper()}:"]
        for w in waits:
            lines.append(f"  {w.name:<9} {format_duration(w.seconds):>7}  {w.source}")
            if w.cut:
                lines.append(f"  {'':<9} {'':>7}  cut it: {w.cut}")
        lines.append(f"  {'total':<9} {format_duration(sum(w.seconds for w in waits)):>7}")
    for note in notes or []:
        lines += ["", note]
    if alternatives:
        lines += ["", "alternatives (cheapest first):", _table(alternatives, best)]
    return "\n".join(lines)


def _table(plans: list[Plan], best: Plan) -> str:
    rows = [("instance", "vCPU", "workers", "run time", "$/hour", "cost", "")]
    for p in plans:
        rows.append(
            (
                p.instance.name,
                str(p.instance.vcpu),
                str(p.workers),
                format_duration(p.wall_s),
                f"{p.usd_per_hour:,.3f}",
                _money(p.cost_usd)[1:],
                "<- chosen" if p is best else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)
        ]
        out.append(("  " + "  ".join(cells) + ("  " + r[-1] if r[-1] else "")).rstrip())
    return "\n".join(out)


def waits(service: str, job_s: float | None = None, rate_source: str = "") -> list[Wait]:
    """The parts of a run's wall time on ``service`` (``fruitdask.aws.plan.waits``),
    with ``job_s`` as the work when given."""
    conf = (aws_config("plan.waits") or {}).get(service) or {}
    out = []
    for name in ("start", "install", "work", "teardown"):
        if name == "work":
            if job_s is not None:
                out.append(Wait("work", job_s, f"the images at the rate above ({rate_source})",
                                "more workers (the plan picks them for the deadline)"))  # fmt: skip
            continue
        entry = conf.get(name)
        if not entry:
            continue
        seconds = parse_duration(entry.get("time")) or 0.0
        out.append(Wait(name, seconds, str(entry.get("source", "")), str(entry.get("cut", ""))))
    return out


def defaults(service: str) -> dict[str, Any]:
    """Planning defaults for ``service``: dask.config ``fruitdask.aws.plan`` and
    the measured throughput (``throughput.json``) unless configured."""
    head = (
        aws_config("emr.primary-instance-type")
        if service == "emr"
        else aws_config("ec2.scheduler-instance-type")
    )
    configured = aws_config("plan.images-per-s-per-core")
    if configured is not None:
        rate, source = float(configured), "fruitdask.aws.plan.images-per-s-per-core"
    else:
        rate, source, _ = default_throughput()
    parts = {w.name: w.seconds for w in waits(service)}
    ebs = (aws_config("plan.ebs-gb") or {}).get(service, 0)
    return {
        "rate_per_core": rate,
        "rate_source": source,
        "efficiency": float(aws_config("plan.efficiency")),
        "startup_s": parts.get("start", 0.0) + parts.get("install", 0.0),
        "teardown_s": parts.get("teardown", 0.0),
        "ebs_gb": float(ebs),
        "deadline_s": parse_duration(aws_config("plan.deadline")),
        "head": head,
    }
