"""Faults really injected: killed workers, a stopped S3 server, SIGINT/SIGTERM,
resume, overwrite; hostile files; fuzzed bytes; canary secrets; loopback binding."""

from __future__ import annotations

import collections
import io as _io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from fruitdask import pipeline, sample
from fruitdask.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers
def _manifest_tables(out: Path) -> dict[str, list[dict]]:
    """Read the output the way a careful reader does: _SUCCESS, then the manifest's files."""
    assert (out / "_SUCCESS").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert (out / "_SUCCESS").read_text().strip() == m["run_id"]
    return {
        t: [r for f in m["files"][t] for r in pq.read_table(out / f).to_pylist()]
        for t in ("images", "descriptors")
    }


def _signature(out: Path):
    t = _manifest_tables(out)
    images = sorted(
        (r["path"], r["status"], r["n_keypoints"], r["width"], r["height"]) for r in t["images"]
    )
    desc = collections.Counter(
        (r["path"], r["keypoint"], r["descriptor"]) for r in t["descriptors"]
    )
    return images, desc


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["DASK_FRUITDASK__CLUSTER__DASHBOARD_ADDRESS"] = "127.0.0.1:0"
    return env


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fruitdask", *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """2,400 images: long enough (with small partitions) to be in flight when signalled."""
    root = tmp_path_factory.mktemp("medium") / "fruits"
    sample.generate_total(root, 2400, classes=24, seed=8)
    return root


@pytest.fixture(scope="module")
def clean_medium(medium, tmp_path_factory):
    """The reference: a clean CLI run over `medium`."""
    out = tmp_path_factory.mktemp("clean") / "out"
    r = subprocess.run(
        [sys.executable, "-m", "fruitdask", "run", "-i", str(medium), "-o", str(out),
         "--workers", "2", "--partition-size", "60", "--quiet"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return _signature(out)


# ---------------------------------------------------------------- faults
def test_worker_sigkill_mid_run(medium, clean_medium, tmp_path):
    """SIGKILL a worker process while partitions are in flight: same result as a clean run."""
    from fruitdask.cluster import ClusterSpec, connect

    killed = []
    with connect(ClusterSpec(workers=3, threads_per_worker=1, dashboard_address=":0")) as (c, _):
        pids = list(c.run(os.getpid).values())

        def progress(stage, done, total, items):
            if stage == "extract" and done >= 3 and not killed:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

        cfg = RunConfig(input=str(medium), output=str(tmp_path / "out"), partition_size=60)
        s = pipeline.run(cfg, c, progress=progress)
    assert killed and not psutil.pid_exists(killed[0])
    assert s.images == 2400
    assert _signature(tmp_path / "out") == clean_medium


@pytest.mark.s3
def test_s3_outage_mid_run_then_resume(s3, dask_client, sample_dir, tmp_path):
    """Stop the S3 server mid-run for a few seconds: the run rides it out (or fails
    with one line and no _SUCCESS, and --resume finishes); the result equals a clean run."""
    bucket = s3.make_bucket()
    so = s3.storage_options
    s3.upload_tree(sample_dir, f"{bucket}/in")
    cfg = RunConfig(input=f"{bucket}/in", output=f"{bucket}/out", storage_options=so,
                    partition_size=8)  # fmt: skip

    outage_threads: list[threading.Thread] = []

    def outage():
        s3.stop()
        time.sleep(3)
        s3.restart()

    def progress(stage, done, total, items):
        if stage == "extract" and not outage_threads:  # mid-extraction
            outage_threads.append(threading.Thread(target=outage))
            outage_threads[0].start()

    try:
        s = pipeline.run(cfg, dask_client, progress=progress)
    except Exception as exc:  # noqa: BLE001 - a clear failure is allowed; resume must finish
        assert "\n" not in str(exc)
        outage_threads[0].join()
        assert not s3.fs().exists(f"{bucket.removeprefix('s3://')}/out/_SUCCESS")
        s = pipeline.run(cfg.with_(resume=True), dask_client)
    assert outage_threads
    outage_threads[0].join()
    ref = pipeline.run(RunConfig(input=str(sample_dir), output=str(tmp_path / "ref"),
                                 partition_size=8), dask_client)  # fmt: skip
    assert (s.images, s.images_ok, s.descriptors) == (ref.images, ref.images_ok, ref.descriptors)
    local = tmp_path / "copy"
    s3.fs().get(f"{bucket.removeprefix('s3://')}/out", str(local), recursive=True)
    assert _signature(local) == _signature(tmp_path / "ref")


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended before printing {text!r}")
        if text in line:
            return
    raise AssertionError(f"no {text!r} within {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_promptly_without_orphans_then_resume(
    sig, code, medium, clean_medium, tmp_path
):
    out = tmp_path / "out"
    args = ["run", "-i", str(medium), "-o", str(out), "--workers", "2", "--partition-size", "60"]
    proc = _cli(*args)
    _wait_for(proc, "Dask dashboard")
    time.sleep(2.0)  # extraction under way
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 2  # workers (and their nannies) are separate processes
    t = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t < 30
    assert proc.returncode == code, err
    assert "no _SUCCESS written" in err
    assert not (out / "_SUCCESS").exists()
    assert not (out / "manifest.json").exists()
    time.sleep(2)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]

    # --resume skips what was finished and ends equal to a clean run
    r = subprocess.run([sys.executable, "-m", "fruitdask", *args, "--resume", "--json",
                        "--quiet"], env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    # (under load the signal can land after extraction: then every partition is reused)
    assert 0 < summary["partitions_resumed"] <= summary["partitions"]
    assert _signature(out) == clean_medium


def test_overwrite_replaces_cleanly_and_interrupted_overwrite_is_not_complete(
    dask_client, sample_dir, medium, tmp_path
):
    out = tmp_path / "out"
    pipeline.run(RunConfig(input=str(sample_dir), output=str(out)), dask_client)
    old_files = {p.name for p in out.rglob("*.parquet")}
    s = pipeline.run(RunConfig(input=str(medium), output=str(out), overwrite=True), dask_client)
    now = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    m = json.loads((out / "manifest.json").read_text())
    listed = {f for fs in m["files"].values() for f in fs}
    assert now == listed | {"manifest.json", "_SUCCESS"}  # nothing of the old run left
    assert not old_files & {p.name for p in out.rglob("*.parquet")}
    assert m["counts"]["images"] == s.images == 2400

    # an overwrite that dies mid-way leaves no _SUCCESS: the old result is not
    # presented as complete, and the new one is not either
    proc = _cli("run", "-i", str(medium), "-o", str(out), "--overwrite", "--workers", "1",
                "--partition-size", "20")  # fmt: skip
    _wait_for(proc, "Dask dashboard")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    if (out / "_SUCCESS").exists():  # only if the signal came after publishing: then complete
        m = json.loads((out / "manifest.json").read_text())
        assert (out / "_SUCCESS").read_text().strip() == m["run_id"]
        assert all((out / f).exists() for fs in m["files"].values() for f in fs)


# ---------------------------------------------------------------- hostile input
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _hostile(root: Path, good: bytes) -> dict[str, str]:
    """Hostile files (relative path -> expected status); some names are bytes."""
    from PIL import Image

    img = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    rgb = Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))

    def pil(fmt: str, im=rgb, **kw) -> bytes:
        b = _io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    png = pil("PNG")
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # inside the IHDR CRC
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    )
    frames = [rgb, rgb.rotate(90), rgb.rotate(180)]
    tiff = _io.BytesIO()
    frames[0].save(tiff, "TIFF", save_all=True, append_images=frames[1:])
    cases: dict[str, tuple[bytes, str]] = {
        "Hostile/zero.jpg": (b"", "error"),
        "Hostile/truncated.jpg": (good[: len(good) // 3], "error"),
        "Hostile/bad-crc.png": (bytes(bad_crc), "error"),
        "Hostile/text.jpg": (b"just some text\n" * 30, "error"),
        "Hostile/page.jpg": (b"<!doctype html><html><body>404</body></html>", "error"),
        "Hostile/anim.gif": (pil("GIF"), "ok"),
        "Hostile/pages.tiff": (tiff.getvalue(), "ok"),
        "Hostile/cmyk.jpg": (pil("JPEG", rgb.convert("CMYK")), "ok"),
        "Hostile/sixteen.png": (pil("PNG", Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)), "ok"),
        "Hostile/rgba.png": (pil("PNG", rgb.convert("RGBA")), "ok"),
        "Hostile/one.png": (pil("PNG", Image.new("RGB", (1, 1))), "no_keypoints"),
        "Hostile/bomb.png": (bomb, "error"),
        "Ünïcode fruit 🍎/x $(touch pwned) {0} %s%n.jpg": (good, "ok"),
        "Hostile/" + "/".join(["deep"] * 30) + "/deep.jpg": (good, "ok"),
    }  # fmt: skip
    out = {}
    for rel, (blob, status) in cases.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
        out[rel] = status
    # a folder name that is not UTF-8 (allowed on Linux): its bytes are escaped in the output
    raw = os.path.join(os.fsencode(root), b"caf\xe9")
    os.makedirs(raw, exist_ok=True)
    with open(os.path.join(raw, b"pomme.jpg"), "wb") as f:
        f.write(good)
    out["caf\\xe9/pomme.jpg"] = "ok"
    return out


def test_hostile_corpus(dask_client, sample_dir, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(sample_dir, src)
    good = next(iter(sorted(sample_dir.rglob("*.jpg")))).read_bytes()
    expected = _hostile(src, good)
    out = tmp_path / "out"
    s = pipeline.run(RunConfig(input=str(src), output=str(out)), dask_client)
    rows = _manifest_tables(out)["images"]
    by_path = collections.Counter(r["path"] for r in rows)
    assert all(n == 1 for n in by_path.values())  # exactly one row per file
    got = {r["path"]: r for r in rows}
    for rel, status in expected.items():
        assert got[rel]["status"] == status, (rel, got[rel]["error"])
        if status == "error":
            assert got[rel]["error"] and "\n" not in got[rel]["error"]
    assert "too large" in got["Hostile/bomb.png"]["error"]
    assert s.images == len(rows) == len(list(sample_dir.rglob("*.jpg"))) + len(expected)
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()
    # good images are unaffected by their neighbours
    ref = tmp_path / "ref"
    pipeline.run(RunConfig(input=str(sample_dir), output=str(ref)), dask_client)
    ref_desc = _signature(ref)[1]
    here = collections.Counter(
        (r["path"], r["keypoint"], r["descriptor"]) for r in _manifest_tables(out)["descriptors"]
    )
    assert all(here[k] == v for k, v in ref_desc.items())


_FUZZ = r"""
import json, sys
import numpy as np, cv2
from fruitdask import sample
from fruitdask.features import OrbParams, extract
rng = np.random.default_rng(int(sys.argv[1]))
img = sample.render(3, 0, seed=5)
seeds = [cv2.imencode(ext, img)[1].tobytes() for ext in (".jpg", ".png", ".webp", ".bmp", ".tiff")]
orb = OrbParams(max_pixels=4_000_000)
counts = {}
for case in range(int(sys.argv[2])):
    base = bytearray(seeds[case % len(seeds)])
    kind = case % 4
    if kind == 0:  # flip bytes
        for i in rng.integers(0, len(base), rng.integers(1, 20)):
            base[i] ^= int(rng.integers(1, 256))
    elif kind == 1:  # truncate
        base = base[: int(rng.integers(0, len(base)))]
    elif kind == 2:  # overwrite header fields (sizes live there)
        for i in rng.integers(0, min(64, len(base)), 4):
            base[i] = int(rng.integers(0, 256))
    else:  # random bytes behind a real magic number
        base = base[:8] + rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes()
    f = extract(bytes(base), orb)
    assert f.status in ("ok", "no_keypoints", "error"), f.status
    assert f.descriptors.dtype == np.uint8 and f.descriptors.shape[1:] == (32,)
    counts[f.status] = counts.get(f.status, 0) + 1
print(json.dumps(counts))
"""


def test_fuzz_kernel_in_a_subprocess():
    """Mutated JPEG/PNG/WebP/BMP/TIFF bytes: never a crash (a segfault would kill the
    subprocess, not pytest), every case classified."""
    r = subprocess.run([sys.executable, "-c", _FUZZ, "12345", "1200"], env=_env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert sum(counts.values()) == 1200
    assert counts.get("error", 0) > 100 and counts.get("ok", 0) > 50


# ---------------------------------------------------------------- security
@pytest.mark.s3
def test_canary_secrets_never_leak(s3, sample_dir, tmp_path):
    canary_key, canary_secret, canary_token = "AKIACANARY7Q2X", "sEcReTcAnArY9z8y", "tOkEnCaNaRy55"
    env = _env()
    env.update(AWS_ACCESS_KEY_ID=canary_key, AWS_SECRET_ACCESS_KEY=canary_secret,
               AWS_SESSION_TOKEN=canary_token)  # fmt: skip
    outputs = []
    # 1. a run that succeeds, secrets in storage options, with a performance report
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "fruitdask", "run", "-i", str(sample_dir), "-o", str(out),
         "--workers", "1", "--storage-option", f"secret={canary_secret}",
         "--storage-option", f"token={canary_token}", "--report", str(tmp_path / "report.html")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    outputs += [r.stdout, r.stderr]
    # 2. wrong credentials against the real S3 server
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/in")
    r = subprocess.run(
        [sys.executable, "-m", "fruitdask", "run", "-i", f"{bucket}/in", "-o", f"{bucket}/out",
         "--endpoint-url", s3.endpoint_url, "--storage-option", f"key={canary_key}",
         "--storage-option", f"secret={canary_secret}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and "access denied" in r.stderr, r.stderr
    outputs += [r.stdout, r.stderr]
    blobs = outputs + [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert (tmp_path / "report.html").stat().st_size > 10_000
    for canary in (canary_key, canary_secret, canary_token):
        assert not any(canary in b for b in blobs), canary
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["storage_options"]["secret"] == "***"


def test_local_cluster_listens_on_loopback_only(sample_dir, tmp_path):
    proc = _cli("run", "-i", str(sample_dir), "-o", str(tmp_path / "out"), "--workers", "2")
    try:
        _wait_for(proc, "Dask dashboard")
        addrs = set()
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            try:
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        addrs.add(c.laddr.ip)
            except psutil.NoSuchProcess:
                pass
        assert addrs and addrs <= {"127.0.0.1", "::1"}, addrs
    finally:
        proc.communicate(timeout=300)
    assert proc.returncode == 0
