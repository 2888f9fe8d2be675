"""The pure kernel against direct OpenCV calls, and a corpus of awkward inputs."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from fruitdask import features
from fruitdask.features import OrbParams, decode_gray, extract, image_size


def _fruit(seed: int = 0, size: tuple[int, int] = (100, 100)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    cv2.ellipse(img, (w // 2, h // 2), (w // 3, h // 4), 20, 0, 360, (30, 120, 200), -1)
    noise = rng.integers(0, 70, (h, w, 1), dtype=np.uint8)
    return cv2.subtract(img, np.repeat(noise, 3, axis=2))


def _jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def _png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("nfeatures", [30, 500])
def test_extract_matches_direct_opencv(nfeatures):
    data = _jpeg(_fruit(1))
    ref_gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    _, ref = cv2.ORB_create(nfeatures=nfeatures).detectAndCompute(ref_gray, None)
    got = extract(data, OrbParams(nfeatures=nfeatures))
    assert got.status == "ok"
    assert (got.width, got.height) == (100, 100)
    assert got.descriptors.dtype == np.uint8
    np.testing.assert_array_equal(got.descriptors, ref)
    assert len(got.descriptors) <= nfeatures


def test_orb_params_are_used():
    data = _jpeg(_fruit(2, (300, 300)))
    few = extract(data, OrbParams(nfeatures=10)).descriptors
    many = extract(data, OrbParams(nfeatures=500)).descriptors
    assert len(few) <= 10 < len(many)
    strict = extract(data, OrbParams(fast_threshold=80)).descriptors
    assert len(strict) < len(many)


def test_detector_reuse_gives_same_result():
    params = OrbParams()
    orb = params.create()
    for seed in range(3):
        data = _jpeg(_fruit(seed))
        np.testing.assert_array_equal(
            extract(data, params, orb).descriptors, extract(data, params).descriptors
        )


def test_blank_image_has_no_keypoints():
    got = extract(_jpeg(np.full((100, 100, 3), 255, np.uint8)))
    assert got.status == "no_keypoints"
    assert got.descriptors.shape == (0, 32)
    assert (got.width, got.height) == (100, 100)


def _gray_from_colour(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def test_image_kinds_decode_to_8bit_gray():
    img = _fruit(3)
    gray = _gray_from_colour(img)
    rgba = cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)
    rgba[:10, :10, 3] = 0
    sixteen = gray.astype(np.uint16) * 257
    cases = {
        "gray png": _png(gray),
        "rgba png": _png(rgba),
        "16-bit png": _png(sixteen),
        "bmp": cv2.imencode(".bmp", img)[1].tobytes(),
        "tiff": cv2.imencode(".tiff", img)[1].tobytes(),
        "webp": cv2.imencode(".webp", img)[1].tobytes(),
        "odd size": _jpeg(_fruit(4, (37, 211))),
    }
    for name, data in cases.items():
        g = decode_gray(data)
        assert g.dtype == np.uint8 and g.ndim == 2, name
        f = extract(data)
        assert f.status in ("ok", "no_keypoints"), (name, f.error)
    # 16-bit input is scaled to 8 bits, not truncated: same picture as the 8-bit one.
    np.testing.assert_allclose(decode_gray(_png(sixteen)).astype(int), gray.astype(int), atol=1)
    assert decode_gray(cases["odd size"]).shape == (37, 211)


def _palette_png(w: int = 8, h: int = 8) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)
    plte = bytes([0, 0, 0, 255, 255, 255])
    raw = b"".join(b"\x00" + bytes((x + y) % 2 for x in range(w)) for y in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"PLTE", plte)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_palette_png():
    g = decode_gray(_palette_png())
    assert g.shape == (8, 8)
    assert set(np.unique(g)) == {0, 255}


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, I am not a picture\n" * 10, "cannot decode"),
        (b"<html><body>404</body></html>", "cannot decode"),
    ],
)
def test_bad_bytes_are_errors_not_exceptions(data, reason):
    got = extract(data)
    assert got.status == "error"
    assert reason in got.error
    assert "\n" not in got.error
    assert got.descriptors.shape == (0, 32)


def test_truncated_jpeg_is_error_or_partial():
    data = _jpeg(_fruit(5))
    got = extract(data[: len(data) // 3])
    # libjpeg may decode a truncated file partially (grey fill) or refuse it;
    # either way the kernel must classify it and never raise.
    assert got.status in ("error", "ok", "no_keypoints")
    head = extract(data[:20])
    assert head.status == "error"


def test_tiny_image():
    got = extract(_png(np.zeros((1, 1), np.uint8)))
    assert got.status == "no_keypoints"
    assert (got.width, got.height) == (1, 1)


def test_decompression_bomb_refused_from_header():
    # A valid PNG header declaring 100000 x 100000 pixels: refused before decoding.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + crc + b"\x00" * 10
    assert image_size(bomb) == (100_000, 100_000)
    got = extract(bomb)
    assert got.status == "error" and "too large" in got.error
    # A real image above a small limit is refused too.
    got = extract(_jpeg(_fruit(6)), OrbParams(max_pixels=5_000))
    assert got.status == "error" and "too large" in got.error


@pytest.mark.parametrize("fmt", [".jpg", ".png", ".gif", ".bmp", ".webp"])
def test_header_size_matches_decoder(fmt):
    img = _fruit(7, (64, 120))
    if fmt == ".gif":
        pytest.importorskip("PIL")
        import io as _io

        from PIL import Image

        buf = _io.BytesIO()
        Image.fromarray(img[:, :, ::-1]).save(buf, format="GIF")
        data = buf.getvalue()
    else:
        ok, enc = cv2.imencode(fmt, img)
        assert ok
        data = enc.tobytes()
    assert image_size(data) == (120, 64)


def test_params_validate():
    with pytest.raises(ValueError):
        OrbParams(nfeatures=0)
    with pytest.raises(ValueError):
        OrbParams(scale_factor=1.0)
    assert features.DESCRIPTOR_BYTES == 32
