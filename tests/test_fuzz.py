"""Fuzz the decode + ORB kernel (``fruitdask.features.extract``) with hypothesis.

Random bytes and mutations of valid JPEG / PNG / WebP / GIF / TIFF / BMP files
(bit flips, truncation, insertions, deletions, duplicated chunks, rewritten
header fields where the sizes live). The loop runs in a child process: a
segfault or an abort inside OpenCV kills the child, not pytest, and is reported
with the input that caused it (written to disk before each call). Every case must
be classified ``ok`` / ``no_keypoints`` / ``error`` with consistent fields.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

N_MUTATED = 600
N_RANDOM = 150
# A worker's memory must survive any input: a decode may take what max_pixels
# allows (40 Mpx of 8-bit gray, a few times that for a colour intermediate), not
# gigabytes because a few-kilobyte file says so. Growth of the peak above this
# for one case is reported with the input.
MAX_GROWTH_MIB = 512


# ---------------------------------------------------------------- child side
def _seeds() -> dict[str, bytes]:
    import io

    import cv2
    import numpy as np
    from PIL import Image

    from fruitdask import sample

    bgr = sample.render(5, 1, seed=3)
    rgb = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))

    def pil(im: Image.Image, fmt: str, **kw) -> bytes:
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    frames = [rgb, rgb.rotate(90)]
    return {
        "jpeg": cv2.imencode(".jpg", bgr)[1].tobytes(),
        "jpeg-progressive": pil(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": pil(rgb.convert("CMYK"), "JPEG"),
        "png": cv2.imencode(".png", bgr)[1].tobytes(),
        "png-16bit": pil(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"),
        "png-palette": pil(rgb.convert("P"), "PNG"),
        "webp": cv2.imencode(".webp", bgr)[1].tobytes(),
        "webp-lossless": pil(rgb, "WEBP", lossless=True),
        "gif": pil(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "tiff": pil(rgb, "TIFF", compression="tiff_deflate"),
        "tiff-multipage": pil(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "bmp": cv2.imencode(".bmp", bgr)[1].tobytes(),
    }  # fmt: skip


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    b = bytearray(data)
    for op in ops:
        n = max(len(b), 1)
        kind = op[0]
        if kind == "flip":
            if b:
                b[op[1] % n] ^= op[2]
        elif kind == "truncate":
            del b[op[1] % (n + 1) :]
        elif kind == "insert":
            b[op[1] % (n + 1) : op[1] % (n + 1)] = op[2]
        elif kind == "delete":
            start = op[1] % n
            del b[start : start + op[2]]
        elif kind == "header":  # the first bytes hold magic numbers, sizes, offsets
            if b:
                b[op[1] % min(n, 64)] = op[2]
        elif kind == "u16":  # an interesting 16-bit value over a header field
            if len(b) >= 2:
                at = op[1] % max(1, min(n, 64) - 1)
                b[at : at + 2] = op[2].to_bytes(2, op[3])
        elif kind == "dup":
            start = op[1] % n
            b[start:start] = b[start : start + op[2]]
    return bytes(b)


def fuzz_main(state_dir: str, n_mutated: int, n_random: int) -> None:
    """Run in the child: hypothesis drives ``extract``; prints counts as JSON."""
    import faulthandler
    import resource

    import numpy as np
    from hypothesis import HealthCheck, Phase, example, given, settings
    from hypothesis import strategies as st

    from fruitdask.features import DESCRIPTOR_BYTES, OrbParams, extract

    faulthandler.enable()
    seeds = _seeds()
    params = OrbParams()
    orb = params.create()
    current = os.path.join(state_dir, "current.bin")
    counts: dict[str, int] = {}
    hogs: list[dict] = []

    def peak_mib() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    def check(kind: str, data: bytes) -> None:
        with open(current, "wb") as f:  # the input of a crash survives the crash
            f.write(data)
        before = peak_mib()
        for detector in (orb, None):  # a reused detector and a fresh one agree
            f = extract(data, params, detector)
            assert f.status in ("ok", "no_keypoints", "error"), f.status
            d = f.descriptors
            assert isinstance(d, np.ndarray) and d.dtype == np.uint8, d.dtype
            assert d.ndim == 2 and d.shape[1] == DESCRIPTOR_BYTES, d.shape
            if f.status == "ok":
                assert len(d) > 0 and f.error is None
                assert 0 < f.width * f.height <= params.max_pixels
            elif f.status == "no_keypoints":
                assert len(d) == 0 and f.error is None
            else:
                assert len(d) == 0 and (f.width, f.height) == (0, 0)
                assert f.error and "\n" not in f.error and len(f.error) < 300, f.error
            if detector is orb:
                first = f
            else:
                assert (f.status, f.width, f.height) == (first.status, first.width, first.height)
                assert np.array_equal(f.descriptors, first.descriptors)
        counts[f.status] = counts.get(f.status, 0) + 1
        counts[f"{kind}:{f.status}"] = counts.get(f"{kind}:{f.status}", 0) + 1
        grown = peak_mib() - before
        if grown > MAX_GROWTH_MIB:
            saved = os.path.join(state_dir, f"memory-{len(hogs)}.bin")
            with open(saved, "wb") as fh:
                fh.write(data)
            hogs.append({"kind": kind, "bytes": len(data), "grew_mib": grown, "saved": saved,
                         "status": f.status})  # fmt: skip

    pos = st.integers(0, 1 << 20)
    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), pos, st.integers(1, 512)),
        st.tuples(st.just("header"), pos, st.integers(0, 255)),
        st.tuples(
            st.just("u16"),
            pos,
            st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF]),
            st.sampled_from(["big", "little"]),
        ),
        st.tuples(st.just("dup"), pos, st.integers(1, 1024)),
    )
    common = {
        "deadline": None,
        "database": None,
        "derandomize": True,
        "suppress_health_check": list(HealthCheck),
        "phases": [Phase.explicit, Phase.generate, Phase.shrink],
    }

    @settings(max_examples=n_mutated, **common)
    @given(kind=st.sampled_from(sorted(seeds)), ops=st.lists(op, min_size=1, max_size=8))
    # Seeds of known trouble, always tried: the length field of the PNG chunk after
    # IHDR (bytes 33-36) rewritten to ~2 GB; a JPEG / GIF / TIFF size field at its max.
    @example(kind="png", ops=[("header", 33, 0x7F)])
    @example(kind="png-palette", ops=[("header", 33, 0x7F)])
    @example(kind="jpeg", ops=[("u16", 0, 0xFFFF, "big")])
    @example(kind="gif", ops=[("u16", 6, 0xFFFF, "little"), ("u16", 8, 0xFFFF, "little")])
    @example(kind="tiff", ops=[("u16", 18, 0xFFFF, "little"), ("u16", 30, 0xFFFF, "little")])
    def mutated(kind: str, ops: list[tuple]) -> None:
        check(kind, _mutate(seeds[kind], ops))

    @settings(max_examples=n_random, **common)
    @given(
        magic=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a",
                               b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00", b"MM\x00*", b"BM"]),
        body=st.binary(max_size=4096),
    )  # fmt: skip
    def random_bytes(magic: bytes, body: bytes) -> None:
        check("random", magic + body)

    mutated()
    random_bytes()
    for kind, data in seeds.items():  # the unmutated seeds decode fine
        check(f"seed-{kind}", data)
        assert counts.get(f"seed-{kind}:ok"), kind
    print(json.dumps({"counts": counts, "peak_rss_mib": peak_mib(), "memory_hogs": hogs}))


# ---------------------------------------------------------------- parent side
def _child(cli, tmp_path: Path, *args: str, timeout: float = 540) -> subprocess.CompletedProcess:
    """This file as a script in a child process, with the CLI runs' environment."""
    try:
        return subprocess.run(
            [sys.executable, __file__, str(tmp_path), *args],
            cwd=tmp_path,
            env=cli.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        stuck = tmp_path / "current.bin"
        pytest.fail(f"the kernel hung (> {timeout}s) on {stuck} ({stuck.stat().st_size} bytes)")


def _verdict(r: subprocess.CompletedProcess, tmp_path: Path) -> dict:
    if r.returncode < 0:
        crash = tmp_path / "current.bin"
        pytest.fail(
            f"the kernel killed its process with {signal.Signals(-r.returncode).name} on "
            f"{crash} ({crash.stat().st_size} bytes, starts {crash.read_bytes()[:16]!r}):\n"
            f"{r.stderr[-3000:]}"
        )
    assert r.returncode == 0, r.stderr[-5000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_fuzz_extract_in_a_child_process(cli, tmp_path):
    result = _verdict(_child(cli, tmp_path, str(N_MUTATED), str(N_RANDOM)), tmp_path)
    counts = result["counts"]
    total = sum(v for k, v in counts.items() if k in ("ok", "no_keypoints", "error"))
    assert total >= N_MUTATED + N_RANDOM  # every case classified (hypothesis may add a few)
    # the mutations reach both sides: still-decodable images and rejected ones
    assert counts.get("ok", 0) > 50 and counts.get("error", 0) > 100, counts
    # no few-kilobyte input may take a worker's memory (it would be killed)
    assert result["memory_hogs"] == [], result


def test_the_harness_reports_a_crash(cli, tmp_path):
    """Self-check: a segfault in the child is a clear failure, with the input kept."""
    r = _child(cli, tmp_path, "crash", timeout=120)
    assert r.returncode == -signal.SIGSEGV
    assert (tmp_path / "current.bin").read_bytes() == b"crash input"
    with pytest.raises(pytest.fail.Exception, match="SIGSEGV"):
        _verdict(r, tmp_path)


if __name__ == "__main__":
    state = sys.argv[1]
    if sys.argv[2] == "crash":
        import ctypes
        import faulthandler

        faulthandler.enable()
        Path(state, "current.bin").write_bytes(b"crash input")
        ctypes.string_at(0)  # SIGSEGV
    fuzz_main(state, int(sys.argv[2]), int(sys.argv[3]))
