"""The peer jobs (benchmarks/peers: Ray Data, Daft) against the kernel itself.

Each peer runs as its own command on a tiny generated tree (plus an undecodable
file and an image too small for keypoints), and on the same tree packed into
Parquet shards (``fruitdask pack``), and what it wrote is read the way
a careful reader reads it (the manifest's files, after ``_SUCCESS``) and
compared with direct calls of :func:`fruitdask.features.extract` on the same
files: the (path, descriptor) multiset, each image's status and keypoint count,
the schemas, and the features as the saved model projects the descriptors.

Needs the ``peers`` extra (``pip install -e ".[peers]"``); a peer whose engine
is not installed is skipped.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from fruitdask import features, sample, source, tables
from fruitdask.pca import PcaModel

pytestmark = pytest.mark.peers

REPO = Path(__file__).resolve().parents[1]
PEERS = {"ray": "benchmarks.peers.ray_job", "daft": "benchmarks.peers.daft_job"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("peers") / "fruits"
    sample.generate(root, classes=2, per_class=6, seed=3)
    odd = root / "Training" / "Odd"
    odd.mkdir(parents=True)
    (odd / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    ok, png = cv2.imencode(".png", np.full((20, 20, 3), 255, np.uint8))
    assert ok
    (odd / "small.png").write_bytes(png.tobytes())  # too small for ORB: no keypoints
    return root


@pytest.fixture(scope="module")
def expected(tiny):
    """What the kernel finds, file by file, and the listing's rows."""
    listing = source.list_input(str(tiny))
    params = features.OrbParams()
    images, descs = {}, collections.Counter()
    for rel in listing["path"]:
        f = features.extract((tiny / rel).read_bytes(), params)
        images[rel] = (f.status, len(f.descriptors), f.width, f.height)
        descs.update((rel, d.tobytes()) for d in f.descriptors)
    return listing, images, descs


def _run(engine: str, inp: Path, out: Path, *extra: str) -> dict:
    if importlib.util.find_spec(engine) is None:
        pytest.skip(f"{engine} is not installed (pip install -e '.[peers]')")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", PEERS[engine], "--input", str(inp), "--output", str(out),
           "--cores", "2", "--json", "--quiet", *extra]  # fmt: skip
    got = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    return json.loads(got.stdout.strip().splitlines()[-1])


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _read(out: Path, table: str):
    m = _manifest(out)
    assert (out / "_SUCCESS").read_text().strip() == m["run_id"]
    files = [str(out / f) for f in m["files"][table]]
    assert files, f"no {table} files"
    return ds.dataset(files, format="parquet").to_table(), files


@pytest.fixture(scope="module")
def tiny_packed(tiny, dask_client, tmp_path_factory) -> Path:
    """The same images packed into Parquet shards (``fruitdask pack``), which
    each peer reads with its own ``read_parquet``."""
    from fruitdask import pack

    dst = tmp_path_factory.mktemp("peers-packed") / "packed"
    pack.pack(str(tiny), str(dst), dask_client, shard_size=5, row_group_size=2)
    return dst


@pytest.fixture(scope="module", params=[(e, layout) for e in sorted(PEERS)
                                        for layout in ("loose", "packed")],
                ids=lambda p: "-".join(p))  # fmt: skip
def peer(request, tiny, tmp_path_factory):
    engine, layout = request.param
    inp = tiny if layout == "loose" else request.getfixturevalue("tiny_packed")
    out = tmp_path_factory.mktemp(f"out-{engine}-{layout}") / "result"
    summary = _run(engine, inp, out)
    return engine, out, summary


def test_success_and_manifest(peer, expected):
    engine, out, summary = peer
    listing, images, descs = expected
    assert (out / "_SUCCESS").exists()
    m = _manifest(out)
    assert m["engine"] == engine
    statuses = collections.Counter(s for s, *_ in images.values())
    assert m["counts"]["images"] == len(images) == summary["images"]
    assert m["counts"]["ok"] == statuses["ok"]
    assert m["counts"]["no_keypoints"] == statuses["no_keypoints"] == 1
    assert m["counts"]["error"] == statuses["error"] == 1
    assert m["counts"]["descriptors"] == sum(descs.values()) == summary["descriptors"]
    for stage in ("startup", "listing", "extract", "pca_fit", "transform_write", "publish"):
        assert stage in m["timings"]
    assert m["pca"]["n_components"] == 20
    assert engine in m["versions"]
    for table in tables.TABLES:
        on_disk = sorted(p.relative_to(out).as_posix() for p in (out / table).glob("*.parquet"))
        assert sorted(m["files"][table]) == on_disk


def test_descriptor_multiset_is_the_kernels(peer, expected):
    _, out, _ = peer
    t, _ = _read(out, "descriptors")
    got = collections.Counter(
        zip(t.column("path").to_pylist(), t.column("descriptor").to_pylist(), strict=True)
    )
    assert got == expected[2]
    # keypoints numbered 0..n-1 within each image
    per_path = collections.defaultdict(list)
    for p, k in zip(t.column("path").to_pylist(), t.column("keypoint").to_pylist(), strict=True):
        per_path[p].append(k)
    assert all(sorted(ks) == list(range(len(ks))) for ks in per_path.values())


def test_image_rows_agree(peer, expected):
    _, out, _ = peer
    listing, images, _ = expected
    t, _ = _read(out, "images")
    rows = {r["path"]: r for r in t.to_pylist()}
    assert set(rows) == set(images)
    for path, (status, n, w, h) in images.items():
        r = rows[path]
        assert (r["status"], r["n_keypoints"], r["width"], r["height"]) == (status, n, w, h), path
        assert (r["error"] is None) == (status != "error"), path
    want = {p: (lb, sp, sz) for p, lb, sp, sz in listing[["path", "label", "split", "size"]]
            .itertuples(index=False)}  # fmt: skip
    assert {p: (r["label"], r["split"], r["size"]) for p, r in rows.items()} == want


def test_schemas_are_fruitdasks(peer):
    _, out, _ = peer
    for table, schema in (("images", tables.IMAGES_SCHEMA),
                          ("descriptors", tables.DESCRIPTORS_SCHEMA),
                          ("features", tables.FEATURES_SCHEMA)):  # fmt: skip
        _, files = _read(out, table)
        for f in files:
            assert pq.read_schema(f).remove_metadata().equals(schema), (table, f)


def test_features_are_the_models_projection(peer):
    _, out, _ = peer
    m = _manifest(out)
    model = PcaModel.from_json((out / m["files"]["model"][0]).read_text())
    assert model.method == "exact" and model.n_components == 20
    d, _ = _read(out, "descriptors")
    f, _ = _read(out, "features")
    assert f.num_rows == d.num_rows
    desc = {
        (p, k): np.frombuffer(b, np.uint8)
        for p, k, b in zip(
            d.column("path").to_pylist(),
            d.column("keypoint").to_pylist(),
            d.column("descriptor").to_pylist(),
            strict=True,
        )  # fmt: skip
    }
    keys = list(zip(f.column("path").to_pylist(), f.column("keypoint").to_pylist(), strict=True))
    x = np.stack([desc[k] for k in keys])
    got = np.asarray(f.column("pca").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, model.transform(x), rtol=1e-5, atol=1e-3)
    assert np.abs(got.mean(axis=0)).max() < 1e-2 * got.std(axis=0).max()  # centred


_LISTENING = """
import json, psutil
from benchmarks.peers import ray_job
tmp = ray_job.start_ray(1)
try:
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
    names = {}
    for p in me.children(recursive=True):
        try:
            names[p.pid] = p.name()
        except psutil.Error:
            pass
    found = [(c.laddr.ip, names.get(c.pid, "driver")) for c in psutil.net_connections("inet")
             if c.pid in pids and c.status == psutil.CONN_LISTEN]
finally:
    ray_job.stop_ray(tmp)
print(json.dumps(found))
"""


def test_ray_listens_on_loopback_only():
    """Ray's servers (GCS, raylet, agents; workers as they come) bind 127.0.0.1 only.

    ``ray.init`` returns once the GCS and the raylet serve, so they are listening
    when the sockets are listed; whatever else is up by then is checked too."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install -e '.[peers]')")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    got = subprocess.run([sys.executable, "-c", _LISTENING], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert got.returncode == 0, got.stderr[-3000:]
    found = json.loads(got.stdout.strip().splitlines()[-1])
    names = {n for _, n in found}
    assert {"gcs_server", "raylet"} <= names, found
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip, _ in found), found


def test_ray_overwrite_publishes_its_own_files_only(tiny, tmp_path):
    """Ray names its Parquet files without the run id: an overwrite's manifest
    lists only the files this run wrote, and the cleanup removes the old ones."""
    out = tmp_path / "result"
    first = _run("ray", tiny, out)
    old = {t: set(_manifest(out)["files"][t]) for t in ("images", "descriptors", "features")}
    second = _run("ray", tiny, out, "--overwrite")
    assert second["run_id"] != first["run_id"]
    m = _manifest(out)
    for t, before in old.items():
        on_disk = {f"{t}/{p.name}" for p in (out / t).glob("*.parquet")}
        assert set(m["files"][t]) == on_disk and not on_disk & before, t
