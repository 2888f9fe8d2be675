"""Throughput and peak memory against data set size and workers, as a table and a PNG.

    python benchmarks/scaling.py [--sizes 5000,10000,20000,30161,45000,90483]
                                 [--workers 1,2] [--workers-at 20000] [--out DIR]

Each point is one ``python -m fruitdask run`` in a subprocess (the whole command:
cluster start-up, listing, extraction, PCA, writing), on generated images. While
it runs, the resident memory of the whole process tree (client, scheduler,
nannies, workers) is sampled every 50 ms; the peak of the sum is reported.
Data is generated in a setup step (cached in the temp folder), never timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tree_rss(root_pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_once(data: Path, out: Path, cores: int | None) -> dict:
    """One run; ``cores=None``: fruitdask's default layout, else that many 1-thread workers."""
    layout = [] if cores is None else ["--workers", str(cores), "--threads-per-worker", "1"]
    cmd = [sys.executable, "-m", "fruitdask", "run", "-i", str(data), "-o", str(out),
           *layout, "--dashboard-address", "127.0.0.1:0", "--quiet",
           "--overwrite", "--no-report"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO))
    peak = 0
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    m = json.loads((out / "manifest.json").read_text())
    return {
        "images": m["counts"]["images"],
        "workers": m["cluster"].get("workers"),
        "threads": m["cluster"].get("threads"),  # in all
        "wall_s": round(wall, 2),
        "images_per_s_end_to_end": round(m["counts"]["images"] / wall, 1),
        "images_per_s_excl_startup": m["throughput"]["images_per_s"],
        "timings": m["timings"],
        "peak_rss_gib": round(peak / 2**30, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,10000,20000,30161,45000,90483")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--workers-at", type=int, default=20000)
    ap.add_argument(
        "--out",
        default=f"bench-results/scaling-{time.strftime('%Y%m%d-%H%M%S')}",
        help="a fresh folder by default; the committed figures only when asked "
        "(--out benchmarks/results)",
    )
    ap.add_argument("--render", action="store_true", help="only redraw OUT/scaling.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        saved = json.loads((out / "scaling.json").read_text())
        return render(saved["sizes"], saved["workers"], out, args.workers_at)

    from fruitdask import sample

    sizes = [int(x) for x in args.sizes.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="fruitdask-scaling-"))
    data = {}
    for n in sorted({*sizes, args.workers_at}):
        d = Path(tempfile.gettempdir()) / f"fruitdask-bench-{n}"
        sample.generate_total(d, n, seed=0)
        data[n] = d
    rows = []
    for n in sizes:
        r = run_once(data[n], tmp / f"out-{n}", None)
        rows.append(r)
        print(f"size {n:>6,}: {r}", flush=True)
    by_workers = []
    for w in workers:
        r = run_once(data[args.workers_at], tmp / f"out-w{w}", w)
        by_workers.append(r)
        print(f"workers {w}: {r}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps({"sizes": rows, "workers": by_workers}, indent=1))
    return render(rows, by_workers, out, args.workers_at)


def render(rows: list[dict], by_workers: list[dict], out: Path, workers_at: int) -> int:
    lines = [
        "| images | workers (threads in all) | wall s (all) | images/s (all) "
        "| images/s (excl. start-up) | peak RSS, process tree |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows + by_workers:
        lines.append(
            f"| {r['images']:,} | {r['workers']} ({r['threads']}) | {r['wall_s']:.1f} | "
            f"{r['images_per_s_end_to_end']:,.0f} | {r['images_per_s_excl_startup']:,.0f} | "
            f"{r['peak_rss_gib']:.2f} GiB |"
        )
    table = "\n".join(lines)
    (out / "scaling.md").write_text(table + "\n")
    print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["images"] for r in rows], [r["images_per_s_excl_startup"] for r in rows], "o-",
           label="excl. start-up")  # fmt: skip
    a.plot([r["images"] for r in rows], [r["images_per_s_end_to_end"] for r in rows], "s--",
           label="whole command")  # fmt: skip
    a.set_xlabel("images")
    a.set_ylabel("images/s")
    lay = f"{rows[0]['workers']} worker(s), {rows[0]['threads']} threads"
    a.set_title(f"throughput vs data set size ({lay})")
    a.legend()
    a.set_ylim(bottom=0)
    a2 = a.twinx()
    a2.plot([r["images"] for r in rows], [r["peak_rss_gib"] for r in rows], "^:", color="grey")
    a2.set_ylabel("peak RSS of the process tree, GiB (grey)")
    a2.set_ylim(bottom=0)
    b.bar([str(r["workers"]) for r in by_workers],
          [r["images_per_s_excl_startup"] for r in by_workers])  # fmt: skip
    b.set_xlabel("workers (1 thread each)")
    b.set_ylabel("images/s (excl. start-up)")
    b.set_title(f"throughput vs workers ({workers_at:,} images)")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=100)
    print(f"wrote {out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
