"""What each S3 change buys: the pipeline reading loose objects from SeaweedFS.

    python benchmarks/s3_throughput.py [--images N] [--repeat K] [--packed]

Starts SeaweedFS on loopback (``fruitdask.testing.S3Server``, the server the tests
use, on the same cores as the job), uploads N generated images as loose objects,
then runs ``fruitdask.pipeline.run`` S3 -> local with each S3 back-end (the
storage option ``s3_client``):

* ``s3fs``: s3fs with fruitdask's settings (no HEAD, pool of 64, retries);
* ``arrow``: pyarrow's C++ S3 client, reading ahead in threads (the default).

With ``--packed`` it also packs the bucket into Parquet shards of image bytes
(``fruitdask pack``) and runs from those. The local-disk rate on the same images
is measured in the same run for reference. Prints images/s per setting.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _run(cfg, workers: int | None, client_kind: str) -> tuple[float, dict]:
    from fruitdask import pipeline
    from fruitdask.cluster import connect
    from fruitdask.config import ClusterSpec

    if client_kind in ("arrow", "s3fs"):  # the S3 back-end is a storage option
        so = {**cfg.storage_options, "s3_client": client_kind}
        cfg = cfg.with_(storage_options=so, output_storage_options=cfg.out_storage_options)
    # fruitdask's default layout unless --workers (then one thread each)
    threads = None if workers is None else 1
    spec = ClusterSpec(workers=workers, threads_per_worker=threads, dashboard_address=":0")
    with connect(spec) as (client, _):
        pipeline.preload(cfg.pca_method)
        t = time.perf_counter()
        s = pipeline.run(cfg, client)
        return time.perf_counter() - t, s.timings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--workers", type=int, help="worker processes of one thread (default: fruitdask's layout)"
    )
    ap.add_argument("--packed", action="store_true", help="also run from packed shards")
    ap.add_argument("--clients", default="s3fs,arrow", help="S3 back-ends for loose objects")
    ap.add_argument("--shard-size", type=int, default=None, help="pack shard size")
    args = ap.parse_args(argv)

    from fruitdask import sample
    from fruitdask.config import RunConfig
    from fruitdask.testing import S3Server

    data = Path(tempfile.gettempdir()) / f"fruitdask-bench-{args.images}"
    sample.generate_total(data, args.images, seed=0)
    work = Path(tempfile.mkdtemp(prefix="fruitdask-s3bench-"))
    server = S3Server(work / "weed")
    server.start()
    try:
        so = server.storage_options
        bucket = server.make_bucket()
        t = time.perf_counter()
        n = server.upload_tree(data, f"{bucket}/loose")
        print(f"uploaded {n:,} objects in {time.perf_counter() - t:.1f}s")
        inputs = [(k, f"{bucket}/loose", so) for k in args.clients.split(",") if k]
        if args.packed:
            from fruitdask import pack
            from fruitdask.cluster import connect
            from fruitdask.config import ClusterSpec

            spec = ClusterSpec(workers=args.workers, threads_per_worker=1, dashboard_address=":0")
            with connect(spec) as (client, _):
                t = time.perf_counter()
                kw = {"shard_size": args.shard_size} if args.shard_size else {}
                pack.pack(f"{bucket}/loose", f"{bucket}/packed", client, so, **kw)
                print(f"packed S3 -> S3 in {time.perf_counter() - t:.1f}s")
            inputs.append(("arrow", f"{bucket}/packed", so))
        inputs.append(("local", str(data), {}))
        rates: dict[str, list[float]] = {}
        for k in range(args.repeat):
            for kind, url, opts in inputs:
                name = f"{kind} {'packed' if url.endswith('packed') else 'loose'}"
                if kind == "local":
                    name = "local disk"
                out = str(work / f"out-{name.replace(' ', '-')}-{k}")
                cfg = RunConfig(input=url, output=out, storage_options=opts)
                cpu0 = _cpu(server.proc.pid)
                sec, timings = _run(cfg, args.workers, kind if kind != "local" else "arrow")
                server_cpu = _cpu(server.proc.pid) - cpu0
                rates.setdefault(name, []).append(n / sec)
                print(
                    f"  {name}: {n / sec:,.0f} images/s, S3 server CPU {server_cpu:.1f} s "
                    f"in {sec:.1f} s  {timings}"
                )
        base = statistics.median(rates[next(iter(rates))])
        print()
        print("| input, S3 client | images/s (median) | vs first |")
        print("|---|---|---|")
        for name, v in rates.items():
            m = statistics.median(v)
            print(f"| {name} | {m:,.0f} | {m / base:.2f}x |")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
