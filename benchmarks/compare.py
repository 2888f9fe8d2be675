"""Dask against Spark, Ray Data and Daft on the same images and the same cores, in one run.

    python benchmarks/compare.py [--input URL | --images N [--s3]] [--packed] [--repeat K] [--cores N]
                                 [--engines dask,spark,ray,daft] [--out DIR] [--with-seed]
                                 [--endpoint-url URL] [--storage-option KEY=VALUE ...]
                                 [--data-dir DIR]

Each round runs, in this order, K rounds alternating:

* ``kernel``: read + decode + ORB over every image in N processes (a plain loop
  over :func:`fruitdask.features.extract`, processes started and warmed before
  timing): what the cores can do;
* ``dask``: ``python -m fruitdask run --no-report`` on a local cluster of N workers x 1
  thread (the peers write no report; its cost is in benchmarks/README.md);
* ``spark-tuned``: ``python -m spark_parity run --master local[N]``;
* ``spark-seed`` (``--with-seed``): the same with ``--profile seed``;
* ``ray`` and ``daft`` (only when asked, ``--engines``): the same job written on
  Ray Data and on Daft, what a data engineer would try first
  (``python -m benchmarks.peers.ray_job`` / ``daft_job``, the ``peers`` extra).

Each engine runs as its own command in a subprocess, so its memory is its own:
the resident memory of the whole process tree (client, scheduler, workers; the
Spark driver JVM and its Python workers, which are not reaped children, so
``time -v`` misses them) is sampled every 100 ms and the peak of the sum kept.
Per stage (start-up, listing, extraction, PCA fit, transform + write) the
engines' own timings; end to end the wall time of the command (interpreter
start, imports and shutdown included). Medians and min-max over the rounds.

Then the outputs of the last round are checked against each other: row counts,
per-image status and keypoint counts, the multiset of (path, descriptor) pairs,
the principal angles between each Spark model, the Dask model and the exact PCA
of the descriptors, and that every engine's features are centred.

Writes ``results.json``, ``results.md`` and ``results.png`` to ``--out`` (by
default a new folder ``bench-results/compare-<time>``; the committed
``benchmarks/results/compare/`` is written only when given explicitly) and
prints the table. Data is generated (and uploaded, with ``--s3``) in a setup
step, never timed. ``--s3`` starts a SeaweedFS server on loopback (the tests'
:class:`fruitdask.testing.S3Server`) and runs everything against it, outputs
included. ``--packed`` packs the input into Parquet shards first (``fruitdask
pack``, set-up) and runs every engine, and the kernel, on the pack: Dask and
Spark through fruitdask's pack reader, Ray and Daft with their own
``read_parquet``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("startup", "listing", "extract", "pca_fit", "transform_write")
STAGE_TITLES = {
    "startup": "start-up",
    "listing": "listing",
    "extract": "extract",
    "pca_fit": "PCA fit",
    "transform_write": "transform + write",
}
# Exact comparison of descriptor multisets up to this many rows (a sort of
# 5 int64 keys per row); above it, a 64-bit hash sum.
EXACT_MULTISET_ROWS = 5_000_000
# Parity of the PCA: the share of the variance of *all* descriptors that a model's
# subspace captures may fall short of the exact PCA's by at most this much. Both
# engines fit on a sample by default, and then the last components (whose
# eigenvalues are nearly equal) rotate within their span by several degrees, and
# even the leading ten by ~2 degrees on 20,000 images; the captured variance is
# what such a rotation does not change, and what a wrong fit (say, no centring,
# or a randomized solver 20-50 degrees off) fails by a wide margin.
MAX_VARIANCE_SHORTFALL = 0.002
CENTRED_TOLERANCE = 0.02  # |mean| / std of every feature column


# ---------------------------------------------------------------- memory
class TreeMonitor:
    """Peak resident memory and CPU time of a process and all its descendants.

    Sampled in a thread every ``interval`` s. The JVM and Spark's Python workers
    are not reaped children of the command, so rusage-based tools miss them:
    each process is read from /proc while it lives. CPU time is the last value
    seen per process (a process that exits between two samples loses at most
    ``interval`` of it), and is what a shared, loaded machine distorts least.
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.peak_java = 0
        self.cpu: dict[int, float] = {}
        self.java_pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = java = 0
        for p in procs:
            try:
                with p.oneshot():
                    rss = p.memory_info().rss
                    name = p.name()
                    t = p.cpu_times()
            except psutil.Error:
                continue
            total += rss
            self.cpu[p.pid] = t.user + t.system
            if name == "java":
                java += rss
                self.java_pids.add(p.pid)
        self.peak = max(self.peak, total)
        self.peak_java = max(self.peak_java, java)

    @property
    def cpu_seconds(self) -> float:
        return float(sum(self.cpu.values()))

    @property
    def cpu_seconds_java(self) -> float:
        return float(sum(v for k, v in self.cpu.items() if k in self.java_pids))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- engines
#: The engines and the options that make them (after the input, output and cores).
ENGINES = {
    "dask": [],
    # Spark's binaryFile source for a local folder; fsspec in the executors for S3
    "spark-tuned": ["--profile", "tuned"],
    # a local folder read like S3: the driver lists, the executors read the files
    "spark-tuned-fsspec": ["--profile", "tuned", "--reader", "fsspec"],
    "spark-seed": ["--profile", "seed"],
    # the peers (benchmarks/peers): Ray Data and Daft's native runner
    "ray": ["benchmarks.peers.ray_job"],
    "daft": ["benchmarks.peers.daft_job"],
}
#: Short names accepted by --engines.
ALIASES = {"spark": "spark-tuned"}


def engine_command(
    engine: str, inp: str, out: str, cores: int, storage: list[str], extra: list[str]
) -> list[str]:
    if engine == "dask":
        from fruitdask.cluster import local_layout

        # fruitdask's default layout of a local cluster on that many cores
        workers, threads = local_layout(None, None, cores)
        return [sys.executable, "-m", "fruitdask", "run", "--input", inp, "--output", out,
                "--workers", str(workers), "--threads-per-worker", str(threads),
                "--dashboard-address", "127.0.0.1:0", "--json", "--quiet",
                "--no-report",  # the peers write none (its cost: benchmarks/README.md)
                *storage]  # fmt: skip
    if engine in ("ray", "daft"):
        return [sys.executable, "-m", *ENGINES[engine], "--input", inp, "--output", out,
                "--cores", str(cores), "--json", "--quiet", *storage]  # fmt: skip
    return [sys.executable, "-m", "spark_parity", "run", "--input", inp, "--output", out,
            "--master", f"local[{cores}]", *ENGINES[engine], "--json", "--quiet",
            *storage, *extra]  # fmt: skip


def run_engine(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one engine command; its wall time, peak tree RSS and printed JSON summary."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeMonitor(proc.pid) as mon:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    summary = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    if proc.returncode != 0 or summary is None:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed (exit {proc.returncode}):\n{tail}")
    return {
        "wall_s": wall,
        "peak_rss_bytes": mon.peak,
        "peak_rss_java_bytes": mon.peak_java,
        "cpu_s": mon.cpu_seconds,
        "cpu_java_s": mon.cpu_seconds_java,
        "summary": summary,
    }


# ---------------------------------------------------------------- kernel
def _kernel_chunk(args: tuple[str, Any, dict[str, Any]]) -> int:
    from fruitdask import source
    from fruitdask.features import OrbParams, extract

    root, rows, so = args
    params = OrbParams()
    orb = params.create()
    n = 0
    for blob in source.iter_images(root, rows, so):  # loose files or a pack's row groups
        if isinstance(blob, bytes):
            n += len(extract(blob, params, orb).descriptors)
    return n


def _pool_cpu(pool: ProcessPoolExecutor) -> float:
    import psutil

    total = 0.0
    for pid in list(pool._processes or {}):  # the pool's own worker processes
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def kernel(
    pool: ProcessPoolExecutor, root: str, listing: Any, so: dict
) -> tuple[float, float, int]:
    """Seconds and CPU seconds for read + decode + ORB of the images of
    ``listing`` on the pool's processes, and the number of descriptors found."""
    chunk = 250
    chunks = [(root, listing.iloc[i : i + chunk], so) for i in range(0, len(listing), chunk)]
    cpu = _pool_cpu(pool)
    t = time.perf_counter()
    n = sum(pool.map(_kernel_chunk, chunks))
    return time.perf_counter() - t, _pool_cpu(pool) - cpu, n


def _remove_tree(url: str, so: dict) -> None:
    """Delete an engine's output folder or prefix (the benchmark's own, whole)."""
    from fruitdask import io

    fs, root = io.filesystem(url, so)
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ---------------------------------------------------------------- parity
def _read(url: str, table: str, so: dict, columns: list[str] | None = None):
    """A table as a careful reader reads it: the files the manifest lists, after _SUCCESS."""
    import pyarrow.dataset as ds

    from fruitdask import io
    from fruitdask.output import read_committed

    fs, root = io.filesystem(url, so)
    manifest = read_committed(url, so)  # _SUCCESS -> the committed run's manifest
    if manifest is None:
        raise RuntimeError(f"{url}: no committed result")
    files = [f"{root}/{f}" for f in manifest["files"][table]]
    return ds.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns)


def _model(url: str, so: dict):
    from fruitdask import io
    from fruitdask.pca import PcaModel

    fs, root = io.filesystem(url, so)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    return PcaModel.from_json(fs.cat_file(f"{root}/{manifest['files']['model'][0]}").decode())


def _descriptor_keys(url: str, so: dict, paths_index):
    """(n, 5) int64: path code and the 32 descriptor bytes as 4 int64, per row."""
    import numpy as np

    t = _read(url, "descriptors", so, ["path", "descriptor"])
    codes = paths_index.get_indexer(t.column("path").to_pandas())
    flat = t.column("descriptor").combine_chunks()
    buf = np.frombuffer(flat.buffers()[2], dtype=np.uint8)
    off = flat.offset * 32
    d = buf[off : off + 32 * len(flat)].reshape(-1, 32)
    return np.column_stack([codes.astype(np.int64), d.copy().view(np.int64)])


def _multiset_equal(a, b) -> bool:
    import numpy as np

    if a.shape != b.shape:
        return False
    if len(a) <= EXACT_MULTISET_ROWS:
        sa = a[np.lexsort(a.T[::-1])]
        sb = b[np.lexsort(b.T[::-1])]
        return bool(np.array_equal(sa, sb))
    mix = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                    0x27D4EB2F165667C5, 0xFF51AFD7ED558CCD], dtype=np.uint64)  # fmt: skip
    with np.errstate(over="ignore"):
        ha = (a.view(np.uint64) * mix).sum(axis=1)
        hb = (b.view(np.uint64) * mix).sum(axis=1)
        ha, hb = ha ^ (ha >> np.uint64(29)), hb ^ (hb >> np.uint64(29))
        return bool(ha.sum() == hb.sum() and (ha * ha).sum() == (hb * hb).sum())


def _centred(url: str, so: dict) -> float:
    """Largest |mean| / std over the feature columns."""
    import numpy as np

    t = _read(url, "features", so, ["pca"])
    col = t.column("pca").combine_chunks()
    if len(col) == 0:
        return 0.0
    x = col.flatten().to_numpy().reshape(len(col), -1).astype(np.float64)
    std = x.std(axis=0)
    return float(np.max(np.abs(x.mean(axis=0)) / np.where(std > 0, std, 1.0)))


def parity(outputs: dict[str, str], so: dict) -> dict[str, Any]:
    """Compare every engine's output with Dask's; a verdict per engine and overall."""
    import numpy as np
    import pandas as pd

    from fruitdask.pca import (
        Moments,
        combine_moments,
        exact_pca,
        moments,
        principal_angles,
        variance_captured,
    )

    ref = outputs["dask"]
    images_ref = _read(ref, "images", so).to_pandas()
    images_ref = images_ref.sort_values("path", ignore_index=True)
    paths_index = pd.Index(images_ref["path"].astype(str))
    keys_ref = _descriptor_keys(ref, so, paths_index)
    desc = keys_ref[:, 1:].copy().view(np.uint8).reshape(-1, 32)
    total = Moments(0, np.zeros(32), np.zeros((32, 32)))
    for i in range(0, len(desc), 262_144):
        total = combine_moments(total, moments(desc[i : i + 262_144]))
    dask_model = _model(ref, so)
    n_components = dask_model.n_components
    exact = exact_pca(total, n_components)
    exact_ratio = float(exact.explained_variance_ratio.sum())

    def pca_problems(model) -> tuple[float, list[str]]:
        captured = variance_captured(model, total)
        if exact_ratio - captured > MAX_VARIANCE_SHORTFALL:
            return captured, [
                f"PCA: its subspace captures {captured:.4f} of the variance, the exact "
                f"PCA {exact_ratio:.4f}"
            ]
        return captured, []

    dask_captured, dask_problems = pca_problems(dask_model)
    dask_centred = _centred(ref, so)
    if dask_centred > CENTRED_TOLERANCE:
        dask_problems.append(f"features not centred (|mean|/std up to {dask_centred:.3f})")
    report: dict[str, Any] = {
        "exact_explained_variance_ratio": exact_ratio,
        "dask": {
            "images": len(images_ref),
            "descriptors": len(keys_ref),
            "variance_captured": dask_captured,
            "angles_to_exact_deg": principal_angles(dask_model.components, exact.components)
            .round(4)
            .tolist(),
            "features_max_abs_mean_over_std": dask_centred,
            "problems": dask_problems,
            "ok": not dask_problems,
        },
    }
    ok_all = not dask_problems
    for engine, url in outputs.items():
        if engine == "dask":
            continue
        problems = []
        images = _read(url, "images", so).to_pandas().sort_values("path", ignore_index=True)
        if len(images) != len(images_ref):
            problems.append(f"images: {len(images)} rows, dask {len(images_ref)}")
        else:
            cols = ["path", "label", "split", "size", "width", "height", "n_keypoints", "status"]
            if not images[cols].astype(str).equals(images_ref[cols].astype(str)):
                problems.append("images: rows differ")
        keys = _descriptor_keys(url, so, paths_index)
        if len(keys) != len(keys_ref):
            problems.append(f"descriptors: {len(keys)} rows, dask {len(keys_ref)}")
        elif (keys[:, 0] < 0).any() or not _multiset_equal(keys, keys_ref):
            problems.append("descriptors: (path, descriptor) multisets differ")
        model = _model(url, so)
        to_exact = principal_angles(model.components, exact.components)
        to_dask = principal_angles(model.components, dask_model.components)
        lead = min(10, n_components)
        lead_exact = principal_angles(model.components[:lead], exact.components[:lead])
        captured, pca_issues = pca_problems(model)
        problems += pca_issues
        centred = _centred(url, so)
        if centred > CENTRED_TOLERANCE:
            problems.append(f"features not centred (|mean|/std up to {centred:.3f})")
        report[engine] = {
            "images": len(images),
            "descriptors": len(keys),
            "descriptor_multiset": "exact" if len(keys) <= EXACT_MULTISET_ROWS else "hash",
            "variance_captured": captured,
            "angles_to_exact_deg": to_exact.round(4).tolist(),
            "angles_to_dask_deg": to_dask.round(4).tolist(),
            "leading_angles_to_exact_deg": lead_exact.round(4).tolist(),
            "features_max_abs_mean_over_std": centred,
            "problems": problems,
            "ok": not problems,
        }
        ok_all &= not problems
    report["ok"] = ok_all
    return report


# ---------------------------------------------------------------- report
def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _cell(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return ""
    med, lo, hi = statistics.median(values), min(values), max(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})"


def summarise(rounds: list[dict[str, Any]], engines: list[str], n: int) -> dict[str, Any]:
    """Per engine: raw values per round (lists) and their median/min/max."""
    out: dict[str, Any] = {}
    for e in engines:
        runs = [r[e] for r in rounds]
        timings = [r["summary"]["timings"] for r in runs]
        stages = {s: [t.get(s, 0.0) for t in timings] for s in STAGES}
        # publishing (model, manifest, _SUCCESS) is part of writing the result
        stages["transform_write"] = [
            t.get("transform_write", 0.0) + t.get("publish", 0.0) for t in timings
        ]
        wall = [r["wall_s"] for r in runs]
        work = [sum(v for k, v in t.items() if k != "startup") for t in timings]
        raw = {
            "stages_s": stages,
            "other_s": [w - sum(t.values()) for w, t in zip(wall, timings, strict=True)],
            "end_to_end_s": wall,
            "images_per_s_end_to_end": [n / w for w in wall],
            "images_per_s_excl_startup": [n / w for w in work if w > 0],
            "extract_images_per_s": [n / x for x in stages["extract"] if x > 0],
            "cpu_s": [r["cpu_s"] for r in runs],
            "images_per_cpu_s": [n / r["cpu_s"] for r in runs if r["cpu_s"] > 0],
            "peak_rss_gib": [r["peak_rss_bytes"] / 2**30 for r in runs],
            "peak_rss_java_gib": [r["peak_rss_java_bytes"] / 2**30 for r in runs],
        }
        out[e] = {
            "raw": raw,
            "median": {
                k: ({s: _stats(x) for s, x in v.items()} if isinstance(v, dict) else _stats(v))
                for k, v in raw.items()
                if v
            },
            "partitions": runs[-1]["summary"].get("partitions"),
        }
    return out


def markdown(res: dict[str, Any]) -> str:
    n, cores = res["images"], res["cores"]
    titles = [STAGE_TITLES[s] + " s" for s in STAGES]
    head = ["engine", *titles, "other s", "end to end s", "images/s end to end",
            "images/s excl. start-up", "CPU s, process tree", "images per CPU s",
            "peak RSS, process tree GiB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e, st in res["engines"].items():
        r = st["raw"]
        rss = _cell(r["peak_rss_gib"])
        if max(r["peak_rss_java_gib"]) > 0:
            rss += f" (JVM {statistics.median(r['peak_rss_java_gib']):.2f})"
        cells = [
            e,
            *[_cell(r["stages_s"][s]) for s in STAGES],
            _cell(r["other_s"]),
            _cell(r["end_to_end_s"]),
            _cell(r["images_per_s_end_to_end"], "{:,.0f}"),
            _cell(r["images_per_s_excl_startup"], "{:,.0f}"),
            _cell(r["cpu_s"], "{:.1f}"),
            _cell(r["images_per_cpu_s"], "{:,.0f}"),
            rss,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    k = res["kernel"]
    cells = [f"kernel: read + decode + ORB, {cores} processes", "", "",
             _cell(k["seconds"]), "", "", "", _cell(k["seconds"]),
             _cell(k["images_per_s"], "{:,.0f}"), _cell(k["images_per_s"], "{:,.0f}"),
             _cell(k["cpu_s"], "{:.1f}"), _cell([n / c for c in k["cpu_s"] if c > 0], "{:,.0f}"),
             ""]  # fmt: skip
    lines.append("| " + " | ".join(cells) + " |")
    p = res["parity"]
    exact_ratio = p["exact_explained_variance_ratio"]
    others = [e for e in res["engines"] if e != "dask"]
    lines += ["", f"Parity ({', '.join(others)} against dask): **{'OK' if p['ok'] else 'FAILED'}**"]
    for e in others:
        r = p[e]
        ang = r["angles_to_exact_deg"]
        same = not any(x.startswith("descriptors") for x in r["problems"])
        lines.append(
            f"- {e}: {r['images']:,} images, {r['descriptors']:,} descriptors, "
            f"{'identical' if same else 'DIFFERENT'} (path, descriptor) multiset "
            f"({r['descriptor_multiset']} comparison); PCA subspace captures "
            f"{r['variance_captured']:.4f} of the variance (exact PCA {exact_ratio:.4f}); "
            f"principal angles to the exact PCA: leading 10 max "
            f"{max(r['leading_angles_to_exact_deg']):.2f} deg, all {len(ang)} max "
            f"{max(ang):.2f} deg; to dask's model max {max(r['angles_to_dask_deg']):.2f} deg; "
            f"features centred (max |mean|/std {r['features_max_abs_mean_over_std']:.4f})"
            + (f"; problems: {'; '.join(r['problems'])}" if r["problems"] else "")
        )
    d = p["dask"]
    lines.append(
        f"- dask: PCA subspace captures {d['variance_captured']:.4f} of the variance; principal "
        f"angles to the exact PCA max {max(d['angles_to_exact_deg']):.2f} deg; features max "
        f"|mean|/std {d['features_max_abs_mean_over_std']:.4f}"
        + (f"; problems: {'; '.join(d['problems'])}" if d["problems"] else "")
    )
    lines += [
        "",
        f"{n:,} images ({res['input_kind']}), {cores} cores, {res['repeat']} round(s), engines "
        "alternating; median (min-max). *other* = end to end minus the engine's own stages "
        "(interpreter start, imports, shutdown). CPU s = user + system time of the engine's "
        f"whole process tree. Load average (1, 5, 15 min) before: {res['load_before']}, after: "
        f"{res['load_after']}.",
    ]
    return "\n".join(lines)


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(res["engines"])
    parts = [*STAGES, "other"]
    colours = ["#999999", "#b3cde3", "#1f78b4", "#33a02c", "#fb9a99", "#dddddd"]
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.7 * len(engines)), layout="constrained")
    for i, e in enumerate(engines):
        st = res["engines"][e]["median"]
        left = 0.0
        for part, colour in zip(parts, colours, strict=True):
            v = st["other_s"]["median"] if part == "other" else st["stages_s"][part]["median"]
            v = max(v, 0.0)
            ax.barh(
                i,
                v,
                left=left,
                color=colour,
                label=STAGE_TITLES.get(part, part) if i == 0 else None,
            )
            left += v
        ax.text(left, i, f"  {st['images_per_s_end_to_end']['median']:,.0f} img/s", va="center")
    ax.set_yticks(range(len(engines)), engines)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median), end to end")
    k = statistics.median(res["kernel"]["images_per_s"])
    ax.set_title(
        f"{res['images']:,} images, {res['cores']} cores; raw kernel {k:,.0f} images/s", fontsize=10
    )
    # "outside" places the legend under the axes with the layout engine's own
    # spacing (a fixed bbox_to_anchor left a gap that grew with the figure)
    fig.legend(loc="outside lower center", ncol=6, fontsize=8, frameon=False)
    ax.set_xlim(0, ax.get_xlim()[1] * 1.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def _storage_args(so: dict[str, Any]) -> list[str]:
    out = []
    for k, v in so.items():
        if k == "endpoint_url":
            out += ["--endpoint-url", str(v)]
        elif k in ("key", "secret", "token"):
            continue  # passed through the environment, not the command line
        else:
            out += ["--storage-option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    return out


def _env(so: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if "key" in so:
        env["AWS_ACCESS_KEY_ID"] = str(so["key"])
    if "secret" in so:
        env["AWS_SECRET_ACCESS_KEY"] = str(so["secret"])
    if "token" in so:
        env["AWS_SESSION_TOKEN"] = str(so["token"])
    return env


def _pack(inp: str, so: dict[str, Any], work: Path) -> str:
    """``fruitdask pack`` of ``inp`` beside it (S3) or in ``work`` (local): the
    layout the deploy guide recommends for many small images on S3."""
    dst = f"{inp.rstrip('/')}-packed" if "://" in inp else str(work / "packed")
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "fruitdask", "pack", inp, dst, "--quiet", *_storage_args(so)]
    got = subprocess.run(cmd, env=_env(so), capture_output=True, text=True, cwd=REPO)
    if got.returncode != 0:
        raise RuntimeError(f"fruitdask pack failed: {got.stderr.strip()}")
    print(f"packed {inp} into {dst} in {time.perf_counter() - t:.0f}s")
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--input", help="image folder or URL (default: generate --images)")
    src.add_argument("--images", type=int, default=20_000, help="generated images (20000)")
    ap.add_argument("--s3", action="store_true", help="serve the images from a local SeaweedFS")
    ap.add_argument("--data-dir", help="where to generate the images (default: a temp cache)")
    ap.add_argument("--packed", action="store_true",
                    help="pack the input into Parquet shards first (fruitdask pack; set-up, "
                         "not timed) and run every engine on the pack")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=2, help="rounds (2)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--out",
        help="folder for results.json/.md/.png (default: a new bench-results/compare-<time>; "
        "the committed results are benchmarks/results/compare, only when given)",
    )
    ap.add_argument("--with-seed", action="store_true", help="also run Spark's seed profile")
    ap.add_argument(
        "--engines",
        help=f"comma-separated, from {', '.join(ENGINES)} ('spark' = spark-tuned; default: "
        "dask, spark-tuned, and spark-tuned-fsspec for a local folder; --with-seed adds "
        "spark-seed)",
    )
    ap.add_argument(
        "--no-cds",
        action="store_true",
        help="do not build or use Spark's class-data-sharing archive (`spark_parity cds`)",
    )
    ap.add_argument("--endpoint-url", help="S3 endpoint of --input")
    ap.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=3600, help="per engine run, seconds")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.cores < 1:
        ap.error("--repeat and --cores must be >= 1")

    from fruitdask import io, sample, source

    out_dir = Path(args.out or REPO / "bench-results" / time.strftime("compare-%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    so = io.parse_storage_options(args.storage_option, args.endpoint_url)
    server = None
    work = Path(tempfile.mkdtemp(prefix="fruitdask-compare-"))
    try:
        # ---- setup, not timed
        if args.input is None:
            data = Path(
                args.data_dir or Path(tempfile.gettempdir()) / f"fruitdask-bench-{args.images}"
            )
            s = sample.generate_total(data, args.images, seed=0)
            print(f"data: {data} ({s.training + s.test:,} images{', cached' if s.cached else ''})")
            inp = str(data)
            if args.s3:
                from fruitdask.testing import S3Server

                server = S3Server(work / "seaweedfs")
                server.start()
                so = dict(server.storage_options)
                bucket = server.make_bucket()
                t = time.perf_counter()
                n_up = server.upload_tree(data, f"{bucket}/fruits")
                print(f"uploaded {n_up:,} objects to {bucket} in {time.perf_counter() - t:.0f}s")
                inp = f"{bucket}/fruits"
        else:
            inp = args.input
        if args.packed:
            inp = _pack(inp, so, work)
        remote = "://" in inp and not inp.startswith("file://")
        listing = source.list_input(inp, so)
        n = len(listing)
        if args.engines:
            engines = [e.strip() for e in args.engines.split(",") if e.strip()]
            engines = list(dict.fromkeys(ALIASES.get(e, e) for e in engines))
            unknown = set(engines) - set(ENGINES)
            if unknown or "dask" not in engines:
                ap.error(f"--engines: dask and some of {', '.join(ENGINES)}; got {args.engines}")
            import importlib.util

            missing = [
                e for e in ("ray", "daft") if e in engines and not importlib.util.find_spec(e)
            ]
            if missing:
                ap.error(
                    f"--engines {','.join(missing)}: not installed (pip install -e '.[peers]')"
                )
        else:
            engines = ["dask", "spark-tuned"] + ([] if remote else ["spark-tuned-fsspec"])
        if args.with_seed and "spark-seed" not in engines:
            engines.append("spark-seed")
        spark_extra = ["--no-cds"] if args.no_cds else []
        if not args.no_cds and any(e.startswith("spark-") for e in engines):
            # Set-up, like the data: the archive is built once per pyspark and Java.
            t = time.perf_counter()
            got = subprocess.run([sys.executable, "-m", "spark_parity", "cds"], env=_env({}),
                                 capture_output=True, text=True)  # fmt: skip
            if got.returncode != 0:
                raise RuntimeError(f"spark_parity cds failed: {got.stderr.strip()}")
            print(f"cds: {got.stdout.strip()} ({time.perf_counter() - t:.0f}s)")
        out_base = f"{inp.rstrip('/')}-compare-{uuid.uuid4().hex[:6]}" if remote else str(work)
        print(f"images: {n:,}  cores: {args.cores}  rounds: {args.repeat}  engines: {engines}")
        env = _env(so)
        storage = _storage_args(so)
        load_before = [round(x, 2) for x in os.getloadavg()]

        # ---- rounds, alternating
        rounds: list[dict[str, Any]] = []
        kernel_runs: dict[str, list[float]] = {"seconds": [], "cpu_s": [], "images_per_s": []}
        outputs: dict[str, str] = {}
        # spawn, not fork: this process has started S3 clients (pyarrow's AWS SDK,
        # s3fs) that a forked child inherits in a broken state.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.cores, mp_context=ctx) as pool:
            kernel(pool, inp, listing.iloc[: 50 * args.cores], so)  # start and warm the processes
            for k in range(args.repeat):
                sec, cpu, n_desc = kernel(pool, inp, listing, so)
                kernel_runs["seconds"].append(sec)
                kernel_runs["cpu_s"].append(cpu)
                kernel_runs["images_per_s"].append(n / sec)
                line = [f"round {k + 1}: kernel {n / sec:,.0f}/s"]
                this: dict[str, Any] = {}
                for e in engines:
                    out = f"{out_base}/{e}-{k}"
                    cmd = engine_command(e, inp, out, args.cores, storage, spark_extra)
                    r = run_engine(cmd, env, args.timeout)
                    this[e] = r
                    if r["summary"]["descriptors"] != n_desc:
                        print(f"  warning: {e} found {r['summary']['descriptors']:,} descriptors, "
                              f"kernel {n_desc:,}")  # fmt: skip
                    line.append(
                        f"{e} {r['wall_s']:.1f}s ({n / r['wall_s']:,.0f}/s, "
                        f"{r['peak_rss_bytes'] / 2**30:.2f} GiB)"
                    )
                    if k > 0:
                        _remove_tree(outputs[e], so)  # keep the disk use to one round
                    outputs[e] = out
                rounds.append(this)
                print("  " + ", ".join(line), flush=True)
        load_after = [round(x, 2) for x in os.getloadavg()]

        # ---- parity of the last round's outputs
        print("checking parity ...", flush=True)
        report = parity(outputs, so)

        res = {
            "images": n,
            "input": inp,
            "input_kind": "S3, SeaweedFS on loopback" if remote else "local folder",
            "cores": args.cores,
            "repeat": args.repeat,
            "engines": summarise(rounds, engines, n),
            "kernel": {**kernel_runs, "descriptors": n_desc},
            "parity": report,
            "rounds": rounds,
            "load_before": load_before,
            "load_after": load_after,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        }
        (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
        md = markdown(res)
        (out_dir / "results.md").write_text(md + "\n")
        try:
            chart(res, out_dir / "results.png")
        except ImportError:
            print("(matplotlib missing: no chart; pip install fruitdask[plot])")
        print()
        print(md)
        print(f"\nparity: {'OK' if report['ok'] else 'FAILED'}")
        print(f"written: {out_dir / 'results.json'}, results.md, results.png")
        for url in outputs.values():
            _remove_tree(url, so)
        return 0 if report["ok"] else 1
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
