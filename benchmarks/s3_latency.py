"""`fruitdask run` from S3 against request latency: loose objects and packed shards.

    python benchmarks/s3_latency.py [--images 5000] [--delays 0,20,50] [--repeat 3]
                                    [--variant NAME[:VAR=VALUE,...]] ... [--read-path]
                                    [--out DIR]

SeaweedFS on loopback (``fruitdask.testing.S3Server``, the server the tests use)
answers a small GET in ~1 ms; real S3 takes tens of milliseconds. Here every
request goes through ``fruitdask.testing.LatencyProxy``, which holds each HTTP
request for ``--delays`` milliseconds (0 included: the proxy's own cost is in
every rate, so the ratios measure latency alone). The input is N generated
images uploaded as loose objects, and the same packed into Parquet shards by
``fruitdask pack`` (S3 to S3, through the proxy, so its requests are counted).

A local cluster (fruitdask's default layout) per variant, all started at once
and warmed with a small run; then each round runs ``fruitdask.pipeline.run``
S3 -> local disk for every input and delay (the delays' order rotating from
round to round), the variants back to back. A variant sets environment
variables for its workers (e.g. a DASK_* setting to compare); the default is
one variant, as the code is. ``--read-path`` also times the read
path alone, in this process: two threads (a worker's two tasks) each read
1,000 images with ``source.iter_images`` (1,000 loose objects, or one partition
of the packed input) and run decode + ORB on them, each variant through its
own proxy (its own pyarrow client), alternating. That has no cluster, PCA or
writes in it, so it is less noisy on a shared machine.

Prints images/s per input, variant and delay (median of the rounds, and the
median of the rounds' ratios to 0 ms), the requests each run made, and what
S3 would charge for them at the size of Fruits-360 (90,483 images). Writes
``results.json`` and ``results.png`` to ``--out`` (default: a fresh folder
under ``bench-results/``, which git ignores).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FRUITS_360 = 90_483

#: Amazon S3 Standard request prices, USD per 1,000 requests, as listed on
#: https://aws.amazon.com/s3/pricing/ ("Requests & data retrievals", S3 Standard)
#: in 2025: "PUT, COPY, POST, LIST requests" $0.005 and "GET, SELECT, and all
#: other requests" $0.0004 (HEAD is one of the "other" requests), the same in US
#: East (N. Virginia) us-east-1 and Europe (Ireland) eu-west-1. Not re-read from
#: here (this machine has no internet): check the page before quoting. DELETE is
#: free; transfer to EC2 in the same region is free.
S3_PRICES = {
    "us-east-1": {"tier1": 0.005, "tier2": 0.0004},
    "eu-west-1": {"tier1": 0.005, "tier2": 0.0004},
}
PRICES_AS_OF = "2025"
TIER1 = ("PUT", "POST", "COPY", "LIST")


def s3_operation(method: str, target: str) -> str:
    """The S3 operation (as billed) of an HTTP request: LIST, GET, HEAD, PUT, ..."""
    _, _, query = target.partition("?")
    params = {p.split("=", 1)[0] for p in query.split("&") if p}
    if method == "GET" and ("list-type" in params or "prefix" in params or "delimiter" in params):
        return "LIST"
    return method


class RequestLog:
    """Counts the proxy's requests by S3 operation, into the current bucket."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()

    def __call__(self, method: str, target: str) -> None:
        with self.lock:
            self.counts[s3_operation(method, target)] += 1

    def take(self) -> dict[str, int]:
        with self.lock:
            out = dict(self.counts)
            self.counts.clear()
        return out


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assigns = text.partition(":")
    env = {}
    for a in filter(None, assigns.split(",")):
        k, sep, v = a.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text!r}: expected NAME:VAR=VALUE,...")
        env[k] = v
    return name, env


class _env:
    """Environment variables set for a while (a cluster's start: its workers inherit them)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.old = env, {}

    def __enter__(self) -> None:
        for k, v in self.env.items():
            self.old[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc: object) -> None:
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def packed_partitions(
    n: int, threads: int, shard_size: int = 5000, row_group: int = 250, partition_size: int = 1000
) -> int:
    """How many tasks ``run`` makes of a pack of ``n`` images (pack's and run's own plans)."""
    import pandas as pd

    from fruitdask.partition import plan_packed_partitions, plan_shards

    shard, group = [], []
    for i, (a, b) in enumerate(plan_shards(n, shard_size, threads)):
        shard += [str(i)] * (b - a)
        group += [j // row_group for j in range(b - a)]
    listing = pd.DataFrame({"shard": shard, "row_group": group})
    return len(plan_packed_partitions(listing, partition_size))


def request_costs(runs: list[dict], n: int, pack_requests: dict, threads: int) -> dict:
    """Requests of ``pack`` and of ``run`` (loose vs packed), scaled to Fruits-360.

    Measured at ``n`` images, then scaled by what each count follows: LIST by the
    listing's pages (1,000 keys each; other LISTs stay), pack's PUTs by its shards
    (the 3 small files stay), a packed run's requests by its tasks, and every
    other count by the images.
    """
    import numpy as np

    from fruitdask.partition import plan_shards

    f = FRUITS_360
    pages = (math.ceil(n / 1000), math.ceil(f / 1000))
    shards = (len(plan_shards(n, 5000, threads)), len(plan_shards(f, 5000, threads)))
    tasks = (packed_partitions(n, threads), packed_partitions(f, threads))

    def median(rows: list[dict]) -> dict[str, float]:
        return {
            k: float(np.median([r.get(k, 0) for r in rows])) for k in {k for r in rows for k in r}
        }

    def scale(counts: dict[str, float], job: str) -> dict[str, int]:
        out = {}
        for op, c in counts.items():
            if op == "LIST" and c >= pages[0]:
                out[op] = c - pages[0] + pages[1]
            elif op == "PUT" and job == "pack":
                out[op] = c - shards[0] + shards[1]
            elif job == "run, packed":
                out[op] = c * tasks[1] / tasks[0]
            else:
                out[op] = c * f / n
        return {k: round(v) for k, v in sorted(out.items())}

    measured = {
        "pack": dict(pack_requests),
        "run, loose": median([r["requests"] for r in runs if r["input"] == "loose"]),
        "run, packed": median([r["requests"] for r in runs if r["input"] == "packed"]),
    }
    scaled = {job: scale(c, job) for job, c in measured.items()}
    usd = {}
    for job, counts in scaled.items():
        t1 = sum(v for k, v in counts.items() if k in TIER1)
        t2 = sum(v for k, v in counts.items() if k not in TIER1 and k != "DELETE")
        usd[job] = {
            region: round(t1 / 1000 * p["tier1"] + t2 / 1000 * p["tier2"], 4)
            for region, p in S3_PRICES.items()
        }
    return {
        "measured_at_images": n,
        "measured": measured,
        "images": f,
        "shards": shards,
        "packed_run_tasks": tasks,
        "scaled": scaled,
        "usd": usd,
    }


def summarise(runs: list[dict], variants, inputs: list[str], delays: list[int]) -> list[dict]:
    """Per variant, input and delay: median rates, and ratios to the first delay taken
    round by round (a round's runs are minutes apart, the rounds further), then the median."""
    summary = []
    for vname, _ in variants:
        for name in inputs:
            cell = {
                (x["round"], x["delay_ms"]): x
                for x in runs
                if (x["variant"], x["input"]) == (vname, name)
            }
            rounds = sorted({r for r, _ in cell})
            for d in delays:
                v = [cell[r, d] for r in rounds]
                rates = [x["images_per_s"] for x in v]
                ratios = [
                    cell[r, d]["images_per_s"] / cell[r, delays[0]]["images_per_s"] for r in rounds
                ]
                extract_ratios = [
                    cell[r, d]["extract_images_per_s"] / cell[r, delays[0]]["extract_images_per_s"]
                    for r in rounds
                ]
                summary.append(
                    {
                        "variant": vname,
                        "input": name,
                        "delay_ms": d,
                        "images_per_s": statistics.median(rates),
                        "min": min(rates),
                        "max": max(rates),
                        "ratio": round(statistics.median(ratios), 3),
                        "ratios": [round(x, 3) for x in ratios],
                        "extract_images_per_s": statistics.median(
                            x["extract_images_per_s"] for x in v
                        ),
                        "extract_ratio": round(statistics.median(extract_ratios), 3),
                    }
                )
    return summary


def plot(summary: list[dict], path: Path, title: str, reads: list[dict] | None = None) -> None:
    """Throughput against latency, and both ratios to 0 ms, one line per input and variant;
    with ``reads``, a fourth panel for the read path alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), constrained_layout=True)
    (ax, px), (rx, ex) = axes
    keys = sorted({(s["variant"], s["input"]) for s in summary})
    variants = list(dict.fromkeys(s["variant"] for s in summary))  # as given: the last solid
    colours = dict(zip(keys, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for key in keys:
        pts = sorted(
            (s for s in summary if (s["variant"], s["input"]) == key), key=lambda s: s["delay_ms"]
        )
        x = [s["delay_ms"] for s in pts]
        label = key[1] + (f", {key[0]}" if len(variants) > 1 else "")
        style = {"color": colours[key], "marker": "o" if key[1] == "loose" else "s",
                 "ls": "-" if key[0] == variants[-1] else "--"}  # fmt: skip
        err = [
            [s["images_per_s"] - s["min"] for s in pts],
            [s["max"] - s["images_per_s"] for s in pts],
        ]
        ax.errorbar(x, [s["images_per_s"] for s in pts], yerr=err, capsize=3, label=label, **style)
        rx.plot(x, [100 * s["ratio"] for s in pts], label=label, **style)
        ex.plot(x, [100 * s["extract_ratio"] for s in pts], label=label, **style)
    ax.set_ylabel("images/s (median of rounds; bars: min-max)")
    ax.set_title("Throughput of fruitdask run")
    ax.set_ylim(bottom=0)
    rx.set_title("Whole run, % of its 0 ms rate")
    ex.set_title("Extraction stage (reads + ORB), % of 0 ms")
    for a in (rx, ex):
        for goal, what in ((95, "packed"), (75, "loose")):
            a.axhline(goal, color="grey", lw=0.8, ls=":")
            a.annotate(f"goal at 20 ms, {what}: {goal}%", (1, goal), xycoords=("axes fraction", "data"),
                       xytext=(-4, -10), textcoords="offset points", ha="right", fontsize=8, color="grey")  # fmt: skip
        a.set_ylabel("% (median of the rounds' ratios)")
        a.set_ylim(
            0, max(115, 10 + max(100 * s[k] for s in summary for k in ("ratio", "extract_ratio")))
        )
    for key in keys:
        pts = sorted(
            (x for x in reads or [] if (x["variant"], x["input"]) == key),
            key=lambda x: x["delay_ms"],
        )
        if pts:
            label = key[1] + (f", {key[0]}" if len(variants) > 1 else "")
            px.plot([x["delay_ms"] for x in pts], [x["images_per_s"] for x in pts], label=label,
                    color=colours[key], marker="o" if key[1] == "loose" else "s",
                    ls="-" if key[0] == variants[-1] else "--")  # fmt: skip
            for x in pts:
                px.annotate(f"{100 * x['ratio']:.0f}%", (x["delay_ms"], x["images_per_s"]),
                            xytext=(4, 4), textcoords="offset points", fontsize=8)  # fmt: skip
    px.set_title("Read path alone: 2 threads read + decode 1,000 images each")
    px.set_ylabel("images/s (median of rounds; labels: % of 0 ms)")
    px.set_ylim(bottom=0)
    if not reads:
        px.text(0.5, 0.5, "not measured (--read-path)", ha="center", transform=px.transAxes)
    for a in (ax, px, rx, ex):
        a.set_xlabel("added latency per request (ms)")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
        a.set_xticks(sorted({s["delay_ms"] for s in summary}))
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _timed_run(client, url: str, so: dict, work: Path, n: int, log: RequestLog) -> dict:
    """One ``pipeline.run`` of ``url`` to a local folder (removed after): its rates and requests."""
    from fruitdask import pipeline
    from fruitdask.config import RunConfig

    out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    cfg = RunConfig(input=url, output=str(out / "features"), storage_options=so)
    log.take()
    load = _load()
    t = time.perf_counter()
    with client.as_current():  # more than one client here: dask-ml's fit uses the current
        s = pipeline.run(cfg, client)
    sec = time.perf_counter() - t
    requests = log.take()
    shutil.rmtree(out, ignore_errors=True)
    assert s.images == n, (s.images, n)
    return {
        "seconds": round(sec, 3),
        "images_per_s": round(n / sec, 1),
        "extract_images_per_s": round(n / s.timings["extract"], 1),
        "partitions": s.partitions,
        "timings": {k: round(v, 3) for k, v in s.timings.items()},
        "requests": requests,
        "load_before": load,
    }


def read_path(
    server, bucket: str, variants, inputs: list[str], delays: list[int], rounds: int
) -> list[dict]:
    """The read path alone: 2 threads each read and decode 1,000 images (loose objects, or
    one partition of the packed input, as a task would), per input and variant."""
    from fruitdask import features, pipeline, source
    from fruitdask.testing import LatencyProxy

    runs: list[dict] = []
    params = features.OrbParams()
    with contextlib.ExitStack() as stack:
        proxies, so, halves = {}, {}, {}
        for vname, env in variants:
            proxies[vname] = stack.enter_context(LatencyProxy(("127.0.0.1", server.port), 0.0))
            so[vname] = {**server.storage_options, "endpoint_url": proxies[vname].endpoint_url}
            with _env(env):  # this variant's pyarrow client is made now, with its settings
                for name in inputs:
                    listing = source.list_input(f"{bucket}/{name}", so[vname])
                    if name == "packed":
                        ranges = pipeline.plan_packed_partitions(listing, 1000)[:2]
                    else:
                        ranges = [(0, 1000), (1000, 2000)]
                    halves[name] = [listing.iloc[i:j] for i, j in ranges]
        for r in range(rounds):
            k = r % len(delays)
            for name in inputs:
                for d in [*delays[k:], *delays[:k]]:
                    for vname, env in variants if r % 2 == 0 else variants[::-1]:
                        proxies[vname].request_delay = d / 1000

                        def work(rows, v=vname, url=f"{bucket}/{name}"):
                            orb = params.create()
                            for blob in source.iter_images(url, rows, so[v]):
                                features.extract(blob, params, orb)

                        with _env(env):
                            threads = [
                                threading.Thread(target=work, args=(h,)) for h in halves[name]
                            ]
                            load = _load()
                            t = time.perf_counter()
                            for th in threads:
                                th.start()
                            for th in threads:
                                th.join()
                            sec = time.perf_counter() - t
                        n = sum(len(h) for h in halves[name])
                        runs.append({"round": r, "variant": vname, "input": name, "delay_ms": d,
                                     "images_per_s": round(n / sec, 1), "load_before": load})  # fmt: skip
                        print(f"  read path, round {r} {name:>6} {d:3d} ms {vname:>8}: "
                              f"{n / sec:6.0f} images/s, load {load[0]}", flush=True)  # fmt: skip
        peaks = {v: p.stats.peak for v, p in proxies.items()}
    print(f"  read path: most connections open at once, per variant: {peaks}")
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--delays", default="0,20,50", help="ms added per request (default 0,20,50)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--inputs", default="loose,packed")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[:VAR=VALUE,...]")
    ap.add_argument(
        "--workers", type=int, help="worker processes of one thread (default: fruitdask's layout)"
    )
    ap.add_argument("--read-path", action="store_true", help="also time the read path alone")
    ap.add_argument("--out", type=Path, help="folder for results.json and results.png")
    args = ap.parse_args(argv)

    from fruitdask import pack, pipeline, sample
    from fruitdask.cluster import ClusterSpec, connect
    from fruitdask.config import RunConfig
    from fruitdask.testing import LatencyProxy, S3Server

    # a kill runs the finally blocks below (SeaweedFS is in its own session, so it
    # would otherwise outlive the benchmark)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    delays = [int(d) for d in args.delays.split(",")]
    inputs = [i for i in args.inputs.split(",") if i]
    variants = [_variant(v) for v in args.variant] or [("default", {})]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out or REPO / "bench-results" / f"s3-latency-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = None if args.workers is None else 1
    spec = ClusterSpec(workers=args.workers, threads_per_worker=threads, dashboard_address=":0")

    data = Path(tempfile.gettempdir()) / f"fruitdask-bench-{args.images}"
    sample.generate_total(data, args.images, seed=0)
    work = Path(tempfile.mkdtemp(prefix="fruitdask-s3latency-"))
    server = S3Server(work / "weed")
    log = RequestLog()
    load_start = _load()
    try:
        server.start()
        bucket = server.make_bucket()
        t = time.perf_counter()
        n = server.upload_tree(data, f"{bucket}/loose")
        print(f"uploaded {n:,} objects in {time.perf_counter() - t:.1f}s; load {load_start}")
        with LatencyProxy(("127.0.0.1", server.port), request_delay=0.0, on_request=log) as proxy:
            so = {**server.storage_options, "endpoint_url": proxy.endpoint_url}
            urls = {"loose": f"{bucket}/loose", "packed": f"{bucket}/packed"}
            with connect(spec) as (client, _):
                log.take()
                t = time.perf_counter()
                ps = pack.pack(urls["loose"], urls["packed"], client, so)
                threads = sum(client.nthreads().values())
                packed_meta = {
                    "seconds": round(time.perf_counter() - t, 2),
                    "shards": ps.shards,
                    "requests": log.take(),
                }
            print(f"packed S3 -> S3 in {packed_meta['seconds']}s: {packed_meta['requests']}")
            # a first class folder, to warm each new cluster (imports, connections)
            first = sorted(p for p in (data / "Training").iterdir() if p.is_dir())[0].name
            warm_url = f"{urls['loose']}/Training/{first}"

            runs: list[dict] = []
            with contextlib.ExitStack() as clusters:
                # one cluster per variant, all up at once, so the variants' runs of a
                # delay follow each other within seconds (the machine's load drifts)
                clients = {}
                for vname, env in variants:
                    with _env(env):
                        clients[vname], _ = clusters.enter_context(connect(spec))
                pipeline.preload("incremental")
                for client in clients.values():  # imports, connections
                    warm = RunConfig(input=warm_url, output=str(work / "warm"),
                                     storage_options=so, overwrite=True)  # fmt: skip
                    with client.as_current():
                        pipeline.run(warm, client)
                for r in range(args.repeat):
                    k = r % len(delays)
                    order = [*delays[k:], *delays[:k]]
                    names = list(clients) if r % 2 == 0 else list(clients)[::-1]
                    for name in inputs:
                        for d in order:
                            proxy.request_delay = d / 1000
                            for vname in names:
                                runs.append(
                                    _timed_run(clients[vname], urls[name], so, work, n, log)
                                    | {"round": r, "variant": vname, "input": name, "delay_ms": d}
                                )
                                x = runs[-1]
                                print(
                                    f"  round {r} {name:>6} {d:3d} ms {vname:>8}: "
                                    f"{x['images_per_s']:6.0f} images/s "
                                    f"(extract {x['extract_images_per_s']:5.0f}), "
                                    f"load {x['load_before'][0]}, {x['requests']}",
                                    flush=True,
                                )
            proxy_stats = {"connections": proxy.stats.connections, "peak": proxy.stats.peak}
            assert proxy.errors == [], proxy.errors
        reads = (
            read_path(server, bucket, variants, inputs, delays, args.repeat)
            if args.read_path
            else []
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    load_end = _load()

    summary = summarise(runs, variants, inputs, delays)
    both = {"loose", "packed"} <= set(inputs)
    costs = request_costs(runs, n, packed_meta["requests"], threads) if both else None

    print()
    print(f"{n:,} images, {args.repeat} rounds, load average {load_start} -> {load_end}")
    print("images/s of the whole run, median of the rounds (% of 0 ms: median of the rounds' own")
    print("ratios); in brackets the extraction stage alone (the reads and ORB), same form:")
    print(f"| input | variant | {' | '.join(f'{d} ms' for d in delays)} |")
    print(f"|---|---|{'---|' * len(delays)}")
    for vname, _ in variants:
        for name in inputs:
            cells = []
            for d in delays:
                s = next(
                    x
                    for x in summary
                    if (x["variant"], x["input"], x["delay_ms"]) == (vname, name, d)
                )
                cells.append(
                    f"{s['images_per_s']:,.0f} ({100 * s['ratio']:.0f}%) "
                    f"[{s['extract_images_per_s']:,.0f} ({100 * s['extract_ratio']:.0f}%)]"
                )
            print(f"| {name} | {vname} | {' | '.join(cells)} |")
    read_summary = []
    if reads:
        print()
        print("read path alone (2 threads x 1,000 images, decode + ORB), images/s, median of the")
        print("rounds (% of 0 ms: median of the rounds' ratios):")
        print(f"| input | variant | {' | '.join(f'{d} ms' for d in delays)} |")
        print(f"|---|---|{'---|' * len(delays)}")
        for name in inputs:
            for vname, _ in variants:
                cell = {
                    (x["round"], x["delay_ms"]): x["images_per_s"]
                    for x in reads
                    if (x["variant"], x["input"]) == (vname, name)
                }
                rounds = sorted({r for r, _ in cell})
                cells = []
                for d in delays:
                    rate = statistics.median(cell[r, d] for r in rounds)
                    ratio = statistics.median(cell[r, d] / cell[r, delays[0]] for r in rounds)
                    read_summary.append({"variant": vname, "input": name, "delay_ms": d,
                                         "images_per_s": rate, "ratio": round(ratio, 3)})  # fmt: skip
                    cells.append(f"{rate:,.0f} ({100 * ratio:.0f}%)")
                print(f"| {name} | {vname} | {' | '.join(cells)} |")
    if costs:
        print()
        print(
            f"S3 requests for {FRUITS_360:,} images (measured at {n:,}, scaled), "
            f"and their price (S3 Standard, prices of {PRICES_AS_OF}):"
        )
        print("| job | GET | HEAD | LIST | PUT | us-east-1 | eu-west-1 |")
        print("|---|---|---|---|---|---|---|")
        for what, c in costs["scaled"].items():
            usd = costs["usd"][what]
            print(
                f"| {what} | {c.get('GET', 0):,} | {c.get('HEAD', 0):,} | {c.get('LIST', 0):,} | "
                f"{c.get('PUT', 0) + c.get('POST', 0):,} | ${usd['us-east-1']:.4f} | ${usd['eu-west-1']:.4f} |"
            )

    result = {
        "benchmark": "s3_latency",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(
            ["python", "benchmarks/s3_latency.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_start": load_start,
            "load_end": load_end,
        },
        "images": n,
        "delays_ms": delays,
        "variants": dict(variants),
        "pack": packed_meta,
        "proxy": proxy_stats,
        "summary": summary,
        "runs": runs,
        "read_path": {"summary": read_summary, "runs": reads},
        "request_costs": costs,
        "s3_prices_usd_per_1000": S3_PRICES,
        "s3_prices_as_of": PRICES_AS_OF,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    title = (
        f"fruitdask run, {n:,} images from SeaweedFS through LatencyProxy, {args.repeat} rounds, "
        f"{os.cpu_count()} CPUs; load average {load_start[0]} -> {load_end[0]}"
    )
    plot(summary, out_dir / "results.png", title, read_summary)
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'results.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
