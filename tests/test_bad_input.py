"""A hostile corpus mixed among good images (issue 6).

Every listed file gets exactly one ``images/`` row with the right status (``ok``,
``no_keypoints``, or ``error`` with a one-line reason); good images come out
exactly as in a run over the good images alone; the run succeeds. The same
through S3 for what S3 can hold, and decompression bombs / oversized files must
not take a worker's memory down with them.
"""

from __future__ import annotations

import collections
import io as _io
import json
import os
import shutil
import struct
import subprocess
import sys
import unicodedata
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fruitdask import features, io, pipeline
from fruitdask.config import RunConfig

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- building hostile files
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _jpeg_declaring(w: int, h: int) -> bytes:
    """SOI, a baseline SOF0 frame header declaring w x h, and nothing else."""
    sof = struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8\xff\xc0" + sof + b"\xff\xd9"


def _gif_declaring(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b";"


def _webp_declaring(w: int, h: int) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def tiff_bomb(w: int, h: int) -> bytes:
    """A valid 8-bit grayscale TIFF of w x h zero pixels, a few kilobytes long: every
    deflate strip points at the same compressed block of zeros."""
    rows = 256
    strip = zlib.compress(b"\0" * (w * rows), 9)
    n = (h + rows - 1) // rows
    n_entries = 10
    offsets_at = 8 + 2 + n_entries * 12 + 4
    counts_at = offsets_at + 4 * n
    data_at = counts_at + 4 * n

    def entry(tag: int, typ: int, count: int, value: int) -> bytes:
        if typ == 3 and count == 1:
            return struct.pack("<HHIHH", tag, typ, count, value, 0)
        return struct.pack("<HHII", tag, typ, count, value)

    ifd = struct.pack("<H", n_entries) + b"".join(
        [
            entry(256, 4, 1, w),  # ImageWidth
            entry(257, 4, 1, h),  # ImageLength
            entry(258, 3, 1, 8),  # BitsPerSample
            entry(259, 3, 1, 8),  # Compression: deflate
            entry(262, 3, 1, 1),  # Photometric: min-is-black
            entry(273, 4, n, offsets_at),  # StripOffsets
            entry(277, 3, 1, 1),  # SamplesPerPixel
            entry(278, 4, 1, rows),  # RowsPerStrip
            entry(279, 4, n, counts_at),  # StripByteCounts
            entry(284, 3, 1, 1),  # PlanarConfiguration: contiguous
        ]
    )
    return (
        b"II*\x00"
        + struct.pack("<I", 8)
        + ifd
        + b"\x00\x00\x00\x00"
        + struct.pack(f"<{n}I", *([data_at] * n))
        + struct.pack(f"<{n}I", *([len(strip)] * n))
        + strip
    )


def _pil(im: Image.Image, fmt: str, **kw) -> bytes:
    b = _io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def hostile_files(good: bytes) -> dict[str, tuple[bytes, str, str | None]]:
    """relative path -> (bytes, expected status, text the error must hold)."""
    bgr = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    rgb = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    gray = rgb.convert("L")
    frames = [rgb, rgb.rotate(90), rgb.rotate(180)]
    png = _pil(rgb, "PNG")
    bad_ihdr_crc = bytearray(png)
    bad_ihdr_crc[29] ^= 0xFF  # the IHDR chunk's CRC
    idat = png.index(b"IDAT")
    bad_idat = bytearray(png)
    bad_idat[idat + 20] ^= 0xFF  # compressed pixel data, CRC now wrong
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    sixteen = np.asarray(gray).astype(np.uint16) * 257
    h = "Training/Hostile/"
    cases: dict[str, tuple[bytes, str, str | None]] = {
        # not images, or broken ones
        h + "zero.jpg": (b"", "error", "empty"),
        h + "truncated.jpg": (good[: len(good) // 2], "error", "decode"),
        h + "header-only.jpg": (good[:300], "error", "decode"),
        h + "bad-ihdr-crc.png": (bytes(bad_ihdr_crc), "error", "decode"),
        h + "bad-idat.png": (bytes(bad_idat), "error", "decode"),
        h + "text.jpg": (b"just some text, not a JPEG\n" * 40, "error", "decode"),
        h + "page.jpg": (b"<!DOCTYPE html><html><body><h1>404</h1></body></html>\n", "error", None),
        h + "svg.png": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "error", None),
        h + "pdf.tiff": (_pil(rgb, "PDF"), "error", None),
        h + "nul-bytes.png": (b"\0" * 4096, "error", None),
        h + "magic-only.png": (b"\x89PNG\r\n\x1a\n", "error", None),
        # unusual but valid images
        h + "anim.gif": (_pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0), "ok", None),
        h + "pages.tiff": (_pil(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "ok", None),
        h + "cmyk.jpg": (_pil(rgb.convert("CMYK"), "JPEG", quality=95), "ok", None),
        h + "progressive.jpg": (_pil(rgb, "JPEG", progressive=True), "ok", None),
        h + "exif-rotated.jpg": (_pil(rgb, "JPEG", exif=exif), "ok", None),
        h + "gray.jpg": (_pil(gray, "JPEG"), "ok", None),
        h + "sixteen.png": (_pil(Image.fromarray(sixteen), "PNG"), "ok", None),
        h + "sixteen.tif": (_pil(Image.fromarray(sixteen), "TIFF"), "ok", None),
        h + "rgba.png": (_pil(rgb.convert("RGBA"), "PNG"), "ok", None),
        h + "rgba.webp": (_pil(rgb.convert("RGBA"), "WEBP", lossless=True), "ok", None),
        h + "palette.png": (_pil(rgb.convert("P"), "PNG", transparency=0), "ok", None),
        h + "bilevel.bmp": (_pil(rgb.convert("1"), "BMP"), "ok", None),
        h + "really-a-png.jpg": (png, "ok", None),
        h + "UPPER.JPG": (good, "ok", None),
        h + "Mixed.JpEg": (good, "ok", None),
        # too small for any keypoint
        h + "one.png": (_pil(Image.new("RGB", (1, 1)), "PNG"), "no_keypoints", None),
        h + "one.jpg": (_pil(Image.new("RGB", (1, 1)), "JPEG"), "no_keypoints", None),
        h + "line.png": (_pil(Image.new("L", (5000, 1)), "PNG"), "no_keypoints", None),
        h + "blank.png": (_pil(Image.new("RGB", (100, 100), "white"), "PNG"), "no_keypoints", None),
        # decompression bombs: huge declared sizes in a few bytes
        h + "bomb.png": (_png_header_only(100_000, 100_000), "error", "too large"),
        h + "bomb.jpg": (_jpeg_declaring(65_000, 65_000), "error", "too large"),
        h + "bomb.gif": (_gif_declaring(65_535, 65_535), "error", "too large"),
        h + "bomb.webp": (_webp_declaring(16_000, 16_000), "error", "too large"),
        h + "bomb.tiff": (tiff_bomb(9_000, 9_000), "error", "too large"),
        h + "bomb-pgm.jpg": (b"P5 60000 60000 255\n" + b"\0" * 100, "error", None),
        # names: data, never code or format strings
        "Training/Äpfel 🍎 süß/fruit.jpg": (good, "ok", None),
        "Training/" + unicodedata.normalize("NFC", "Pomme é") + "/nfc.jpg": (good, "ok", None),
        "Training/" + unicodedata.normalize("NFD", "Pomme é") + "/nfd.jpg": (good, "ok", None),
        "Training/  spaced  out  /  lead and trail  .jpg": (good, "ok", None),
        "Training/Hostile/$(touch pwned) `touch pwned2`; rm -rf x.jpg": (good, "ok", None),
        "Training/Hostile/{0} {path!r} %s%n%(x)s.jpg": (good, "ok", None),
        "Training/Hostile/new\nline\ttab.jpg": (good, "ok", None),
        "Training/Hostile/bad\nname {0}.jpg": (b"not an image", "error", None),
        "Training/..x/.. /dots.jpg": (good, "ok", None),
        "Training/Hostile/.jpg": (good, "ok", None),
        "Training/Hostile/folder.jpg/inside.jpg": (good, "ok", None),
        "Training/Hostile/" + "/".join("d" * 1 for _ in range(400)) + "/deep.jpg": (good, "ok", None),
    }  # fmt: skip
    return cases


def _long_path(root: Path) -> str:
    """A relative path whose absolute form is just under PATH_MAX (4096 bytes),
    with components near NAME_MAX (255 bytes)."""
    budget = 4095 - len(os.fsencode(str(root))) - 1
    name = "n" * 240 + ".jpg"
    parts: list[str] = ["Training", "Long"]
    used = len("Training/Long/") + len(name)
    while used + 201 <= budget:
        parts.append("L" * 200)
        used += 201
    if budget - used > 1:
        parts.append("l" * min(250, budget - used - 1))
    return "/".join([*parts, name])


def write_corpus(root: Path, good: bytes) -> dict[str, tuple[str, str | None, bytes]]:
    """Write the hostile files under ``root``; returns path-in-output -> (status, reason,
    bytes). Entries named like images that are not files (a FIFO, a dangling link)
    get error rows naming what they are; a symlink to a folder and a file with
    another extension are not listed."""
    expected: dict[str, tuple[str, str | None, bytes]] = {}
    for rel, (blob, status, reason) in hostile_files(good).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
        expected[rel] = (status, reason, blob)
    long_rel = _long_path(root)
    os.makedirs(os.path.dirname(os.path.join(root, long_rel)), exist_ok=True)
    with open(os.path.join(root, long_rel), "wb") as f:
        f.write(good)
    expected[long_rel] = ("ok", None, good)
    # names that are not UTF-8 (legal on Linux): read by their bytes, shown escaped
    broot = os.fsencode(root)
    os.makedirs(os.path.join(broot, b"Training", b"caf\xe9"), exist_ok=True)
    with open(os.path.join(broot, b"Training", b"caf\xe9", b"pomme.jpg"), "wb") as f:
        f.write(good)
    expected["Training/caf\\xe9/pomme.jpg"] = ("ok", None, good)
    with open(os.path.join(broot, b"Training", b"Hostile", b"\xff\xfe-latin1-\xe9.jpg"), "wb") as f:
        f.write(b"\xff\xd8 broken")
    expected["Training/Hostile/\\xff\\xfe-latin1-\\xe9.jpg"] = ("error", None, b"\xff\xd8 broken")
    # a file that cannot be read (a link to a kernel file that refuses reads at 0)
    os.symlink("/proc/self/mem", root / "Training" / "Hostile" / "unreadable.jpg")
    expected["Training/Hostile/unreadable.jpg"] = ("error", "read", b"")
    # not files: an error row each, naming what it is, and never blocking the run
    os.mkfifo(root / "Training" / "Hostile" / "fifo.jpg")
    expected["Training/Hostile/fifo.jpg"] = ("error", "FIFO", b"")
    os.symlink(root / "nowhere.jpg", root / "Training" / "Hostile" / "dangling.jpg")
    expected["Training/Hostile/dangling.jpg"] = ("error", "broken symbolic link", b"")
    # not listed: a link to a folder (never followed: no cycles), another extension
    os.symlink("..", root / "Training" / "Hostile" / "loop")
    (root / "Training" / "Hostile" / "notes.txt").write_text("not an image extension")
    return expected


def _rows(url: str, table: str, so=None) -> list[dict]:
    fs, root = io.filesystem(url, so)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    assert fs.cat_file(f"{root}/_SUCCESS").decode().strip() == manifest["run_id"]
    rows = []
    for f in manifest["files"][table]:
        with fs.open(f"{root}/{f}", "rb") as fh:
            rows += pq.read_table(fh).to_pylist()
    return rows


def _descriptors(url: str, so=None) -> collections.Counter:
    return collections.Counter(
        (r["path"], r["keypoint"], r["descriptor"]) for r in _rows(url, "descriptors", so)
    )


@pytest.fixture(scope="module")
def good_only(sample_dir, dask_client, tmp_path_factory) -> tuple[list[dict], collections.Counter]:
    out = tmp_path_factory.mktemp("bad-input-ref") / "out"
    pipeline.run(RunConfig(input=str(sample_dir), output=str(out)), dask_client)
    return _rows(str(out), "images"), _descriptors(str(out))


def _check_rows(rows, expected, good_rows, good_desc, desc):
    counts = collections.Counter(r["path"] for r in rows)
    dupes = {p: n for p, n in counts.items() if n > 1}
    assert dupes == {}, f"paths with more than one row: {dupes}"
    got = {r["path"]: r for r in rows}
    missing = set(expected) - set(got)
    assert missing == set(), f"files with no row: {sorted(missing)}"
    extra = set(got) - set(expected) - {r["path"] for r in good_rows}
    assert extra == set(), f"rows for things that are not image files: {sorted(extra)}"
    wrong = {}
    for rel, (status, reason, blob) in expected.items():
        row = got[rel]
        if row["status"] != status:
            wrong[rel] = (row["status"], row["error"], f"expected {status}")
            continue
        if status == "error":
            if not row["error"] or "\n" in row["error"] or len(row["error"]) > 300:
                wrong[rel] = ("error without a one-line reason", row["error"])
            elif reason and reason not in row["error"]:
                wrong[rel] = (row["error"], f"expected a reason with {reason!r}")
            elif row["n_keypoints"] != 0:
                wrong[rel] = ("error row with keypoints", row["n_keypoints"])
        else:
            assert row["error"] is None, (rel, row["error"])
            ref = features.extract(blob)  # the kernel on the same bytes, directly
            if (row["n_keypoints"], row["width"], row["height"]) != (
                len(ref.descriptors), ref.width, ref.height,
            ):  # fmt: skip
                wrong[rel] = ("differs from the kernel", row["n_keypoints"], len(ref.descriptors))
            mine = sorted(d for p, _, d in desc.elements() if p == rel)
            if mine != sorted(bytes(d) for d in ref.descriptors):
                wrong[rel] = "descriptors differ from the kernel's"
        if row["size"] != len(blob) and not rel.endswith("unreadable.jpg"):
            wrong[rel] = ("size", row["size"], len(blob))
    assert wrong == {}
    # good images: exactly the rows and descriptors of a run over them alone
    for r in good_rows:
        assert got[r["path"]] == r, r["path"]
    good_paths = {r["path"] for r in good_rows}
    assert collections.Counter({k: v for k, v in desc.items() if k[0] in good_paths}) == good_desc


def test_hostile_corpus_local(sample_dir, good_only, dask_client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a `touch pwned` run by mistake would land here
    src = tmp_path / "in"
    shutil.copytree(sample_dir, src)
    good = next(iter(sorted(sample_dir.rglob("*.jpg")))).read_bytes()
    expected = write_corpus(src, good)
    out = tmp_path / "out"
    s = pipeline.run(RunConfig(input=str(src), output=str(out), partition_size=13), dask_client)
    rows = _rows(str(out), "images")
    good_rows, good_desc = good_only
    assert s.images == len(rows) == len(good_rows) + len(expected)
    _check_rows(rows, expected, good_rows, good_desc, _descriptors(str(out)))
    statuses = collections.Counter(st for st, _, _ in expected.values())
    assert s.images_error == statuses["error"]
    assert s.images_no_keypoints == statuses["no_keypoints"]
    assert not list(tmp_path.rglob("pwned*")) and not list(REPO.glob("pwned*"))
    # labels are the parent folder, split the Training/Test ancestor
    got = {r["path"]: r for r in rows}
    assert got["Training/Äpfel 🍎 süß/fruit.jpg"]["label"] == "Äpfel 🍎 süß"
    assert got["Training/caf\\xe9/pomme.jpg"]["label"] == "caf\\xe9"
    assert all(got[p]["split"] == "Training" for p in expected)


def test_file_vanishing_after_listing(sample_dir, dask_client, tmp_path):
    """A file deleted (or replaced by garbage) between the listing and the read gets
    an error row with the reason; the others are unaffected."""
    src = tmp_path / "in"
    shutil.copytree(sample_dir, src)
    cfg = RunConfig(input=str(src), output=str(tmp_path / "out"))
    listing = pipeline.list_input(cfg)
    victims = sorted(src.rglob("*.jpg"))[:2]
    victims[0].unlink()
    victims[1].write_bytes(b"replaced by text")
    s = pipeline.run(cfg, dask_client, listing=listing)
    got = {r["path"]: r for r in _rows(cfg.output, "images")}
    gone = got[victims[0].relative_to(src).as_posix()]
    assert gone["status"] == "error" and "not found" in gone["error"], gone
    assert got[victims[1].relative_to(src).as_posix()]["status"] == "error"
    assert s.images == len(listing) and s.images_error == 2


def test_escaped_names_stay_distinct(sample_dir, dask_client, tmp_path):
    """A folder whose name is not UTF-8 (``caf\\xe9`` in Latin-1) and one literally
    named ``caf\\xe9`` (a backslash, then ``xe9``) are two folders: each image gets
    its own row, and each row's descriptors are its own file's (a display name is
    one-to-one, the backslash is escaped too)."""
    src = tmp_path / "in"
    shutil.copytree(sample_dir, src)
    first, second = sorted(sample_dir.rglob("*.jpg"))[:2]
    latin1 = os.path.join(os.fsencode(src), b"Training", b"caf\xe9")
    literal = src / "Training" / "caf\\xe9"
    os.makedirs(latin1)
    literal.mkdir()
    with open(os.path.join(latin1, b"pomme.jpg"), "wb") as f:
        f.write(first.read_bytes())
    (literal / "pomme.jpg").write_bytes(second.read_bytes())
    out = tmp_path / "out"
    pipeline.run(RunConfig(input=str(src), output=str(out)), dask_client)
    rows = _rows(str(out), "images")
    got = {r["path"]: r for r in rows}
    assert len(got) == len(rows)  # no two rows share a path
    shown = {
        "Training/caf\\xe9/pomme.jpg": first.read_bytes(),  # the Latin-1 byte, escaped
        "Training/caf\\\\xe9/pomme.jpg": second.read_bytes(),  # the backslash, escaped
    }
    assert io.display_name(os.path.join(b"Training", b"caf\xe9", b"pomme.jpg")) in shown
    assert io.display_name("Training/caf\\xe9/pomme.jpg") in shown
    desc = _descriptors(str(out))
    for path, blob in shown.items():
        assert got[path]["status"] == "ok", got[path]
        assert got[path]["label"] == path.split("/")[1]
        ref = features.extract(blob)
        assert got[path]["n_keypoints"] == len(ref.descriptors)
        mine = sorted(d for p, _, d in desc.elements() if p == path)
        assert mine == sorted(bytes(d) for d in ref.descriptors), path
    assert sorted(d for p, _, d in desc.elements() if p in shown) != []
    assert first.read_bytes() != second.read_bytes()


# ---------------------------------------------------------------- S3
def _s3_safe(rel: str) -> bool:
    """What an S3 key can be: UTF-8, at most 1,024 bytes (and SeaweedFS keeps
    folder-like keys as folders, so no key may also be a prefix)."""
    return len(rel.encode()) < 900 and "folder.jpg/" not in rel and "/.. /" not in rel


@pytest.mark.s3
def test_hostile_corpus_s3(s3, sample_dir, good_only, dask_client, tmp_path):
    good = next(iter(sorted(sample_dir.rglob("*.jpg")))).read_bytes()
    objects = {
        rel: (blob, status, reason)
        for rel, (blob, status, reason) in hostile_files(good).items()
        if _s3_safe(rel)
    }
    bucket = s3.make_bucket()
    s3.upload_tree(sample_dir, f"{bucket}/in")
    fs = s3.fs()
    fs.pipe({f"{bucket.removeprefix('s3://')}/in/{rel}": b for rel, (b, _, _) in objects.items()})
    # an empty "folder" object named like an image
    fs.pipe(f"{bucket.removeprefix('s3://')}/in/Training/Hostile/empty-dir.jpg/", b"")
    expected = {rel: (st, reason, blob) for rel, (blob, st, reason) in objects.items()}
    out = f"{bucket}/out"
    so = s3.storage_options
    s = pipeline.run(
        RunConfig(input=f"{bucket}/in", output=out, storage_options=so, partition_size=13),
        dask_client,
    )
    rows = _rows(out, "images", so)
    good_rows, good_desc = good_only
    assert s.images == len(rows) == len(good_rows) + len(expected)
    _check_rows(rows, expected, good_rows, good_desc, _descriptors(out, so))


# ---------------------------------------------------------------- memory
_PEAK = r"""
import resource, sys
from fruitdask import features
data = open(sys.argv[1], "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
f = features.extract(data)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f.status, (peak - base) // 1024, f.error)
"""


def _png_chunk_length_lie(good: bytes) -> bytes:
    """A real PNG whose second chunk (after IHDR) claims to be ~2 GB long."""
    bgr = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    png = bytearray(cv2.imencode(".png", bgr)[1].tobytes())
    png[33:37] = struct.pack(">I", 0x7F000000)
    return bytes(png)


def _good_jpeg() -> bytes:
    from fruitdask import sample

    return cv2.imencode(".jpg", sample.render(2, 0, seed=1))[1].tobytes()


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("tiff-30000", lambda: tiff_bomb(30_000, 30_000), "too large"),
        ("png-30000", lambda: _png_header_only(30_000, 30_000), "too large"),
        ("jpeg-30000", lambda: _jpeg_declaring(30_000, 30_000), "too large"),
        ("png-chunk-2GB", lambda: _png_chunk_length_lie(_good_jpeg()), None),
    ],
    ids=["tiff-30000x30000", "png-30000x30000", "jpeg-30000x30000", "png-chunk-2GB"],
)
def test_bomb_is_refused_before_decoding(name, make, reason, tmp_path):
    """A few kilobytes declaring 900 megapixels (or a 2 GB chunk): refused without
    allocating what they declare (the kernel's extra peak memory stays far below it)."""
    path = tmp_path / name
    path.write_bytes(make())
    assert path.stat().st_size < 100_000
    r = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    status, extra_mib, error = r.stdout.split(" ", 2)
    assert status == "error", r.stdout
    assert reason is None or reason in error, error
    # 40 megapixels (the default limit) of 8-bit gray is 40 MB; 900 would be 900 MB
    assert int(extra_mib) < 100, f"{name}: decoding took {extra_mib} MiB before refusing"


@pytest.mark.slow
def test_oversized_inputs_do_not_kill_workers(sample_dir, tmp_path):
    """Workers with a 1 GiB memory limit (``--memory-limit 1GiB``) and, among good
    images, a 15 KB TIFF declaring 900 megapixels and a 2 GiB (sparse) file named
    .jpg: the run succeeds and both get an error row."""
    from fruitdask.cluster import ClusterSpec, connect

    src = tmp_path / "in"
    shutil.copytree(sample_dir, src)
    bad = src / "Training" / "Oversized"
    bad.mkdir()
    (bad / "bomb.tiff").write_bytes(tiff_bomb(30_000, 30_000))
    with open(bad / "video.jpg", "wb") as f:
        f.truncate(2 * 1024**3)
    out = tmp_path / "out"
    spec = ClusterSpec(workers=2, threads_per_worker=1, memory_limit="1GiB",
                       dashboard_address="127.0.0.1:0")  # fmt: skip
    with connect(spec) as (client, _):
        s = pipeline.run(RunConfig(input=str(src), output=str(out)), client)
    got = {r["path"]: r for r in _rows(str(out), "images")}
    assert got["Training/Oversized/bomb.tiff"]["status"] == "error"
    assert got["Training/Oversized/video.jpg"]["status"] == "error"
    assert s.images_error == 2 and s.images == len(got)
