"""A hostile model file never defeats ``fruitdask predict``'s guards (issue 13).

A model is untrusted input (it may be fetched from a URL). Every file here is
handed to ``fruitdask predict`` in a child process under an address-space limit
(``RLIMIT_AS``): it must end in exit 0 with a correct result, or exit 2 with
exactly one line on stderr, no traceback, and never die of the memory limit.

* one test per file that broke the old reader: a 15 KB zip inflating to 3.27 GB,
  sizes declaring 64 GB, deep JSON, a PCA of the wrong width, a model switching
  off the decompression-bomb guard (and the holes found while writing these:
  bzip2/LZMA members, encrypted members, a non-object ``meta``, an infinite
  ``k``, coefficients that overflow the softmax);
* a property-based test (hypothesis) mutating a valid model: bytes flipped,
  sizes rewritten in the zip directories and ``.npy`` headers, dtypes and shapes
  changed, deep or huge JSON, members swapped, dropped, recompressed or made
  bombs, ORB settings changed. Each case runs through the CLI's own entry point
  in a process forked from a server that imported fruitdask once (a fresh
  interpreter per case would cost ~2 s); the peak memory of the worst case is
  printed. ``-m slow`` runs many more cases.
"""

from __future__ import annotations

import io as _io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
#: The address space a predict gets. The interpreter with NumPy, OpenCV and
#: pandas imported maps ~0.7-0.9 GiB before reading anything.
LIMIT_AS = 3 << 29  # 1.5 GiB
N_EXAMPLES = 40
N_EXAMPLES_SLOW = 600


# ---------------------------------------------------------------- crafting files
def deflate_zeros(n: int) -> bytes:
    """A raw deflate stream inflating to ``n`` zero bytes, ~1/1000 of that: 1 MiB
    blocks compressed once, cut with a full flush (no back-reference crosses a
    block) and repeated; 3 GB take ~3 MB and well under a second to build."""
    mib = 1 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(mib)) + c.flush(zlib.Z_FULL_FLUSH)
    reps, rest = divmod(n, mib)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    return block * reps + last.compress(bytes(rest)) + last.flush()


def raw_zip(entries: list[dict]) -> bytes:
    """A zip written by hand, so that the declared sizes, CRC, method and flags
    are what the caller says (zipfile writes only the truth). Each entry:
    ``name``, ``data`` (as stored, already compressed), ``method`` (0 stored, 8
    deflate, 12 bzip2, 14 LZMA), ``size`` (declared uncompressed), ``crc``,
    ``flags``; zip64 fields when a size needs them."""
    out, central = bytearray(), bytearray()
    for e in entries:
        name, data = e["name"].encode(), e["data"]
        size, csize = e.get("size", len(data)), e.get("csize", len(data))
        z64 = size >= 0xFFFFFFFF or csize >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, csize) if z64 else b""
        fields = (
            45 if z64 else 20,
            e.get("flags", 0),
            e.get("method", 0),
            0,
            0x21,
            e.get("crc", zlib.crc32(data) if e.get("method", 0) == 0 else 0),
            0xFFFFFFFF if z64 else csize,
            0xFFFFFFFF if z64 else size,
        )
        offset = len(out)
        out += struct.pack("<4sHHHHHIII", b"PK\x03\x04", *fields)
        out += struct.pack("<HH", len(name), len(extra)) + name + extra + data
        central += struct.pack("<4sH", b"PK\x01\x02", fields[0])
        central += struct.pack("<HHHHHIII", *fields)
        central += struct.pack("<HHHHHII", len(name), len(extra), 0, 0, 0, 0, offset)
        central += name + extra
    n = len(entries)
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(central), len(out), 0)
    return bytes(out + central + eocd)


def members_of(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(_io.BytesIO(data)) as z:
        return {name: z.read(name) for name in z.namelist()}


def zip_of(members: dict[str, bytes] | list[tuple[str, bytes]], method: int = 8) -> bytes:
    buf = _io.BytesIO()
    items = members.items() if isinstance(members, dict) else members
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        for name, data in items:
            z.writestr(name, data)
    return buf.getvalue()


def npy_header(shape: tuple, descr: str = "<f4", fortran: bool = False) -> bytes:
    """A version 1.0 ``.npy`` header declaring whatever it is told."""
    d = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"
    pad = 64 - (10 + len(d) + 1) % 64
    body = (d + " " * pad + "\n").encode()
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


def npy(a: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def with_json(data: bytes, member: str, edit) -> bytes:
    m = members_of(data)
    doc = json.loads(m[member])
    edit(doc)
    m[member] = json.dumps(doc).encode()
    return zip_of(m)


def png_declaring(width: int, height: int) -> bytes:
    """A valid grey PNG of ``width`` x ``height`` black pixels, compressed ~1000:1."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    n = height * (width + 1)  # a filter byte, then the row
    idat = b"\x78\xda" + deflate_zeros(n) + struct.pack(">I", ((n % 65521) << 16) | 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- running predict
def run_limited(args: list[str], home: Path, env: dict, limit: int = LIMIT_AS, timeout=300):
    """``python -m fruitdask ARGS`` under ``RLIMIT_AS``; the result as a
    CompletedProcess plus ``peak_mib`` (the child's own peak RSS, from wait4)."""
    import threading

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out_path, err_path = home / "predict.out", home / "predict.err"
    with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
        p = subprocess.Popen(
            [sys.executable, "-m", "fruitdask", *args],
            cwd=home,
            env=env,
            stdout=out,
            stderr=err,
            preexec_fn=limit_memory,
        )
        watchdog = threading.Timer(timeout, p.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)  # Popen.wait would reap it without rusage
        finally:
            watchdog.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    r = subprocess.CompletedProcess(
        args, p.returncode, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    )
    r.peak_mib = usage.ru_maxrss / 1024
    return r


def one_line(r, *needles: str) -> str:
    """Exit 2, no traceback, exactly one line on stderr holding every needle."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("fruitdask: error: "), r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def image(sample_dir) -> Path:
    return sorted((sample_dir / "Test").rglob("*.jpg"))[0]


@pytest.fixture
def predict(cli, image):
    """Write ``data`` as a model and run predict on it (and the sample image)."""

    def go(data: bytes, *extra: str, images: tuple[str, ...] = ()):
        model = cli.home / "model.zip"
        model.write_bytes(data)
        args = ["predict", "-m", str(model), *(images or (str(image),)), *extra]
        r = run_limited(args, cli.home, cli.env)
        print(f"peak RSS {r.peak_mib:.0f} MiB: {r.stderr.strip()[:200]}")
        return r

    return go


# ---------------------------------------------------------------- the cases that broke
def test_a_valid_model_predicts_under_the_limit(tiny_model, predict):
    r = predict(tiny_model.to_bytes(), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert doc["predictions"][0]["status"] == "ok"


def test_a_15kb_zip_inflating_to_3gb_is_refused(tiny_model, predict):
    """arrays.npz holds a deflated centers.npy of 3.27 GB (the file is ~15 KB)."""
    n = 3_270_000_000
    head = npy_header((n // 32, 8))  # float32: 8 columns x 4 bytes
    m = members_of(tiny_model.to_bytes())
    arrays = members_of(m["arrays.npz"])

    def k100000(doc):  # dimensions whose arrays take ~4 MB: the npz's own size passes
        doc["vocabulary"]["k"] = 100_000

    for declared in (n, 1000):  # the truth, and a lie the reader must not believe
        centers = {"name": "centers.npy", "method": 8, "size": declared,
                   "data": zlib.compressobj(9, zlib.DEFLATED, -15).compress(head) + deflate_zeros(n)}  # fmt: skip
        rest = [{"name": k, "data": v} for k, v in arrays.items() if k != "centers.npy"]
        data = zip_of(dict(m, **{"arrays.npz": raw_zip([centers, *rest])}))
        assert len(data) < 100_000
        r = predict(data)  # arrays.npz inflates to 3 MB: more than 6 words x 3 classes need
        one_line(r, "arrays.npz declares")
        assert r.peak_mib < 1024  # the old reader took 3.27 GB
        r = predict(with_json(data, "model.json", k100000))
        one_line(r, "centers")
        assert r.peak_mib < 1024


def test_sizes_declaring_64gb_are_refused(tiny_model, predict):
    gb64 = 64 << 30
    m = members_of(tiny_model.to_bytes())
    arrays = members_of(m["arrays.npz"])
    # the .npy header declares 64 GB of float32
    huge = dict(arrays, **{"centers.npy": npy_header((gb64 // 32, 8)) + bytes(64)})
    one_line(predict(zip_of(dict(m, **{"arrays.npz": zip_of(huge, 0)}))), "centers")
    # the npz's directory declares a 64 GB member (zip64)
    entries = [{"name": k, "data": v} for k, v in arrays.items()]
    entries[0]["size"] = gb64
    one_line(predict(zip_of(dict(m, **{"arrays.npz": raw_zip(entries)}))), "declares")
    # the model's own directory declares a 64 GB arrays.npz
    outer = [{"name": k, "data": v} for k, v in m.items()]
    outer[-1]["size"] = gb64
    assert outer[-1]["name"] == "arrays.npz"
    one_line(predict(raw_zip(outer)), "arrays.npz", "declares")


@pytest.mark.parametrize("member", ["model.json", "pca.json"])
def test_deeply_nested_json_is_refused(tiny_model, predict, member):
    m = members_of(tiny_model.to_bytes())
    m[member] = b"[" * 200_000 + b"]" * 200_000
    one_line(predict(zip_of(m)), member)


def test_deep_json_inside_a_valid_model_is_refused(tiny_model, predict):
    deep: list = []
    for _ in range(900):  # parses (Python's limit is ~1000), but nothing may walk it
        deep = [deep]

    def edit(doc):
        doc["meta"]["input"] = deep

    one_line(predict(with_json(tiny_model.to_bytes(), "model.json", edit)), "nested")


def test_a_pca_of_the_wrong_width_is_refused(tiny_model, predict):
    rng = np.random.default_rng(1)

    def wide(doc):  # 64-byte "descriptors": loaded, then crashed in predict
        doc["mean"] = rng.random(64).tolist()
        doc["components"] = rng.random((4, 64)).tolist()
        doc["n_features"] = 64

    one_line(predict(with_json(tiny_model.to_bytes(), "pca.json", wide)), "PCA")

    def more_components(doc):  # 5 components for 4-wide words
        doc["components"] = rng.random((5, 32)).tolist()
        doc["explained_variance"] = [1.0] * 5
        doc["explained_variance_ratio"] = [0.1] * 5
        doc["n_components"] = 5

    one_line(predict(with_json(tiny_model.to_bytes(), "pca.json", more_components)), "centers")


def test_the_model_cannot_switch_off_the_bomb_guard(tiny_model, predict, cli):
    """A 20000 x 20000 PNG of ~390 KB (400 Mpx, decoded ~2 GB in the old code)
    against a model whose own ``orb.max_pixels`` is OpenCV's maximum."""
    from fruitdask.features import MAX_PIXELS_CAP

    bomb = cli.home / "bomb.png"
    bomb.write_bytes(png_declaring(20_000, 20_000))
    assert bomb.stat().st_size < 500_000

    def lift(doc):
        doc["orb"]["max_pixels"] = MAX_PIXELS_CAP

    r = predict(with_json(tiny_model.to_bytes(), "model.json", lift), images=(str(bomb),))
    one_line(r, "bomb.png", "too large")
    assert r.peak_mib < 1024  # never decoded (~200 MiB is the interpreter and libraries)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_members_compressed_other_than_deflate_are_refused(tiny_model, predict, method):
    """zipfile inflates bzip2 and LZMA members whole, whatever size they declare:
    a bomb. fruitdask writes deflate; nothing else is read."""
    m = members_of(tiny_model.to_bytes())
    bomb = npy_header((1 << 19, 8)) + bytes(1 << 24)  # 16 MiB of zeros: ~50 bytes of bzip2
    arrays = members_of(m["arrays.npz"])
    inner = zip_of(dict(arrays, **{"centers.npy": bomb}), method)
    inner_entries = []
    with zipfile.ZipFile(_io.BytesIO(inner)) as z:  # ... declaring a few bytes
        for info in z.infolist():
            raw = inner[info.header_offset :]
            start = 30 + sum(struct.unpack("<HH", raw[26:30]))
            inner_entries.append({"name": info.filename, "method": info.compress_type,
                                  "data": raw[start : start + info.compress_size],
                                  "size": min(info.file_size, 4096), "crc": info.CRC})  # fmt: skip
    one_line(predict(zip_of(dict(m, **{"arrays.npz": raw_zip(inner_entries)}))), "compress")
    one_line(predict(zip_of(m, method)), "compress")


def test_other_holes_are_one_line(tiny_model, predict):
    data = tiny_model.to_bytes()
    # an encrypted member: zipfile raises RuntimeError ("password required")
    b = bytearray(data)
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = b.find(sig)
        b[at + flag_at] |= 1
    one_line(predict(bytes(b)), "encrypted")

    def meta_string(doc):
        doc["meta"] = "ab"

    one_line(predict(with_json(data, "model.json", meta_string)), "meta")

    def infinite_k(doc):
        doc["vocabulary"]["k"] = float("inf")

    one_line(predict(with_json(data, "model.json", infinite_k)), "damaged")
    # finite coefficients whose products overflow: the softmax would answer NaN
    m = members_of(data)
    arrays = {k[:-4]: np.load(_io.BytesIO(v)) for k, v in members_of(m["arrays.npz"]).items()}
    arrays["coef"] = arrays["coef"] * 1e305
    buf = _io.BytesIO()
    np.savez(buf, **arrays)
    one_line(predict(zip_of(dict(m, **{"arrays.npz": buf.getvalue()}))), "coef")
