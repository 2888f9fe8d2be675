"""The per-vCPU throughput `fruitdask plan` uses by default, measured and committed.

    python benchmarks/throughput.py [--images 20000] [--repeat 3] [--out fruitdask/aws/throughput.json]

Generates the images (cached, never timed), packs them into Parquet shards on a
SeaweedFS S3 server on loopback (``fruitdask pack``, the layout the deploy guide
recommends for S3), then runs the whole ``python -m fruitdask run --json`` on
the shards ``--repeat`` times, each in a subprocess with fruitdask's default
local cluster. From each run's manifest it takes ``throughput.images_per_s_per_core``
(images / seconds from listing to ``_SUCCESS`` / worker threads; the cluster
start-up is not in it) and the stage timings; the fastest run is written to
``--out`` (other work on a shared machine only ever slows a run down, so the
fastest is the closest to what the cores can do; every run's rate and the load
average are kept beside it) with the machine, the date and this command, and
``fruitdask plan`` names that file as its source.

The S3 server shares the cores with the job, so the figure is a floor for an
EC2 worker reading from S3 over the network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "fruitdask" / "aws" / "throughput.json"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    r = subprocess.run(
        [sys.executable, "-m", "fruitdask", *args], env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"fruitdask {args[0]} failed: {r.stderr[-2000:]}")
    return r


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)

    from fruitdask import io, sample
    from fruitdask.testing import S3Server

    load_before = round(os.getloadavg()[0], 2)  # before and after the runs

    data = Path(tempfile.gettempdir()) / f"fruitdask-bench-{args.images}"
    sample.generate_total(data, args.images, seed=0)
    work = Path(tempfile.mkdtemp(prefix="fruitdask-throughput-"))
    server = S3Server(work / "weed")
    server.start()
    try:
        so = server.storage_options
        store = ["--endpoint-url", so["endpoint_url"], "--storage-option", f"key={so['key']}",
                 "--storage-option", f"secret={so['secret']}"]  # fmt: skip
        bucket = server.make_bucket()
        _cli("pack", str(data), f"{bucket}/packed", *store, "--quiet")
        runs = []
        for k in range(args.repeat):
            out = f"{bucket}/out-{k}"
            _cli("run", "--input", f"{bucket}/packed", "--output", out, *store, "--quiet",
                 "--json", "--dashboard-address", "127.0.0.1:0")  # fmt: skip
            manifest = json.loads(io.read_text(io.join(out, "manifest.json"), so) or "{}")
            runs.append(manifest)
            rate = manifest["throughput"]["images_per_s_per_core"]
            print(f"run {k + 1}: {rate:,.1f} images/s per core  {manifest['timings']}")
    finally:
        server.stop()
    rates = [m["throughput"]["images_per_s_per_core"] for m in runs]
    best = max(rates)
    chosen = runs[rates.index(best)]
    timings = chosen["timings"]
    doc = {
        "format": "fruitdask-throughput/1",
        "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/throughput.py --images {args.images} --repeat {args.repeat}",
        "input": "packed shards on S3 (SeaweedFS on loopback, same cores)",
        "images": chosen["counts"]["images"],
        "threads": chosen["cluster"]["threads"],
        "workers": chosen["cluster"]["workers"],
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            # above the cores: the runs shared them with other work
            "load_average_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],
        },
        "images_per_s_per_core": best,
        "chosen": "the fastest run",
        "all_runs_images_per_s_per_core": rates,
        "timings": timings,
        "fixed_s": {k: timings.get(k) for k in ("startup", "listing", "pca_fit", "publish")},
        "versions": chosen.get("versions"),
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"fastest {best:,.1f} images/s per core -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
