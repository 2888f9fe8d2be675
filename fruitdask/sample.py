"""A generated, Fruits-360-like data set: the embedded default input.

The tree has the layout of Fruits-360::

    OUT_DIR/Training/<Class Name>/<i>_100.jpg
    OUT_DIR/Test/<Class Name>/<i>_100.jpg

100x100 RGB JPEGs of one "fruit" on white. Each class has a fixed look (outline,
size, elongation, colour, a surface texture: spots, speckles, stripes, net,
scales, bumps, ribs, berry clusters, mottling; a stem or not) that depends on the
class only, so data sets generated with different seeds hold the same classes
with different instances. Each image varies pose (rotation, scale, offset),
lighting and the texture's random layout. ORB finds 10-60 keypoints on typical
images, like on real Fruits-360 photos, and the classes differ in the grayscale
texture ORB describes.

Images are written by a process pool; a marker file (written last) makes a
finished tree a cache: generating it again with the same parameters returns at once.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fruitdask.errors import OutputExistsError

__all__ = [
    "CLASS_NAMES",
    "ClassLook",
    "SampleSummary",
    "class_look",
    "class_names",
    "generate",
    "generate_total",
    "render",
]

#: The 131 class names of Fruits-360 (2020 release).
CLASS_NAMES: tuple[str, ...] = (
    "Apple Braeburn", "Apple Crimson Snow", "Apple Golden 1", "Apple Golden 2",
    "Apple Golden 3", "Apple Granny Smith", "Apple Pink Lady", "Apple Red 1",
    "Apple Red 2", "Apple Red 3", "Apple Red Delicious", "Apple Red Yellow 1",
    "Apple Red Yellow 2", "Apricot", "Avocado", "Avocado ripe", "Banana",
    "Banana Lady Finger", "Banana Red", "Beetroot", "Blueberry", "Cactus fruit",
    "Cantaloupe 1", "Cantaloupe 2", "Carambula", "Cauliflower", "Cherry 1",
    "Cherry 2", "Cherry Rainier", "Cherry Wax Black", "Cherry Wax Red",
    "Cherry Wax Yellow", "Chestnut", "Clementine", "Cocos", "Corn", "Corn Husk",
    "Cucumber Ripe", "Cucumber Ripe 2", "Dates", "Eggplant", "Fig", "Ginger Root",
    "Granadilla", "Grape Blue", "Grape Pink", "Grape White", "Grape White 2",
    "Grape White 3", "Grape White 4", "Grapefruit Pink", "Grapefruit White",
    "Guava", "Hazelnut", "Huckleberry", "Kaki", "Kiwi", "Kohlrabi", "Kumquats",
    "Lemon", "Lemon Meyer", "Limes", "Lychee", "Mandarine", "Mango", "Mango Red",
    "Mangostan", "Maracuja", "Melon Piel de Sapo", "Mulberry", "Nectarine",
    "Nectarine Flat", "Nut Forest", "Nut Pecan", "Onion Red", "Onion Red Peeled",
    "Onion White", "Orange", "Papaya", "Passion Fruit", "Peach", "Peach 2",
    "Peach Flat", "Pear", "Pear 2", "Pear Abate", "Pear Forelle", "Pear Kaiser",
    "Pear Monster", "Pear Red", "Pear Stone", "Pear Williams", "Pepino",
    "Pepper Green", "Pepper Orange", "Pepper Red", "Pepper Yellow", "Physalis",
    "Physalis with Husk", "Pineapple", "Pineapple Mini", "Pitahaya Red", "Plum",
    "Plum 2", "Plum 3", "Pomegranate", "Pomelo Sweetie", "Potato Red",
    "Potato Red Washed", "Potato Sweet", "Potato White", "Quince", "Rambutan",
    "Raspberry", "Redcurrant", "Salak", "Strawberry", "Strawberry Wedge",
    "Tamarillo", "Tangelo", "Tomato 1", "Tomato 2", "Tomato 3", "Tomato 4",
    "Tomato Cherry Red", "Tomato Heart", "Tomato Maroon", "Tomato Yellow",
    "Tomato not Ripened", "Walnut", "Watermelon",
)  # fmt: skip

SIZE = 100
_CANVAS = 150  # drawn large, then rotated/scaled down into SIZE x SIZE
_TEXTURES = ("spots", "speckle", "stripes", "net", "scales", "bumps", "ribs", "cluster", "mottle")
_ELONGATED = ("Banana", "Cucumber", "Corn", "Eggplant", "Dates", "Ginger", "Pepino", "Papaya")
_SMALL = ("Berry", "berry", "Cherry", "Grape", "Currant", "currant", "Kumquat", "Physalis")
_MARKER = ".fruitdask-sample.json"
_PARTIAL = ".fruitdask-sample.partial"
_FORMAT = "fruitdask-sample/1"


def class_names(n: int = len(CLASS_NAMES)) -> list[str]:
    """The first ``n`` class names (1 <= n <= 131)."""
    if not 1 <= n <= len(CLASS_NAMES):
        raise ValueError(f"classes must be between 1 and {len(CLASS_NAMES)}, got {n}")
    return list(CLASS_NAMES[:n])


@dataclass(frozen=True)
class ClassLook:
    """How one class looks; a function of the class index only."""

    name: str
    texture: str
    color: tuple[int, int, int]  # BGR body colour
    accent: tuple[int, int, int]  # BGR colour of the texture marks
    radius: float  # semi-major axis, pixels at scale 1
    aspect: float  # minor / major axis
    density: float  # texture marks per 100 px^2 of body
    mark: float  # texture mark size / spacing, pixels
    angle: float  # texture orientation, degrees
    stem: bool


def _hsv_to_bgr(h: float, s: float, v: float) -> tuple[int, int, int]:
    px = np.array([[[int(h) % 180, int(s), int(v)]]], np.uint8)
    b, g, r = cv2.cvtColor(px, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


@functools.cache
def class_look(index: int) -> ClassLook:
    """The fixed look of class ``index`` (0-based, in :data:`CLASS_NAMES` order)."""
    name = CLASS_NAMES[index]
    rng = np.random.default_rng([7919, index])
    texture = _TEXTURES[(index * 5) % len(_TEXTURES)]  # neighbours (Apple Red 1/2/3) differ
    hue = float(rng.uniform(0, 180))
    sat = float(rng.uniform(90, 230))
    val = float(rng.uniform(120, 230))
    color = _hsv_to_bgr(hue, sat, val)
    # The accent differs from the body in value so that the grayscale image ORB
    # sees carries the texture.
    dark = bool(rng.random() < 0.6) or val > 170
    accent = _hsv_to_bgr(
        hue + rng.uniform(-25, 25), min(255, sat + 20), val * 0.35 if dark else min(255, val + 90)
    )
    radius = float(rng.uniform(34, 44))
    aspect = float(rng.uniform(0.72, 1.0))
    if any(k in name for k in _ELONGATED):
        aspect = float(rng.uniform(0.38, 0.6))
    if any(k in name for k in _SMALL):
        radius = float(rng.uniform(24, 32))
    return ClassLook(
        name=name,
        texture=texture,
        color=color,
        accent=accent,
        radius=radius,
        aspect=aspect,
        density=float(rng.uniform(0.35, 1.6)),
        mark=float(rng.uniform(1.5, 4.5)),
        angle=float(rng.uniform(0, 180)),
        stem=bool(rng.random() < 0.55),
    )


def _inside(rng: np.random.Generator, n: int, a: float, b: float) -> np.ndarray:
    """``n`` uniform points inside the axis-aligned ellipse (a, b) at the canvas centre."""
    r = np.sqrt(rng.random(n))
    t = rng.uniform(0, 2 * math.pi, n)
    c = _CANVAS / 2
    return np.stack([c + a * r * np.cos(t), c + b * r * np.sin(t)], axis=1)


def _draw_texture(
    body: np.ndarray, look: ClassLook, rng: np.random.Generator, a: float, b: float
) -> None:
    c = _CANVAS / 2
    acc = look.accent
    area = math.pi * a * b / 100.0
    kind = look.texture
    if kind in ("spots", "speckle", "bumps"):
        n = int(area * look.density * {"speckle": 1.3, "bumps": 0.35}.get(kind, 0.7))
        size = 1.0 if kind == "speckle" else look.mark
        for x, y in _inside(rng, n, a, b):
            rad = max(1, int(round(size * rng.uniform(0.7, 1.3))))
            thick = 1 if kind == "bumps" else -1
            cv2.circle(body, (int(x), int(y)), rad + (1 if kind == "bumps" else 0), acc, thick)
    elif kind in ("stripes", "net"):
        spacing = 3.0 * look.mark + (5 if kind == "stripes" else 10)
        angles = [look.angle] if kind == "stripes" else [look.angle, look.angle + 70]
        for ang in angles:
            t = math.radians(ang + rng.normal(0, 4))
            d = np.array([math.cos(t), math.sin(t)])
            nrm = np.array([-d[1], d[0]])
            off = rng.uniform(0, spacing)
            for k in np.arange(-c - off, c, spacing):
                p = np.array([c, c]) + nrm * k
                # Broken lines: the ends of the dashes are the corners ORB finds.
                s = -_CANVAS + rng.uniform(0, 10)
                while s < _CANVAS:
                    ln = rng.uniform(10, 30)
                    p1, p2 = p + d * s, p + d * (s + ln)
                    cv2.line(
                        body,
                        (int(p1[0]), int(p1[1])),
                        (int(p2[0]), int(p2[1])),
                        acc,
                        1 if kind == "net" else max(1, int(look.mark / 1.5)),
                        cv2.LINE_AA,
                    )
                    s += ln + rng.uniform(3, 8)
    elif kind == "scales":
        step = 2.0 * look.mark + 16
        jit = rng.uniform(0, step, 2)
        for row, y in enumerate(np.arange(c - b - step, c + b + step, step * 0.8)):
            shift = step / 2 if row % 2 else 0.0
            for x in np.arange(c - a - step + shift, c + a + step, step):
                cv2.ellipse(
                    body,
                    (int(x + jit[0]), int(y + jit[1])),
                    (int(step / 2), int(step / 3)),
                    look.angle,
                    0,
                    360,
                    acc,
                    1,
                )
    elif kind == "ribs":
        n = 5 + int(look.density * 4)
        t0 = rng.uniform(0, 2 * math.pi)
        for k in range(n):
            t = t0 + 2 * math.pi * k / n + rng.normal(0, 0.05)
            p = (int(c + a * math.cos(t)), int(c + b * math.sin(t)))
            cv2.line(body, (int(c), int(c)), p, acc, max(1, int(look.mark / 2)), cv2.LINE_AA)
        cv2.circle(body, (int(c), int(c)), int(look.mark + 2), acc, -1)
    elif kind == "mottle":
        coarse = rng.normal(0, 1, (12, 12)).astype(np.float32)
        noise = cv2.resize(coarse, (_CANVAS, _CANVAS), interpolation=cv2.INTER_CUBIC)
        w = np.clip(noise * (0.8 + look.density), 0, 1)[..., None]
        body[:] = (body * (1 - w) + np.array(acc, np.float32) * w).astype(np.uint8)
    # "cluster" is drawn as the outline itself (see render).
    # Pores: a few small marks on every fruit, like the blemishes of real fruit.
    for x, y in _inside(rng, int(area * 0.08), a * 0.9, b * 0.9):
        cv2.circle(body, (int(x), int(y)), int(rng.integers(1, 3)), acc, -1)


@functools.cache
def _shading(class_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class rim darkening and highlight, (CANVAS, CANVAS, 1) float32 each."""
    look = class_look(class_index)
    c = _CANVAS / 2
    a = look.radius * _CANVAS / SIZE
    b = a * look.aspect
    yy, xx = np.mgrid[0:_CANVAS, 0:_CANVAS].astype(np.float32)
    d2 = ((xx - c) / a) ** 2 + ((yy - c) / b) ** 2
    hx, hy = c - a * 0.35, c - b * 0.4
    h2 = ((xx - hx) ** 2 + (yy - hy) ** 2) / (0.25 * a * b)
    shade = (1.0 - 0.35 * np.clip(d2, 0, 1)).astype(np.float32)
    highlight = (60.0 * np.exp(-h2)).astype(np.float32)
    return shade[..., None], highlight[..., None]


def render(
    class_index: int, image_index: int, seed: int = 0, split: str = "Training"
) -> np.ndarray:
    """Render one image.

    Parameters
    ----------
    class_index : int
        Index into :data:`CLASS_NAMES`.
    image_index : int
        Instance number within the class and split.
    seed : int
        Data set seed; the class looks do not depend on it.
    split : str
        ``"Training"`` or ``"Test"``; the two draw from separate random streams.

    Returns
    -------
    ndarray of shape (100, 100, 3), dtype uint8
        A BGR image of the fruit on white.
    """
    look = class_look(class_index)
    rng = np.random.default_rng([seed, class_index, 0 if split == "Training" else 1, image_index])
    c = _CANVAS / 2
    a = look.radius * _CANVAS / SIZE  # drawn large, scaled down at the end
    b = a * look.aspect
    body = np.empty((_CANVAS, _CANVAS, 3), np.uint8)
    body[:] = look.color
    mask = np.zeros((_CANVAS, _CANVAS), np.uint8)
    if look.texture == "cluster":
        n = 3 + int(look.density * 3)
        r = max(8.0, a * 0.42)
        centres = _inside(rng, n, a - r * 0.8, b - r * 0.8)
        for x, y in centres:
            cv2.circle(mask, (int(x), int(y)), int(r), 255, -1, cv2.LINE_AA)
            cv2.circle(body, (int(x), int(y)), int(r), look.accent, 1, cv2.LINE_AA)
            hl = (int(x - r / 3), int(y - r / 3))
            cv2.circle(body, hl, max(2, int(r / 4)), (250, 250, 250), -1, cv2.LINE_AA)
    else:
        cv2.ellipse(mask, (int(c), int(c)), (int(a), int(b)), 0, 0, 360, 255, -1, cv2.LINE_AA)
        _draw_texture(body, look, rng, a, b)

    # Shading: darker towards the rim, a highlight up-left, global brightness jitter.
    shade, highlight = _shading(class_index)
    lit = body.astype(np.float32) * (shade * np.float32(rng.uniform(0.88, 1.08))) + highlight
    lit += 2.0 * rng.standard_normal((_CANVAS, _CANVAS, 1), dtype=np.float32)  # sensor noise
    alpha = mask.astype(np.float32)[..., None] / 255.0
    img = np.clip(lit * alpha + np.float32(255.0) * (1 - alpha), 0, 255).astype(np.uint8)

    if look.stem:
        top = (int(c), int(c - b))
        tip = (int(c + rng.normal(0, 4)), int(c - b - 14 - rng.uniform(0, 6)))
        cv2.line(img, top, tip, (30, 60, 90), 4, cv2.LINE_AA)

    angle = rng.uniform(0, 360)
    scale = SIZE / _CANVAS * rng.uniform(0.92, 1.06)
    m = cv2.getRotationMatrix2D((c, c), angle, scale)
    m[:, 2] += np.array([SIZE / 2 + rng.normal(0, 2.5) - c, SIZE / 2 + rng.normal(0, 2.5) - c])
    return cv2.warpAffine(img, m, (SIZE, SIZE), flags=cv2.INTER_AREA, borderValue=(255, 255, 255))


@dataclass(frozen=True)
class SampleSummary:
    """What :func:`generate` produced."""

    root: str
    classes: int
    training: int
    test: int
    seconds: float
    cached: bool = False


def _counts_per_class(per_class: int, test_fraction: float) -> tuple[int, int]:
    test = int(round(per_class * test_fraction / (1.0 - test_fraction)))
    return per_class, test


def _write_chunk(args: tuple[str, int, str, int, int, int]) -> int:
    root, class_index, split, start, stop, seed = args
    folder = os.path.join(root, split, CLASS_NAMES[class_index])
    os.makedirs(folder, exist_ok=True)
    for i in range(start, stop):
        img = render(class_index, i, seed, split)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:  # pragma: no cover - OpenCV always encodes a 100x100 BGR image
            raise RuntimeError("JPEG encoding failed")
        with open(os.path.join(folder, f"{i}_100.jpg"), "wb") as f:
            f.write(buf.tobytes())
    return stop - start


def _generate(
    out_dir: str | os.PathLike,
    plan: list[tuple[int, int, int]],
    params: dict,
    seed: int,
    workers: int | None,
) -> SampleSummary:
    """Write ``plan`` = [(class_index, n_training, n_test)] under ``out_dir``."""
    t0 = time.perf_counter()
    root = Path(out_dir)
    marker = root / _MARKER
    if marker.exists():
        old = json.loads(marker.read_text())
        if old.get("params") == params:
            return SampleSummary(
                str(root), len(plan), old["training"], old["test"], 0.0, cached=True
            )
        raise OutputExistsError(
            f"{root}: holds a sample generated with other parameters ({old.get('params')}); "
            "remove it or choose another folder"
        )
    if root.exists() and any(root.iterdir()) and not (root / _PARTIAL).exists():
        raise OutputExistsError(f"{root}: exists and is not empty; choose a new folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / _PARTIAL).write_text(json.dumps(params))

    chunks = []
    for ci, n_train, n_test in plan:
        for split, n in (("Training", n_train), ("Test", n_test)):
            for start in range(0, n, 200):
                chunks.append((str(root), ci, split, start, min(n, start + 200), seed))
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(chunks) <= 1:
        done = sum(map(_write_chunk, chunks))
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            done = sum(pool.map(_write_chunk, chunks))
    training = sum(p[1] for p in plan)
    test = sum(p[2] for p in plan)
    assert done == training + test
    tmp = root / (_MARKER + ".tmp")
    meta = {"format": _FORMAT, "params": params, "training": training, "test": test}
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, marker)  # the marker is written last: a cut-short tree is never a cache
    (root / _PARTIAL).unlink()
    return SampleSummary(str(root), len(plan), training, test, time.perf_counter() - t0)


def generate(
    out_dir: str | os.PathLike,
    classes: int = len(CLASS_NAMES),
    per_class: int = 40,
    seed: int = 0,
    test_fraction: float = 0.25,
    workers: int | None = None,
) -> SampleSummary:
    """Generate a Fruits-360-like tree with ``per_class`` Training images per class.

    Parameters
    ----------
    out_dir : path
        Folder to create. A folder already holding the same sample is reused as a
        cache; any other non-empty folder is refused (``OutputExistsError``).
    classes : int
        Number of classes, the first ``classes`` of :data:`CLASS_NAMES`.
    per_class : int
        Training images per class; Test gets ``test_fraction`` of the total.
    seed : int
        Random seed for the instances; the same seed gives identical files.
    test_fraction : float
        Fraction of each class's images that go to Test (Fruits-360: ~0.25).
    workers : int, optional
        Processes to render with (default: the number of cores).
    """
    names = class_names(classes)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_train, n_test = _counts_per_class(per_class, test_fraction)
    plan = [(i, n_train, n_test) for i in range(len(names))]
    params = {
        "classes": classes,
        "per_class": per_class,
        "seed": seed,
        "test_fraction": test_fraction,
    }
    return _generate(out_dir, plan, params, seed, workers)


def generate_total(
    out_dir: str | os.PathLike,
    total: int,
    classes: int = len(CLASS_NAMES),
    seed: int = 0,
    test_fraction: float = 0.25,
    workers: int | None = None,
) -> SampleSummary:
    """Generate exactly ``total`` images spread evenly over ``classes`` classes.

    ``generate_total(out, 90483)`` makes a tree the size of Fruits-360 (131
    classes). With fewer images than classes, there are as many classes as images.
    """
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    classes = min(classes, total)
    names = class_names(classes)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    plan = []
    for i in range(len(names)):
        n = total // len(names) + (1 if i < total % len(names) else 0)
        n_test = int(round(n * test_fraction))
        plan.append((i, n - n_test, n_test))
    params = {"classes": classes, "total": total, "seed": seed, "test_fraction": test_fraction}
    return _generate(out_dir, plan, params, seed, workers)
