"""Bad arguments and configuration through the real CLI (a subprocess each).

The contract (issue 6): exactly one line on stderr that names the thing at
fault, no traceback, exit code 2, and nothing written at the output, whether the
mistake is a flag, a setting from dask.config, an unreachable scheduler, a bad
credential, a missing bucket or an output that cannot be written.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fruitdask.testing import free_port


def _one_line(cli, r, *needles: str) -> str:
    line = cli.one_line(r, *needles)
    assert line.startswith(("fruitdask: error:", "fruitdask run: error:")), line
    return line


def _tree(path: Path) -> list[str]:
    if not path.exists():
        return []
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    from fruitdask import sample

    root = tmp_path_factory.mktemp("cli-errors") / "fruits"
    sample.generate(root, classes=3, per_class=3, seed=2)
    return root


# ---------------------------------------------------------------- arguments
# (arguments after `run`, text the error line must hold); {in} is a good input,
# {out} the output that must stay unwritten.
ARGUMENT_CASES = {
    "unknown-flag": (["-i", "{in}", "-o", "{out}", "--no-such-flag"], ["--no-such-flag"]),
    "unknown-flag-typo": (["-i", "{in}", "-o", "{out}", "--partition-sise", "5"], ["sise"]),
    "partition-size-0": (["-i", "{in}", "-o", "{out}", "--partition-size", "0"], ["partition"]),
    "partition-size-negative": (
        ["-i", "{in}", "-o", "{out}", "--partition-size", "-5"],
        ["partition", "-5"],
    ),
    "partition-size-not-int": (
        ["-i", "{in}", "-o", "{out}", "--partition-size", "ten"],
        ["--partition-size", "ten"],
    ),
    "n-components-33": (["-i", "{in}", "-o", "{out}", "--n-components", "33"], ["n-components"]),
    "n-components-0": (["-i", "{in}", "-o", "{out}", "--n-components", "0"], ["n-components"]),
    "workers-negative": (["-i", "{in}", "-o", "{out}", "--workers", "-2"], ["workers"]),
    "threads-0": (["-i", "{in}", "-o", "{out}", "--threads-per-worker", "0"], ["thread"]),
    "nfeatures-negative": (["-i", "{in}", "-o", "{out}", "--nfeatures", "-1"], ["nfeatures"]),
    "max-pixels-0": (["-i", "{in}", "-o", "{out}", "--max-pixels", "0"], ["max-pixels"]),
    "pca-batch-negative": (
        ["-i", "{in}", "-o", "{out}", "--pca-batch-size", "-100"],
        ["pca-batch-size"],
    ),
    "pca-sample-negative": (["-i", "{in}", "-o", "{out}", "--pca-sample", "-1"], ["--pca-sample"]),
    "scale-factor-below-1": (["-i", "{in}", "-o", "{out}", "--scale-factor", "0.5"], ["scale"]),
    "pca-unknown": (["-i", "{in}", "-o", "{out}", "--pca", "svd"], ["--pca", "svd"]),
    "overwrite-and-resume": (["-i", "{in}", "-o", "{out}", "--overwrite", "--resume"], ["resume"]),
    "storage-option-no-equals": (
        ["-i", "{in}", "-o", "{out}", "--storage-option", "anon"],
        ["--storage-option", "anon"],
    ),
    "cluster-unknown": (["-i", "{in}", "-o", "{out}", "--cluster", "yarn"], ["yarn"]),
    "memory-limit-nonsense": (
        ["-i", "{in}", "-o", "{out}", "--workers", "1", "--memory-limit", "lots"],
        ["lots"],
    ),
    "host-not-an-address": (
        ["-i", "{in}", "-o", "{out}", "--workers", "1", "--host", "999.1.1.1"],
        ["999.1.1.1"],
    ),
    "dashboard-address-nonsense": (
        ["-i", "{in}", "-o", "{out}", "--workers", "1", "--dashboard-address", "nowhere"],
        ["nowhere"],
    ),
    "missing-input": (["-i", "{tmp}/no/such/folder", "-o", "{out}"], ["{tmp}/no/such/folder"]),
    "input-is-a-file": (["-i", "{file}", "-o", "{out}"], ["{file}"]),
    "input-without-images": (["-i", "{empty}", "-o", "{out}"], ["{empty}", "no image"]),
    "input-unknown-protocol": (["-i", "nosuchproto://x/y", "-o", "{out}"], ["nosuchproto://x/y"]),
}


@pytest.mark.parametrize("case", sorted(ARGUMENT_CASES))
def test_bad_argument_one_line_exit_2_nothing_written(case, small, tmp_path, cli):
    args, needles = ARGUMENT_CASES[case]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    (tmp_path / "a-file.jpg").write_bytes(b"not a folder")
    subs = {
        "in": str(small),
        "out": str(tmp_path / "out"),
        "tmp": str(tmp_path),
        "file": str(tmp_path / "a-file.jpg"),
        "empty": str(tmp_path / "empty"),
    }
    r = cli.run("run", *[a.format(**subs) for a in args])
    _one_line(cli, r, *[n.format(**subs) for n in needles])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- configuration
# Settings from dask.config (DASK_FRUITDASK__* variables, as from a YAML file):
# wrong values must be reported like wrong flags.
CONFIG_CASES = {
    "partition-size": ({"DASK_FRUITDASK__PARTITION_SIZE": "-3"}, ["partition"]),
    "n-components-text": ({"DASK_FRUITDASK__PCA__N_COMPONENTS": "many"}, ["many"]),
    "n-components-big": ({"DASK_FRUITDASK__PCA__N_COMPONENTS": "64"}, ["n-components"]),
    "workers-text": ({"DASK_FRUITDASK__CLUSTER__WORKERS": "two"}, ["two"]),
    "pca-method": ({"DASK_FRUITDASK__PCA__METHOD": "magic"}, ["magic"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_configuration_one_line_exit_2_nothing_written(case, small, tmp_path, cli):
    extra, needles = CONFIG_CASES[case]
    out = tmp_path / "out"
    r = cli.run("run", "-i", str(small), "-o", str(out), **extra)
    _one_line(cli, r, *needles)
    assert not out.exists()


# ---------------------------------------------------------------- output not writable
def test_output_not_writable(small, tmp_path, cli):
    """Outputs that cannot be created (a file in the way; /proc, read-only even for
    root): one line naming the output and saying it cannot be written."""
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("a file where a folder would have to be")
    for out in (blocker / "out", Path("/proc") / f"fruitdask-{uuid.uuid4().hex[:8]}"):
        r = cli.run("run", "-i", str(small), "-o", str(out))
        line = _one_line(cli, r, str(out))
        reason = line.replace(str(out), "").lower()  # (the test's own path says "writable")
        assert "writ" in reason, line  # "cannot write", "not writable"
        assert not out.exists()
    assert blocker.read_text().startswith("a file")


def test_report_not_writable_is_refused_before_the_run(small, tmp_path, cli):
    """--report is part of the configuration: a report that cannot be written is
    refused up front, not discovered after the output was published."""
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("x")
    out = tmp_path / "out"
    r = cli.run("run", "-i", str(small), "-o", str(out), "--workers", "1", "--quiet",
                "--report", str(blocker / "report.html"))  # fmt: skip
    _one_line(cli, r, "report")
    assert not out.exists(), _tree(out)


def test_a_folder_of_other_files_is_refused_and_left_alone(small, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    for extra in ([], ["--resume"], ["--overwrite"]):
        r = cli.run("run", "-i", str(small), "-o", str(out), *extra)
        _one_line(cli, r, str(out), "fruitdask did not write")
        assert _tree(out) == ["precious.txt"]


# ---------------------------------------------------------------- cluster
@pytest.mark.slow
def test_unreachable_scheduler(small, tmp_path, cli):
    port = free_port()  # bound then released: nothing listens there
    address = f"tcp://127.0.0.1:{port}"
    out = tmp_path / "out"
    r = cli.run("run", "-i", str(small), "-o", str(out), "--cluster", address,
                "--connect-timeout", "3")  # fmt: skip
    _one_line(cli, r, address)
    assert not out.exists()


# ---------------------------------------------------------------- S3
def _s3_args(s3, key: str, secret: str) -> list[str]:
    return [
        "--endpoint-url",
        s3.endpoint_url,
        "--storage-option",
        f"key={key}",
        "--storage-option",
        f"secret={secret}",
    ]


def _keys_under(s3, url: str) -> list[str]:
    fs = s3.fs()
    path = url.removeprefix("s3://")
    fs.invalidate_cache()
    try:
        return sorted(fs.find(path))
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def s3_input(s3, small):
    bucket = s3.make_bucket()
    s3.upload_tree(small, f"{bucket}/in")
    return bucket


@pytest.mark.s3
@pytest.mark.parametrize("where", ["input", "output", "both"])
def test_s3_wrong_credentials(s3, s3_input, small, tmp_path, where, cli):
    from fruitdask.testing import S3_KEY, S3_SECRET

    bucket = s3_input
    wrong = ("AKIAWRONG" + uuid.uuid4().hex[:8].upper(), "wrong-" + uuid.uuid4().hex)
    if where == "input":  # S3 input, local output: the credentials fail the listing
        args = ["-i", f"{bucket}/in", "-o", str(tmp_path / "out"), *_s3_args(s3, *wrong)]
        fault = f"{bucket}/in"
    elif where == "output":  # local input, S3 output
        args = ["-i", str(small), "-o", f"{bucket}/out-{where}", *_s3_args(s3, *wrong)]
        fault = f"{bucket}/out-{where}"
    else:
        args = ["-i", f"{bucket}/in", "-o", f"{bucket}/out-{where}", *_s3_args(s3, *wrong)]
        fault = f"{bucket}/in"
    r = cli.run("run", *args)
    line = _one_line(cli, r, fault)
    assert "access denied" in line or "credential" in line, line
    assert not (tmp_path / "out").exists()
    assert _keys_under(s3, f"{bucket}/out-{where}") == []
    # and the right credentials still work on the same bucket (the server is fine)
    assert _keys_under(s3, f"{bucket}/in") and S3_KEY and S3_SECRET


@pytest.mark.s3
@pytest.mark.parametrize("where", ["input", "output"])
def test_s3_missing_bucket(s3, s3_input, small, tmp_path, where, cli):
    from fruitdask.testing import S3_KEY, S3_SECRET

    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}"
    if where == "input":
        args = ["-i", f"{missing}/in", "-o", str(tmp_path / "out")]
        fault = f"{missing}/in"
    else:
        args = ["-i", str(small), "-o", f"{missing}/out"]
        fault = f"{missing}/out"
    r = cli.run("run", *args, *_s3_args(s3, S3_KEY, S3_SECRET))
    line = _one_line(cli, r, fault)
    assert "not found" in line or "does not exist" in line or "no such" in line.lower(), line
    assert not (tmp_path / "out").exists()
    # the bucket must not have been created as a side effect
    assert not s3.fs().exists(missing.removeprefix("s3://"))


@pytest.mark.s3
def test_s3_missing_prefix_and_no_images(s3, s3_input, tmp_path, cli):
    from fruitdask.testing import S3_KEY, S3_SECRET

    bucket = s3_input
    fs = s3.fs()
    fs.pipe(f"{bucket.removeprefix('s3://')}/docs/readme.txt", b"no images here")
    for url, needle in ((f"{bucket}/nothing-here", "not found"), (f"{bucket}/docs", "no image")):
        out = f"{bucket}/out-{uuid.uuid4().hex[:6]}"
        r = cli.run("run", "-i", url, "-o", out, *_s3_args(s3, S3_KEY, S3_SECRET))
        _one_line(cli, r, url, needle)
        assert _keys_under(s3, out) == []


def test_s3_endpoint_not_listening(small, tmp_path, cli):
    """An endpoint URL where nothing listens: one line naming it, after one TCP
    connection (no client retries behind it), before any cluster starts."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    r = cli.run("run", "-i", "s3://some-bucket/in", "-o", str(tmp_path / "out"),
                "--endpoint-url", endpoint, "--storage-option", "key=k",
                "--storage-option", "secret=s", timeout=120)  # fmt: skip
    _one_line(cli, r, endpoint, "cannot reach")
    assert "Dask dashboard" not in r.stderr
    assert not (tmp_path / "out").exists()
