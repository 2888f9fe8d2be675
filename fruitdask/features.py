"""Pure image kernels: bytes -> grayscale ndarray -> ORB descriptors.

No I/O, no Dask: every function here takes bytes or arrays and returns arrays,
so it is testable without a cluster, a bucket or Spark, and the Spark parity job
calls exactly the same code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any

import cv2
import numpy as np

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DESCRIPTOR_BYTES",
    "MAX_PIXELS_CAP",
    "ImageFeatures",
    "OrbParams",
    "decode_gray",
    "extract",
    "image_size",
    "orb_descriptors",
]

#: Length of one ORB descriptor in bytes (256 binary tests).
DESCRIPTOR_BYTES = 32

# OpenCV checks its own limit (CV_IO_MAX_IMAGE_PIXELS, 2**30 by default) only
# after allocating; we check the declared header size first, so a 50-byte file
# declaring 100000x100000 pixels is refused before any memory is touched.
DEFAULT_MAX_PIXELS = 40_000_000
#: The most ``max_pixels`` may be raised to: OpenCV's own limit (CV_IO_MAX_IMAGE_PIXELS).
MAX_PIXELS_CAP = 2**30

# One thread per decode/ORB call: parallelism comes from Dask (or Spark)
# partitions. OpenCV's own thread pool would oversubscribe the cores.
cv2.setNumThreads(1)


def _param(default: float, help: str, low: float, high: float) -> Any:
    # The same metadata as fruitdask.config.setting (this module knows no config):
    # fruitdask.config builds the flags, help texts and dask.config keys from it.
    meta: dict[str, Any] = {"help": help, "key": None, "flag": None, "minimum": low,
                            "maximum": high}  # fmt: skip
    meta.update({"choices": None, "kind": type(default)})
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OrbParams:
    """ORB settings, OpenCV's defaults unless given.

    The original EMR job used ``nfeatures=30``; OpenCV's default is 500. The
    bounds keep a detector's memory small: 32 pyramid levels and a 1,024-pixel
    border are far beyond any useful setting for photos.
    """

    nfeatures: int = _param(500, "max keypoints per image", 1, 100_000)
    scale_factor: float = _param(1.2, "pyramid scale factor", 1.01, 4.0)
    nlevels: int = _param(8, "pyramid levels", 1, 32)
    edge_threshold: int = _param(31, "border without keypoints, pixels", 0, 1024)
    fast_threshold: int = _param(20, "FAST threshold", 0, 255)
    max_pixels: int = _param(
        DEFAULT_MAX_PIXELS,
        "refuse images larger than this, by their declared size, before decoding",
        1,
        MAX_PIXELS_CAP,
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value, m = getattr(self, f.name), f.metadata
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            if m["kind"] is int and not isinstance(value, int):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            if not m["minimum"] <= value <= m["maximum"]:
                raise ValueError(
                    f"{f.name} must be between {m['minimum']} and {m['maximum']}, got {value}"
                )

    def create(self) -> cv2.ORB:
        """A new ``cv2.ORB`` detector with these settings."""
        return cv2.ORB.create(
            nfeatures=self.nfeatures,
            scaleFactor=self.scale_factor,
            nlevels=self.nlevels,
            edgeThreshold=self.edge_threshold,
            patchSize=31,
            fastThreshold=self.fast_threshold,
        )


@dataclass(frozen=True)
class ImageFeatures:
    """What the kernel found in one image.

    Attributes
    ----------
    width, height : int
        Decoded size in pixels (0 when the image could not be decoded).
    descriptors : ndarray of shape (n_keypoints, 32), dtype uint8
        ORB descriptors; shape (0, 32) when there are none.
    status : {"ok", "no_keypoints", "error"}
    error : str or None
        One-line reason when ``status == "error"``.
    """

    width: int
    height: int
    descriptors: np.ndarray
    status: str
    error: str | None = None


_EMPTY = np.zeros((0, DESCRIPTOR_BYTES), dtype=np.uint8)


def image_size(data: bytes) -> tuple[int, int] | None:
    """Declared (width, height) from a PNG, JPEG, GIF, BMP, TIFF or WebP header.

    Returns None for formats it does not know; only the header is parsed.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        w, h = struct.unpack("<HH", data[6:10])
        return int(w), int(h)
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(int(w)), abs(int(h))
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            w = int.from_bytes(data[24:27], "little") + 1
            h = int.from_bytes(data[27:30], "little") + 1
            return w, h
        if chunk == b"VP8 " and len(data) >= 30:
            w, h = struct.unpack("<HH", data[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L" and len(data) >= 25:
            b = data[21:25]
            w = 1 + (((b[1] & 0x3F) << 8) | b[0])
            h = 1 + (((b[3] & 0xF) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
            return w, h
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth and ImageLength of a TIFF's first directory."""
    end = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return None
    (ifd,) = struct.unpack(end + "I", data[4:8])
    if ifd + 2 > len(data):
        return None
    (n,) = struct.unpack(end + "H", data[ifd : ifd + 2])
    dims: dict[int, int] = {}
    for k in range(n):
        e = ifd + 2 + 12 * k
        if e + 12 > len(data):
            break
        tag, typ = struct.unpack(end + "HH", data[e : e + 4])
        if tag in (256, 257):
            fmt = "H" if typ == 3 else "I"
            (dims[tag],) = struct.unpack(end + fmt, data[e + 8 : e + 8 + struct.calcsize(fmt)])
    if 256 in dims and 257 in dims:
        return dims[256], dims[257]
    return None


def _png_chunks_fit(data: bytes) -> str | None:
    """Why a PNG's chunk list cannot be right (a chunk longer than the file), or None.

    A decoder allocates what a chunk declares before reading it: a few-kilobyte
    file claiming a 2 GB chunk cost 1.6 GB of memory before OpenCV gave up.
    """
    i, n = 8, len(data)
    while i + 8 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        if length > n - i - 12:
            return f"corrupt PNG: a chunk declares {length} bytes, {n - i - 12} remain"
        if data[i + 4 : i + 8] == b"IEND":
            return None
        i += 12 + length
    return None


def max_file_bytes(max_pixels: int) -> int:
    """The largest file worth reading for a ``max_pixels`` image (uncompressed
    32-bit BMP, plus headers); anything bigger is refused unread."""
    return 4 * int(max_pixels) + 2**20


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg = int.from_bytes(data[i + 2 : i + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(w), int(h)
        i += 2 + seg
    return None


def decode_gray(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes straight to 8-bit grayscale.

    Parameters
    ----------
    data : bytes
        An encoded image (JPEG, PNG, GIF, BMP, TIFF, WebP ... anything OpenCV reads).
    max_pixels : int
        Refuse images whose declared or decoded size exceeds this many pixels
        (decompression bombs).

    Returns
    -------
    ndarray of shape (height, width), dtype uint8

    Raises
    ------
    ValueError
        With a one-line reason: empty, undecodable or too large.
    """
    if len(data) == 0:
        raise ValueError("empty file (0 bytes)")
    size = image_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ValueError(
            f"image too large: declared {size[0]}x{size[1]} exceeds {max_pixels} pixels"
        )
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        problem = _png_chunks_fit(data)
        if problem:
            raise ValueError(problem)
    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_GRAYSCALE converts colour, RGBA, palette and 16-bit input to 8-bit
    # gray inside the codec, which is cheaper than decoding colour then cvtColor.
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    except cv2.error as exc:  # OpenCV raises on some malformed headers
        raise ValueError(f"cannot decode image: {str(exc).strip().splitlines()[-1]}") from None
    if img is None:
        raise ValueError("cannot decode image (not an image, or corrupt/truncated)")
    if img.size > max_pixels:
        raise ValueError(
            f"image too large: {img.shape[1]}x{img.shape[0]} exceeds {max_pixels} pixels"
        )
    if img.dtype != np.uint8:  # defensive: IMREAD_GRAYSCALE yields 8-bit today
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
    return img


def orb_descriptors(gray: np.ndarray, params: OrbParams | None = None, orb=None) -> np.ndarray:
    """ORB descriptors of a grayscale image.

    Parameters
    ----------
    gray : ndarray of shape (height, width), dtype uint8
    params : OrbParams, optional
        Detector settings; OpenCV defaults when omitted.
    orb : cv2.ORB, optional
        A detector created by ``params.create()``, reused across calls to avoid
        re-creating it per image.

    Returns
    -------
    ndarray of shape (n_keypoints, 32), dtype uint8
        Empty (0, 32) when no keypoint is found (OpenCV returns None then).
    """
    if orb is None:
        orb = (params or OrbParams()).create()
    _, desc = orb.detectAndCompute(gray, None)
    if desc is None:
        return _EMPTY
    return desc


def extract(data: bytes, params: OrbParams | None = None, orb=None) -> ImageFeatures:
    """Decode + ORB for one encoded image; never raises for bad image bytes.

    Returns
    -------
    ImageFeatures
        ``status`` is ``"error"`` (with the reason) for undecodable input,
        ``"no_keypoints"`` when ORB finds nothing, else ``"ok"``.
    """
    params = params or OrbParams()
    try:
        gray = decode_gray(data, params.max_pixels)
    except ValueError as exc:
        return ImageFeatures(0, 0, _EMPTY, "error", str(exc))
    h, w = gray.shape[:2]
    # ORB keeps keypoints at least edge_threshold pixels from the border at every
    # pyramid level, so a smaller image cannot have any; OpenCV also asserts on
    # images one pixel wide. Answer without calling it.
    if min(h, w) < 2 or min(h, w) <= 2 * params.edge_threshold:
        return ImageFeatures(w, h, _EMPTY, "no_keypoints")
    try:
        desc = orb_descriptors(gray, params, orb)
    except cv2.error as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else "ORB failed"
        return ImageFeatures(w, h, _EMPTY, "error", f"ORB failed: {msg}")
    status = "ok" if len(desc) else "no_keypoints"
    return ImageFeatures(w, h, desc, status)
