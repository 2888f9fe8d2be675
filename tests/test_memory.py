"""A worker paused for memory stops the run with one line, never a silent wait.

distributed pauses a worker whose process memory passes a fraction of its
limit (``distributed.worker.memory.pause``, 0.8 by default): it then starts no
task until its memory falls, so a run waiting on it waits for good.
"""

from __future__ import annotations

import re
import threading
import time

import dask
import pytest

from fruitdask.cancel import StopToken
from fruitdask.cluster import MemoryWatch, gather_as_completed
from fruitdask.errors import ClusterError, JobError

#: Unmanaged memory (not a task result), so spilling can never free it.
HOG_BYTES = 500 * 2**20


def _hog(dask_worker) -> int:
    dask_worker.fruitdask_test_hog = b"\x01" * HOG_BYTES  # written, so resident
    return len(dask_worker.fruitdask_test_hog)


def _double(x: int) -> int:
    return 2 * x


@pytest.fixture
def paused_worker():
    """One worker of 1 GiB that pauses at 30% and never spills, terminates or
    recovers: once it holds the hog it is paused for good."""
    from distributed import Client, LocalCluster

    settings = {
        "distributed.worker.memory.pause": 0.3,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.terminate": False,
    }
    with (
        dask.config.set(settings),
        LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="1GiB", processes=True,
                     host="127.0.0.1", dashboard_address=":0", silence_logs=40) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        assert list(client.run(_hog).values()) == [HOG_BYTES]
        yield client


def test_paused_worker_stops_the_wait_with_a_clear_error(paused_worker):
    client = paused_worker
    stop = StopToken()
    # a guard so that a broken watch fails this test instead of hanging it
    guard = threading.Timer(120, stop.fail, (JobError("the memory watch never fired"),))
    guard.start()
    try:
        with MemoryWatch(client, stop, patience=1.0, every=0.1) as watch:
            futures = client.map(_double, range(4))
            with pytest.raises(ClusterError) as caught:
                gather_as_completed(client, futures, stop)
    finally:
        guard.cancel()
    message = str(caught.value)
    worker = next(iter(client.scheduler_info()["workers"]))
    assert message.startswith(f"worker {worker} has been paused for ")
    assert "--memory-limit" in message and "\n" not in message
    assert re.fullmatch(r"memory: busiest worker at \d+% of its limit, 1 paused", watch.note())
    assert all(f.cancelled() for f in futures), "the waiting tasks were cancelled"


def test_pause_is_timed_from_when_it_was_first_seen(paused_worker):
    """The verdict on the scheduler's worker info, at chosen moments: not before
    ``patience`` seconds of pause, and a worker that recovers starts afresh."""
    watch = MemoryWatch(paused_worker, StopToken(), patience=30.0)
    _wait_paused(paused_worker)
    workers = paused_worker.scheduler_info()["workers"]
    assert watch.check(workers, now=1000.0) is None
    assert watch.check(workers, now=1029.9) is None
    recovered = {a: {**w, "status": "running"} for a, w in workers.items()}
    assert watch.check(recovered, now=1030.0) is None
    assert watch.check(workers, now=1031.0) is None, "a new pause is timed from its start"
    error = watch.check(workers, now=1061.0)
    assert isinstance(error, ClusterError) and "paused for 30 s" in str(error)


def test_a_healthy_cluster_is_left_alone(dask_client):
    stop = StopToken()
    with MemoryWatch(dask_client, stop, patience=1.0, every=0.05) as watch:
        assert gather_as_completed(dask_client, dask_client.map(_double, range(8)), stop) == [
            2 * i for i in range(8)
        ]
        error = watch.check(dask_client.scheduler_info()["workers"], now=0.0)
    assert error is None and not stop.requested
    assert re.fullmatch(r"memory: busiest worker at \d+% of its limit", watch.note())


def _wait_paused(client, timeout: float = 60.0) -> None:
    """Until the scheduler reports the worker paused (the worker's memory
    monitor looks every 100 ms), polled against a deadline."""
    deadline = time.monotonic() + timeout
    while not all(w["status"] == "paused" for w in client.scheduler_info()["workers"].values()):
        assert time.monotonic() < deadline, "the worker never paused"
        threading.Event().wait(0.05)


def test_cli_run_on_a_paused_worker_ends_in_one_line(cli, sample_dir, tmp_path):
    """Workers that pause as soon as they start (pause threshold 30% of 512 MiB,
    below an idle worker's memory): the run stops after ``--pause-timeout``,
    exit 2, one line naming the worker and the remedy, and no ``_SUCCESS``."""
    out = tmp_path / "out"
    r = cli.run("run", "-i", str(sample_dir), "-o", str(out), "--memory-limit", "512MiB",
                "--pause-timeout", "1", "--quiet", "--no-report",
                DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE="0.3")  # fmt: skip
    line = cli.one_line(r, "has been paused for", "--memory-limit", "--pause-timeout")
    assert re.search(r"worker tcp://127\.0\.0\.1:\d+ has been paused", line), line
    assert not (out / "_SUCCESS").exists()
