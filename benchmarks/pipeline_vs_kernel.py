"""Pipeline vs raw kernel, in one run on the same images.

    python benchmarks/pipeline_vs_kernel.py [--input DIR_OR_URL | --images N] [--cores N]
                                            [--repeat K] [--json FILE]

Measures, alternating, K times:

* ``kernel-1``: read + decode + ORB over every file in one process (a plain loop);
* ``kernel-N``: the same loop split over N processes (what the cores can do);
* ``pipeline``: ``fruitdask.pipeline.run`` end to end (listing to ``_SUCCESS``) on a
  local Dask cluster in fruitdask's default layout for N cores (N single-threaded
  workers); cluster start-up is timed and reported separately, as it is paid once per session.

* ``command``: the whole ``python -m fruitdask run --quiet --no-report`` in a
  subprocess, as a user types it: interpreter start, imports, cluster start-up,
  the job, shutdown and exit.

Prints images/s for each, the ratio pipeline / kernel-N (goal: >= 85% at 20,000
images) and the whole command's time over kernel-N's for the same images
(goal: <= 1.35x at 90,483). Data is generated in a setup step, never timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _kernel_chunk(args: tuple[str, Any, dict]) -> tuple[int, int]:
    from fruitdask import source
    from fruitdask.features import OrbParams, extract

    root, rows, so = args
    params = OrbParams()
    n_desc = 0
    # the job's own reader: loose files or packed shards alike
    for b in source.iter_images(root, rows, so):
        if isinstance(b, bytes):
            n_desc += len(extract(b, params).descriptors)
    return len(rows), n_desc


def kernel(root: str, listing: Any, so: dict, procs: int) -> tuple[float, int]:
    """Seconds for read + decode + ORB over the ``listing``'s images in ``procs`` processes."""
    chunk = 500
    chunks = [(root, listing.iloc[i : i + chunk], so) for i in range(0, len(listing), chunk)]
    if procs == 1:
        t = time.perf_counter()
        n = sum(_kernel_chunk(c)[1] for c in chunks)
        return time.perf_counter() - t, n
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_kernel_chunk, chunks[:procs]))  # warm the processes (imports)
        t = time.perf_counter()
        n = sum(r[1] for r in pool.map(_kernel_chunk, chunks))
        return time.perf_counter() - t, n


def command(root: str, out: str, so: dict) -> float:
    """Seconds for the whole ``fruitdask run`` command, start to exit."""
    cmd = [sys.executable, "-m", "fruitdask", "run", "--input", root, "--output", out,
           "--quiet", "--no-report"]  # fmt: skip
    if so.get("endpoint_url"):
        cmd += ["--endpoint-url", so["endpoint_url"]]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                   cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", help="image folder or URL (default: generate --images)")
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--endpoint-url")
    ap.add_argument("--pca", default="incremental")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    from fruitdask import pipeline, sample, source
    from fruitdask.config import RunConfig

    so = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {}
    tmp = tempfile.mkdtemp(prefix="fruitdask-bench-")
    if args.input is None:
        cache = Path(tempfile.gettempdir()) / f"fruitdask-bench-{args.images}"
        s = sample.generate_total(cache, args.images, seed=0)
        print(f"data: {cache} ({s.training + s.test} images, generated in {s.seconds:.1f}s)")
        args.input = str(cache)
    listing = source.list_input(args.input, so)
    n = len(listing)
    print(f"images: {n:,}  cores: {args.cores}  repeat: {args.repeat}")

    from fruitdask.cluster import connect, local_layout
    from fruitdask.config import ClusterSpec

    workers, threads = local_layout(None, None, args.cores)
    spec = ClusterSpec(workers=workers, threads_per_worker=threads, dashboard_address=":0")
    session = connect(spec)
    client, startup = session.__enter__()
    t = time.perf_counter()
    pipeline.preload(args.pca)  # the client's imports, once per session like the cluster
    startup += time.perf_counter() - t

    rows: dict[str, list[float]] = {
        "kernel-1": [], f"kernel-{args.cores}": [], "pipeline": [], "command": []
    }  # fmt: skip
    kernel_s: list[float] = []
    command_s: list[float] = []
    stages: list[dict] = []
    for k in range(args.repeat):
        sec, nd = kernel(args.input, listing, so, 1)
        rows["kernel-1"].append(n / sec)
        sec, nd_n = kernel(args.input, listing, so, args.cores)
        rows[f"kernel-{args.cores}"].append(n / sec)
        kernel_s.append(sec)
        command_s.append(command(args.input, os.path.join(tmp, f"cmd-{k}"), so))
        rows["command"].append(n / command_s[-1])
        out = os.path.join(tmp, f"out-{k}")
        cfg = RunConfig(input=args.input, output=out, storage_options=so, pca_method=args.pca)
        t = time.perf_counter()
        summ = pipeline.run(cfg, client)
        sec = time.perf_counter() - t
        rows["pipeline"].append(n / sec)
        stages.append(summ.timings)
        assert summ.descriptors == nd == nd_n, (summ.descriptors, nd, nd_n)
        print(
            f"  round {k + 1}: kernel-1 {rows['kernel-1'][-1]:,.0f}/s, "
            f"kernel-{args.cores} {rows[f'kernel-{args.cores}'][-1]:,.0f}/s, "
            f"pipeline {rows['pipeline'][-1]:,.0f}/s, command {command_s[-1]:.2f}s "
            f"({', '.join(f'{a} {b:.2f}s' for a, b in summ.timings.items())})"
        )
    session.__exit__(None, None, None)

    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["pipeline"] / med[f"kernel-{args.cores}"]
    print()
    print("| measure | images/s (median) | spread |")
    print("|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {med[k]:,.0f} | {min(v):,.0f}-{max(v):,.0f} |")
    print(f"| pipeline / kernel-{args.cores} | {ratio:.0%} | |")
    whole = statistics.median(command_s) / statistics.median(kernel_s)
    print(
        f"| whole command's time / kernel-{args.cores}'s | {whole:.2f}x "
        f"({statistics.median(command_s):.2f} s / {statistics.median(kernel_s):.2f} s) | |"
    )
    print(f"| cluster start-up (once) | {startup:.2f} s | |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "images": n,
                    "cores": args.cores,
                    "images_per_s": rows,
                    "median": med,
                    "ratio": ratio,
                    "command_s": command_s,
                    "kernel_s": kernel_s,
                    "command_over_kernel": whole,
                    "startup_s": startup,
                    "stages": stages,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
