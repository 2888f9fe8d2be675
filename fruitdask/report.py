"""A self-contained HTML report of a finished fruitdask output.

``fruitdask run``, ``train`` and ``evaluate`` outputs each get one page,
``OUT/report.html``, that opens anywhere: no network, no JavaScript, every image
embedded as a base64 PNG data URI, a Content-Security-Policy that forbids
anything else. Every string that comes from the data (paths, labels, error
messages, settings) goes through :func:`html.escape`.

Reading follows the outputs' commit protocol: ``_SUCCESS`` (which holds the
run id), then ``manifest.json`` (whose ``run_id`` must match), then only the
files the manifest lists; folders are never listed. An evaluation output has
no ``_SUCCESS``: its manifest is written last and is the commit marker.

Everything is bounded so that a report of a 90,000-image output builds in
seconds and stays a few MB (:class:`ReportLimits`): the small per-image tables
are read whole, the per-keypoint ``features/`` table only for a few
partitions, the input images only for a few examples per class.

Charts need matplotlib (the ``plot`` extra; drawn with ``Figure`` and the Agg
canvas, never pyplot); without it the report shows tables instead and says so.
"""

from __future__ import annotations

import base64
import html
import io as _io
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from fruitdask import io, source
from fruitdask.errors import InputError, StorageError, one_line
from fruitdask.output import read_committed

__all__ = [
    "EVAL_FORMAT",
    "REPORT_FILE",
    "RUN_FORMAT",
    "TRAIN_FORMAT",
    "ReportError",
    "ReportLimits",
    "build_evaluation_report",
    "build_report",
    "build_run_report",
    "build_train_report",
    "read_manifest",
    "write_report",
]

#: Name of the report inside an output.
REPORT_FILE = "report.html"
RUN_FORMAT = "fruitdask-output/1"
TRAIN_FORMAT = "fruitdask-train/1"
EVAL_FORMAT = "fruitdask-evaluation/1"

Options = dict[str, Any] | None


class ReportError(InputError):
    """The URL does not hold a finished fruitdask output (one-line message)."""


@dataclass(frozen=True)
class ReportLimits:
    """How much of an output a report reads and shows (bounds for 90k-image outputs).

    Attributes
    ----------
    sample_classes : int
        Classes shown in the image grid and the PCA scatter (picked evenly
        from the sorted class names).
    images_per_class : int
        Example images per class in the grid.
    no_keypoint_examples : int
        Example images without keypoints in the grid.
    thumb_px : int
        Longest side of a thumbnail, in pixels.
    scatter_points : int
        Keypoints drawn in the PCA scatter.
    scatter_rows : int
        At most this many ``features/`` rows are read for the scatter.
    histogram_rows : int
        At most this many ``histograms/`` rows are read for the word usage (train).
    error_groups, examples_per_group : int
        Error reasons listed, and example paths per reason.
    confused_pairs, confused_examples : int
        Most confused (true, predicted) pairs shown, and example images per pair.
    """

    sample_classes: int = 10
    images_per_class: int = 3
    no_keypoint_examples: int = 5
    thumb_px: int = 128
    scatter_points: int = 4000
    scatter_rows: int = 500_000
    histogram_rows: int = 20_000
    error_groups: int = 20
    examples_per_group: int = 3
    confused_pairs: int = 8
    confused_examples: int = 2


# ---------------------------------------------------------------- reading
def _read_json(url: str, so: Options) -> dict[str, Any] | None:
    text = io.read_text(url, so)
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{url}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{url}: not a fruitdask manifest (not a JSON object)")
    return doc


def read_manifest(output_url: str, storage_options: Options = None) -> dict[str, Any]:
    """The manifest of the run in force at ``output_url``, read by the commit
    protocol (``_SUCCESS`` -> its manifest, :func:`fruitdask.output.read_committed`).

    Raises
    ------
    ReportError
        Nothing committed there (unfinished, failed, or not a fruitdask
        output), or an output of a format this module does not know.
    StorageError
        The output cannot be read.
    """
    manifest = read_committed(output_url, storage_options)
    if manifest is None:
        raise ReportError(f"{output_url}: no committed result (no _SUCCESS and its manifest)")
    fmt = manifest.get("format")
    if fmt not in (RUN_FORMAT, TRAIN_FORMAT, EVAL_FORMAT):
        raise ReportError(f"{output_url}: unknown output format {fmt!r}")
    return manifest


def _read_tables(
    output_url: str, files: Sequence[str], so: Options, columns: Sequence[str] | None
) -> list[pa.Table]:
    """The listed Parquet files, read concurrently (one GET each on S3), in order."""
    if not files:
        return []

    def one(f: str) -> pa.Table:
        return io.read_table(io.join(output_url, f), so, columns=list(columns) if columns else None)

    with ThreadPoolExecutor(min(16, len(files))) as pool:
        return list(pool.map(one, files))


def _frame(tables: list[pa.Table], columns: Sequence[str]) -> pd.DataFrame:
    """Concatenated tables as a DataFrame, with a ``part`` column (index in ``tables``)."""
    if not tables:
        return pd.DataFrame({c: [] for c in (*columns, "part")})
    frames = []
    for i, t in enumerate(tables):
        df = t.to_pandas()
        df["part"] = i
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _read_input_images(
    input_url: str, paths: Sequence[str], so: Options
) -> tuple[list[bytes | Exception], str | None]:
    """Bytes of ``paths`` (relative to the input; a pack is read like its tree),
    or ``([], reason)`` when the input cannot be read at all (moved, deleted,
    unreachable, no credentials)."""
    if not paths:
        return [], None
    try:
        if source.is_packed_url(input_url, so):
            index = source.list_input(input_url, so)
            index = index.drop_duplicates("path").set_index("path", drop=False)
            known = [p for p in paths if p in index.index]
            rows = index.loc[known].reset_index(drop=True)
            got = dict(zip(known, source.iter_images(input_url, rows, so), strict=True))
            return [got.get(p, FileNotFoundError(p)) for p in paths], None
        if not io.exists(input_url, so):
            return [], f"{input_url}: not found (moved or deleted since the run?)"
        return list(io.iter_objects(input_url, list(paths), so, max_bytes=_MAX_SAMPLE_BYTES)), None
    except Exception as exc:  # noqa: BLE001 - the report says why instead of failing
        return [], one_line(exc)


#: Sample images larger than this are not drawn (a report stays small and quick).
_MAX_SAMPLE_BYTES = 64 << 20


# ---------------------------------------------------------------- HTML pieces
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _label(x: Any) -> str:
    """A class label for display ("" and None shown as "(no label)")."""
    return (
        "(no label)" if x is None or (isinstance(x, float) and math.isnan(x)) or x == "" else str(x)
    )


def _num(x: Any, digits: int = 0) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isnan(x):
        return "–"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        return f"{float(x):,.{digits}f}"
    return str(x)


def _secs(x: Any) -> str:
    return "–" if x is None else f"{float(x):.2f} s"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


@dataclass
class _Section:
    id: str
    title: str
    body: str


def _cards(items: Iterable[tuple[str, str]]) -> str:
    cells = "".join(
        f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}</div></div>'
        for k, v in items
    )
    return f'<div class="cards">{cells}</div>'


def _table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "", raw: bool = False
) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are trusted HTML)."""
    cell = (lambda x: str(x)) if raw else _e
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv_table(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _bar(value: float, vmax: float, color: str = "#4a7fb5") -> str:
    """An inline CSS bar (for the tables that stand in for charts)."""
    w = 0.0 if vmax <= 0 else max(0.0, min(100.0, 100.0 * value / vmax))
    return (
        f'<span class="barbox"><span class="bar" style="width:{w:.1f}%;background:{color}">'
        "</span></span>"
    )


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, cls: str = "") -> str:
    c = f' class="{_e(cls)}"' if cls else ""
    return f'<img{c} src="{_png_uri(png)}" alt="{_e(alt)}">'


def _figure(png: bytes | None, alt: str, caption: str) -> str:
    if png is None:
        return ""
    return f"<figure>{_img(png, alt)}<figcaption>{_e(caption)}</figcaption></figure>"


_CSS = """
:root{--fg:#1d2330;--muted:#5d6675;--line:#dde2ea;--bg:#f6f8fb;--accent:#2f6db5}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:var(--fg);background:#fff}
header{background:#1f3b5c;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:24px;font-weight:600}
header p{margin:4px 0 0;color:#c9d6e6;overflow-wrap:anywhere}
main{max-width:1160px;margin:0 auto;padding:8px 32px 32px}
nav{max-width:1160px;margin:0 auto;padding:12px 32px 0}
nav ol{margin:0;padding:0;list-style:none;display:flex;flex-wrap:wrap;gap:6px 8px}
nav a{display:inline-block;padding:2px 10px;border:1px solid var(--line);border-radius:12px;
color:var(--accent);text-decoration:none;font-size:14px;background:var(--bg)}
section{border-top:1px solid var(--line);padding:8px 0 12px}
section.part{border-top:3px solid #1f3b5c;margin-top:12px}
h2{font-size:20px;margin:14px 0 8px}
h3{font-size:16px;margin:14px 0 6px}
p{margin:6px 0}
.note{color:var(--muted);font-size:14px}
.warn{background:#fff6e0;border-left:4px solid #e0a030;padding:6px 10px;font-size:14px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.card{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:8px 14px;
min-width:120px}
.card .v{font-size:20px;font-weight:600}
.card .k{font-size:13px;color:var(--muted)}
table{border-collapse:collapse;margin:6px 0 10px;font-size:14px}
th,td{border-bottom:1px solid var(--line);padding:3px 10px;text-align:left;vertical-align:top}
thead th{background:var(--bg)}
td{overflow-wrap:anywhere}
table.kv th{font-weight:500;color:var(--muted);white-space:nowrap}
table.num td+td{font-variant-numeric:tabular-nums}
.barbox{display:inline-block;width:180px;height:10px;vertical-align:middle}
.bar{display:block;height:10px;border-radius:2px}
figure{margin:8px 0 14px}
figure img{max-width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:13px;margin-top:2px}
.grid{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0 10px}
.thumb{width:148px;font-size:12px;line-height:1.3;color:var(--muted);overflow-wrap:anywhere}
.thumb code{font-size:11px}
.thumb img{display:block;border:1px solid var(--line);margin-bottom:2px}
.thumb .miss{width:128px;height:128px;border:1px dashed #c8382d;color:#c8382d;padding:6px;
display:flex;align-items:center;font-size:11px;overflow:hidden}
.cols{display:flex;flex-wrap:wrap;gap:0 40px;align-items:flex-start}
.blocks{display:flex;flex-wrap:wrap;gap:6px 36px;margin:6px 0}
.block h4{margin:4px 0;font-size:14px;max-width:470px;overflow-wrap:anywhere}
.block .grid{margin:0 0 6px}
code{font-size:13px;background:var(--bg);padding:0 3px;overflow-wrap:anywhere}
footer{max-width:1160px;margin:0 auto;padding:8px 32px 24px;color:var(--muted);font-size:13px}
"""

# No script, no network: only inline styles and data: images may load.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _page(title: str, subtitle: str, sections: list[_Section], notes: Sequence[str]) -> str:
    from fruitdask import __version__

    toc = "".join(f'<li><a href="#{_e(s.id)}">{_e(s.title)}</a></li>' for s in sections)
    part = ' class="part"'
    body = "".join(
        f'<section id="{_e(s.id)}"{part if s.id.endswith("-part") else ""}>'
        f"<h2>{_e(s.title)}</h2>{s.body}</section>"
        for s in sections
    )
    note_html = "".join(f'<p class="warn">{_e(n)}</p>' for n in notes)
    made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(subtitle)}</p></header>"
        f'<nav id="toc" aria-label="contents"><ol>{toc}</ol></nav>'
        f"<main>{note_html}{body}</main>"
        f"<footer>fruitdask {_e(__version__)} report, generated {_e(made)}. "
        "Self-contained: no network, no scripts.</footer>"
        "</body></html>\n"
    )


# ---------------------------------------------------------------- charts
STATUS_COLORS = {"ok": "#4c9a2a", "no_keypoints": "#e0a030", "error": "#c8382d"}
_NO_MPL = "Charts need matplotlib (pip install 'fruitdask[plot]'); tables are shown instead."


def _mpl() -> tuple[Any, Any] | None:
    """``(Figure, FigureCanvasAgg)``, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _new_fig(width: float, height: float) -> Any:
    got = _mpl()
    assert got is not None
    figure_cls, canvas_cls = got
    # Figure + Agg canvas, not pyplot: no global state, no GUI backend.
    fig = figure_cls(figsize=(width, height), dpi=100, layout="constrained")
    canvas_cls(fig)
    return fig


def _save(fig: Any) -> bytes:
    buf = _io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs of exotic file names
        fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _t(s: Any, width: int = 32) -> str:
    """Data text for matplotlib: ``$`` escaped (else mathtext), long strings shortened."""
    s = _label(s)
    if len(s) > width:
        s = s[: width - 1] + "…"
    return s.replace("\\", "\\\\").replace("$", r"\$")


def _style(ax: Any) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(axis="both", color="#e6e9ef", linewidth=0.7)
    ax.set_axisbelow(True)


# ---------------------------------------------------------------- common sections
def _timeline(timings: dict[str, float], title: str) -> tuple[bytes | None, str]:
    """Per-stage seconds as consecutive horizontal bars; (png, fallback table)."""
    stages = [(k, float(v)) for k, v in timings.items() if v is not None]
    vmax = max([v for _, v in stages] or [0.0])
    table = _table(
        ["stage", "seconds", ""],
        [(_e(k), f"{v:.3f}", _bar(v, vmax)) for k, v in stages],
        cls="num",
        raw=True,
    )
    if _mpl() is None or not stages:
        return None, table
    fig = _new_fig(10, 0.42 * len(stages) + 1.1)
    ax = fig.add_subplot(1, 1, 1)
    starts = np.cumsum([0.0] + [v for _, v in stages[:-1]])
    total = sum(v for _, v in stages)
    colors = [f"C{i % 10}" for i in range(len(stages))]
    y = np.arange(len(stages))
    ax.barh(y, [v for _, v in stages], left=starts, color=colors, height=0.6)
    for yi, st, (_, v) in zip(y, starts, stages, strict=True):
        ax.text(st + v + total * 0.005, yi, f"{v:.2f} s", va="center", fontsize=9)
    ax.set_yticks(y)
    ax.set_yticklabels([_t(k) for k, _ in stages])
    ax.invert_yaxis()
    ax.set_xlim(0, total * 1.12 if total > 0 else 1)
    ax.set_xlabel("seconds since the start")
    ax.set_title(title)
    _style(ax)
    ax.grid(axis="y", visible=False)
    return _save(fig), table


def _timeline_section(sid: str, manifest: dict[str, Any], extra: str = "") -> _Section:
    timings = manifest.get("timings") or {}
    total = sum(float(v) for v in timings.values() if v is not None)
    work = sum(float(v) for k, v in timings.items() if v is not None and k != "startup")
    png, table = _timeline(timings, "stages, in order")
    body = _cards(
        [
            ("total", _secs(total)),
            ("excluding start-up", _secs(work)),
        ]
    )
    body += extra
    body += _figure(png, "stage timeline", "Each bar is one stage, placed where it ran.")
    if png is None:
        body += table
    return _Section(sid, "Stages and throughput", body)


def _config_rows(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        if not d and prefix:
            return [(prefix, "{}")]
        rows: list[tuple[str, Any]] = []
        for k, v in d.items():
            rows += _config_rows(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(d, list):
        return [(prefix, json.dumps(d))]
    return [(prefix, "–" if d is None else d)]


def _config_section(
    sid: str, manifest: dict[str, Any], extra: Sequence[tuple[str, Any]]
) -> _Section:
    cols = ["<div><h3>Run</h3>" + _kv_table([(k, v) for k, v in extra if v is not None])]
    files = manifest.get("files")
    if isinstance(files, dict):
        cols[0] += "<h3>Files</h3>" + _kv_table(
            (k, f"{len(v)} file{'s' if len(v) != 1 else ''}") for k, v in files.items()
        )
    elif isinstance(files, list):
        cols[0] += "<h3>Files</h3>" + _kv_table([("files", ", ".join(map(str, files)))])
    cols[0] += "</div>"
    for key, title in (("config", "Configuration"), ("train", "Training options")):
        if manifest.get(key):
            cols.append(
                f"<div><h3>{_e(title)}</h3>" + _kv_table(_config_rows(manifest[key])) + "</div>"
            )
    if manifest.get("versions"):
        cols.append(
            "<div><h3>Library versions</h3>" + _kv_table(manifest["versions"].items()) + "</div>"
        )
    return _Section(sid, "Configuration and versions", f'<div class="cols">{"".join(cols)}</div>')


def _thumbnail(
    data: bytes | Exception, px: int, orb_params: Any | None, max_pixels: int
) -> tuple[bytes | None, str, int | None]:
    """(PNG thumbnail, problem, keypoints found now) of one image's bytes.

    With ``orb_params`` the image's ORB keypoints (the run's settings) are drawn.
    """
    import cv2

    from fruitdask import features

    if isinstance(data, BaseException):
        return None, one_line(data), None
    try:
        gray = features.decode_gray(data, max_pixels)
    except ValueError as exc:
        return None, str(exc), None
    color = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if color is None or color.shape[:2] != gray.shape[:2]:
        color = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    h, w = gray.shape[:2]
    scale = px / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    thumb = cv2.resize(color, size, interpolation=interp)
    found = None
    if orb_params is not None:
        kps: list[Any] = []
        if min(h, w) >= 2 and min(h, w) > 2 * orb_params.edge_threshold:
            try:
                kps, _ = orb_params.create().detectAndCompute(gray, None)
            except cv2.error:
                kps = []
        found = len(kps)
        scaled = [
            cv2.KeyPoint(k.pt[0] * scale, k.pt[1] * scale, k.size * scale, k.angle) for k in kps
        ]
        thumb = cv2.drawKeypoints(thumb, scaled, np.empty_like(thumb), color=(255, 0, 255))
    ok, png = cv2.imencode(".png", thumb, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        return None, "cannot encode the thumbnail", found
    return png.tobytes(), "", found


def _thumb_cell(png: bytes | None, problem: str, caption: str, path: str, alt: str) -> str:
    """One thumbnail (or the reason there is none), a caption line and the file
    name; the whole path is the tooltip."""
    if png is None:
        pic = f'<div class="miss">{_e(problem or "no image")}</div>'
    else:
        pic = _img(png, alt)
    name = path.rsplit("/", 1)[-1]
    return (
        f'<div class="thumb" title="{_e(path)}">{pic}<div>{_e(caption)}</div>'
        f"<code>{_e(name)}</code></div>"
    )


def _block(head_html: str, cells: Sequence[str]) -> str:
    return f'<div class="block"><h4>{head_html}</h4><div class="grid">{"".join(cells)}</div></div>'


def _pick_evenly(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if n <= 0:
        return []
    if len(items) <= n:
        return list(items)
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


# ---------------------------------------------------------------- run sections
def _images_frame(output_url: str, manifest: dict[str, Any], so: Options) -> pd.DataFrame:
    cols = ["path", "label", "split", "size", "width", "height", "n_keypoints", "status", "error"]
    files = (manifest.get("files") or {}).get("images") or []
    df = _frame(_read_tables(output_url, files, so, cols), cols)
    df["label"] = df["label"].astype(object).where(df["label"].notna(), "")
    df["label"] = df["label"].map(str)
    df["status"] = df["status"].astype(str)
    return df


def _run_summary(manifest: dict[str, Any], df: pd.DataFrame) -> _Section:
    c = manifest.get("counts") or {}
    tp = manifest.get("throughput") or {}
    pca = manifest.get("pca") or {}
    items = [
        ("images", _num(c.get("images"))),
        ("ok", _num(c.get("ok"))),
        ("no keypoints", _num(c.get("no_keypoints"))),
        ("errors", _num(c.get("error"))),
        ("classes", _num(c.get("labels"))),
        ("descriptors", _num(c.get("descriptors"))),
        ("images/s", _num(tp.get("images_per_s"), 1)),
        ("PCA variance explained", _pct(pca.get("explained_variance_ratio"))),
    ]
    body = _cards(items)
    if len(df) and "split" in df:
        splits = df["split"].astype(object).where(df["split"].notna(), "(none)")
        counts = splits.value_counts().sort_index()
        body += "<p>Split: " + ", ".join(f"{_e(k)} {int(v):,}" for k, v in counts.items()) + ".</p>"
    if len(df) and c.get("images") not in (None, len(df)):
        body += f'<p class="warn">The images table has {len(df):,} rows; the manifest counts {_num(c.get("images"))}.</p>'
    if c.get("partitions_resumed"):
        body += _note(
            f"{c['partitions_resumed']} of {c.get('partitions')} partitions were resumed."
        )
    return _Section("summary", "Summary", body)


def _run_timeline(manifest: dict[str, Any]) -> _Section:
    tp = manifest.get("throughput") or {}
    cl = manifest.get("cluster") or {}
    c = manifest.get("counts") or {}
    extra = _cards(
        [
            ("images/s (start-up excluded)", _num(tp.get("images_per_s"), 1)),
            ("images/s per core", _num(tp.get("images_per_s_per_core"), 1)),
            ("workers / threads", f"{_num(cl.get('workers'))} / {_num(cl.get('threads'))}"),
            ("partitions", _num(c.get("partitions"))),
        ]
    )
    return _timeline_section("timeline", manifest, extra)


def _class_chart(df: pd.DataFrame) -> tuple[bytes | None, str]:
    """Images per class, stacked by status; (png, fallback table)."""
    pivot = (
        df.groupby(["label", "status"]).size().unstack(fill_value=0) if len(df) else pd.DataFrame()
    )
    for s in STATUS_COLORS:
        if s not in pivot.columns:
            pivot[s] = 0
    pivot = pivot[[*STATUS_COLORS, *[c for c in pivot.columns if c not in STATUS_COLORS]]]
    total = pivot.sum(axis=1)
    vmax = float(total.max()) if len(total) else 0.0
    rows = [
        (
            _e(_label(lab)),
            f"{int(total[lab]):,}",
            f"{int(pivot.loc[lab, 'ok']):,}",
            f"{int(pivot.loc[lab, 'no_keypoints']):,}",
            f"{int(pivot.loc[lab, 'error']):,}",
            _bar(float(total[lab]), vmax),
        )
        for lab in pivot.index
    ]
    table = _table(
        ["class", "images", "ok", "no keypoints", "error", ""], rows, cls="num", raw=True
    )
    if _mpl() is None or not len(pivot):
        return None, table
    several = bool((pivot[[c for c in pivot.columns if c != "ok"]].to_numpy() > 0).any())
    if len(pivot) > 200:
        return _sorted_class_bars(pivot, total, several), table
    return _named_class_bars(pivot, vmax, several), table


def _sorted_class_bars(pivot: pd.DataFrame, total: pd.Series, several: bool) -> bytes:
    """Too many classes to name: the sorted totals show the balance (the table the names)."""
    n = len(pivot)
    p = pivot.loc[total.sort_values(ascending=False).index]
    fig = _new_fig(11, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    bottom = np.zeros(n)
    for s in p.columns:
        vals = p[s].to_numpy(float)
        if vals.any() or s == "ok":
            ax.bar(x, vals, bottom=bottom, color=STATUS_COLORS.get(s, "#888"), label=s, width=1)
        bottom += vals
    ax.set_xticks([])
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel(f"{n:,} classes, from most to fewest images")
    ax.set_ylabel("images")
    _style(ax)
    ax.grid(axis="x", visible=False)
    if several:
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.suptitle("images per class, by status")
    return _save(fig)


def _named_class_bars(pivot: pd.DataFrame, vmax: float, several: bool) -> bytes:
    """One to four panels of horizontal bars, classes by name, top to bottom."""
    n = len(pivot)
    ncols = 1 if n <= 30 else min(4, math.ceil(n / 45))
    per = math.ceil(n / ncols)
    width = 10 if ncols == 1 else 11.5
    fig = _new_fig(width, (0.26 if ncols == 1 else 0.165) * per + 1.2)
    fs = 9 if ncols == 1 else 7
    axes = [fig.add_subplot(1, ncols, c + 1) for c in range(ncols)]
    for c, ax in enumerate(axes):
        chunk = pivot.iloc[c * per : (c + 1) * per]
        y = np.arange(len(chunk))
        left = np.zeros(len(chunk))
        for s in chunk.columns:
            vals = chunk[s].to_numpy(float)
            if vals.any() or s == "ok":
                color = STATUS_COLORS.get(s, "#888")
                ax.barh(y, vals, left=left, color=color, label=s, height=0.72)
            left += vals
        ax.set_yticks(y)
        ax.set_yticklabels([_t(x, 28 if ncols < 3 else 20) for x in chunk.index], fontsize=fs)
        ax.set_ylim(per - 0.5, -0.5)
        ax.set_xlim(0, vmax * 1.04 if vmax > 0 else 1)
        ax.tick_params(axis="x", labelsize=fs)
        ax.set_xlabel("images", fontsize=fs + 1)
        _style(ax)
        ax.grid(axis="y", visible=False)
    if several:
        seen: dict[str, Any] = {}
        for ax in axes:
            for h, name in zip(*ax.get_legend_handles_labels(), strict=True):
                seen.setdefault(name, h)
        fig.legend(list(seen.values()), list(seen), loc="outside upper right", fontsize=8,
                   frameon=False, ncols=3)  # fmt: skip
    fig.suptitle("images per class, by status")
    return _save(fig)


def _run_images(df: pd.DataFrame) -> _Section:
    status = df["status"].value_counts() if len(df) else pd.Series(dtype=int)
    rows = [
        (
            _e(s),
            f"{int(status.get(s, 0)):,}",
            _pct(status.get(s, 0) / max(1, len(df))),
            _bar(float(status.get(s, 0)), float(max(1, len(df))), STATUS_COLORS.get(s, "#888")),
        )
        for s in [*STATUS_COLORS, *[x for x in status.index if x not in STATUS_COLORS]]
    ]
    body = "<h3>By status</h3>" + _table(
        ["status", "images", "share", ""], rows, cls="num", raw=True
    )
    png, table = _class_chart(df)
    n = df["label"].nunique() if len(df) else 0
    body += f"<h3>By class ({n:,})</h3>"
    if png is not None:
        body += _figure(png, "images per class", "Stacked by status: ok, no keypoints, error.")
        body += "<details><summary>Table</summary>" + table + "</details>"
    else:
        body += table
    ok = df[df["status"] != "error"] if len(df) else df
    if len(ok) and {"width", "height"} <= set(ok.columns):
        dims = (ok["width"].astype(str) + "×" + ok["height"].astype(str)).value_counts()
        shown = ", ".join(f"{_e(k)} ({int(v):,})" for k, v in dims.head(5).items())
        more = f", and {len(dims) - 5:,} other sizes" if len(dims) > 5 else ""
        body += f"<p>Image sizes (pixels): {shown}{more}.</p>"
    return _Section("images", "Images by status and class", body)


def _int_edges(hi: int, bins: int) -> np.ndarray:
    """Histogram edges on whole numbers from 0 past ``hi``, at most ``bins`` bins."""
    width = max(1, math.ceil((hi + 1) / bins))
    return np.arange(0, hi + width + 1, width)


def _keypoint_chart(df: pd.DataFrame, nfeatures: int | None) -> tuple[bytes | None, str]:
    ok = df[df["status"] != "error"]
    k = ok["n_keypoints"].to_numpy(float)
    if not len(k):
        return None, _note("No decoded images.")
    tedges = _int_edges(int(k.max()), 12)
    counts, _ = np.histogram(k, bins=tedges)
    table = _table(
        ["keypoints", "images", ""],
        [
            (
                f"{tedges[i]}"
                if tedges[i + 1] - tedges[i] == 1
                else f"{tedges[i]}–{tedges[i + 1] - 1}",
                f"{int(c):,}",
                _bar(float(c), float(counts.max())),
            )
            for i, c in enumerate(counts)
        ],
        cls="num",
        raw=True,
    )
    edges = _int_edges(int(k.max()), 40)
    if _mpl() is None:
        return None, table
    fig = _new_fig(10, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(k, bins=edges, color="#4a7fb5")
    med = float(np.median(k))
    ax.axvline(med, color="#1d2330", linestyle="--", linewidth=1, label=f"median {med:.0f}")
    if nfeatures and nfeatures <= float(k.max()) * 1.05:
        ax.axvline(nfeatures, color="#c8382d", linewidth=1, label=f"nfeatures cap {nfeatures}")
    ax.set_xlabel("ORB keypoints per image")
    ax.set_ylabel("images")
    ax.set_title("keypoints per image (decoded images)")
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    return _save(fig), table


def _run_keypoints(df: pd.DataFrame, manifest: dict[str, Any]) -> _Section:
    nfeatures = ((manifest.get("config") or {}).get("orb") or {}).get("nfeatures")
    png, table = _keypoint_chart(df, nfeatures)
    body = ""
    ok = df[df["status"] != "error"]
    if len(ok):
        k = ok["n_keypoints"]
        items = [
            ("median", _num(float(k.median()), 0)),
            ("mean", _num(float(k.mean()), 1)),
            ("max", _num(int(k.max()))),
            ("images with none", _num(int((k == 0).sum()))),
        ]
        if nfeatures:
            items.append((f"at the cap ({nfeatures})", _num(int((k >= nfeatures).sum()))))
        body += _cards(items)
        per = ok.groupby("label")["n_keypoints"].median().sort_values()
        if 1 < len(per) <= 6:
            every = ", ".join(f"{_e(_label(lab))} ({v:.0f})" for lab, v in per.items())
            body += f"<p>Median per class, fewest first: {every}.</p>"
        elif len(per) > 6:
            few = ", ".join(f"{_e(_label(lab))} ({v:.0f})" for lab, v in per.head(3).items())
            many = ", ".join(f"{_e(_label(lab))} ({v:.0f})" for lab, v in per.tail(3)[::-1].items())
            body += f"<p>Median per class: fewest in {few}; most in {many}.</p>"
    if png is not None:
        body += _figure(
            png, "keypoints per image", "Histogram over decoded images (status ok or no keypoints)."
        )
    else:
        body += table
    return _Section("keypoints", "Keypoints per image", body)


def _run_pca(output_url: str, manifest: dict[str, Any], so: Options) -> tuple[_Section, Any]:
    from fruitdask.pca import PcaModel

    pca = manifest.get("pca") or {}
    files = (manifest.get("files") or {}).get("model") or []
    model = None
    problem = ""
    if files:
        try:
            text = io.read_text(io.join(output_url, files[0]), so)
            model = PcaModel.from_json(text) if text else None
            if model is None:
                problem = f"{files[0]} is missing"
        except Exception as exc:  # noqa: BLE001 - the section says so
            problem = f"{files[0]}: {one_line(exc)}"
    items = [
        ("method", pca.get("method", "–")),
        ("components", _num(pca.get("n_components"))),
        (
            "fitted on",
            _num(pca.get("fitted_on_rows")) + (" (sample)" if pca.get("sampled") else ""),
        ),
        ("variance explained", _pct(pca.get("explained_variance_ratio"))),
        ("by the exact PCA", _pct(pca.get("exact_explained_variance_ratio"))),
        ("max angle to exact", f"{float(pca.get('max_principal_angle_to_exact_deg') or 0):.2f}°"),
    ]
    body = _cards(items)
    if model is None:
        body += _note(f"No PCA model to plot: {problem or 'the manifest lists none'}.")
        return _Section("pca", "PCA", body), None
    ratio = np.asarray(model.explained_variance_ratio, float)
    cum = np.cumsum(ratio)
    angles = [float(a) for a in pca.get("principal_angles_to_exact_deg") or []]
    if _mpl() is None:
        body += _table(
            ["component", "variance ratio", "cumulative", "angle to exact (°)", ""],
            [
                (
                    i + 1,
                    f"{r:.4f}",
                    f"{c:.4f}",
                    f"{angles[i]:.2f}" if i < len(angles) else "–",
                    _bar(float(r), float(ratio.max())),
                )
                for i, (r, c) in enumerate(zip(ratio, cum, strict=True))
            ],
            cls="num",
            raw=True,
        )
        return _Section("pca", "PCA", body), model
    all_zero = bool(angles) and max(angles) < 0.01
    if all_zero:
        body += "<p>Every fitted axis is within 0.01° of the exact PCA's.</p>"
        angles = []
    return _Section("pca", "PCA", body + _scree(model, ratio, cum, angles)), model


def _scree(model, ratio: np.ndarray, cum: np.ndarray, angles: list[float]) -> str:
    """The scree plot, and the principal angles to the exact PCA beside it."""
    fig = _new_fig(10 if angles else 7, 3.8)
    ax = fig.add_subplot(1, 2 if angles else 1, 1)
    x = np.arange(1, len(ratio) + 1)
    ax.bar(x, ratio, color="#4a7fb5", label="per component")
    ax.plot(x, cum, color="#c8382d", marker="o", markersize=3, label="cumulative")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_title(f"scree ({model.method}, fitted on {model.n_samples:,} descriptors)")
    ax.set_xticks(x if len(x) <= 32 else x[:: max(1, len(x) // 16)])
    ax.legend(fontsize=8, frameon=False, loc="center right")
    _style(ax)
    ax.grid(axis="x", visible=False)
    if angles:
        ax2 = fig.add_subplot(1, 2, 2)
        xa = np.arange(1, len(angles) + 1)
        ax2.bar(xa, angles, color="#7a6fb0")
        ax2.set_ylim(0, max(1.0, max(angles) * 1.15))
        ax2.set_xlabel("principal component")
        ax2.set_ylabel("degrees")
        ax2.set_title("principal angle to the exact PCA")
        ax2.set_xticks(xa if len(xa) <= 32 else xa[:: max(1, len(xa) // 16)])
        _style(ax2)
        ax2.grid(axis="x", visible=False)
    return _figure(
        _save(fig),
        "PCA scree plot",
        ("Left: " if angles else "")
        + "share of the fitted descriptors' variance per component, and cumulative."
        + (
            " Right: angle between each fitted axis and the exact PCA's (0 = same subspace)."
            if angles
            else ""
        ),
    )


def _scatter_sample(
    output_url: str, manifest: dict[str, Any], df: pd.DataFrame, so: Options, limits: ReportLimits
) -> tuple[pd.DataFrame, list[str], int]:
    """(label, pc1, pc2) of a bounded, class-balanced sample of features/ rows;
    the classes shown, and the number of files read."""
    listed = manifest.get("files") or {}
    files = listed.get("features") or []
    ok = df[(df["n_keypoints"] > 0) & (df["part"] < len(files))]
    if not len(ok) or not files:
        return pd.DataFrame(columns=["label", "pc1", "pc2"]), [], 0
    labels = _pick_evenly(sorted(ok["label"].unique()), limits.sample_classes)
    names = [f.rsplit("/", 1)[-1] for f in files]
    if names == [f.rsplit("/", 1)[-1] for f in listed.get("images") or []]:
        # features part i holds the keypoints of images part i: read, for each
        # class shown, the part with most of its keypoints, within the row budget
        rows_per_part = ok.groupby("part")["n_keypoints"].sum()
        by_label = ok[ok["label"].isin(labels)].groupby(["label", "part"])["n_keypoints"].sum()
        parts: list[int] = []
        budget = limits.scatter_rows
        for lab in labels:
            cand = by_label.loc[lab].sort_values(ascending=False)
            if any(p in parts for p in cand.index):
                continue
            p = int(cand.index[0])
            if rows_per_part[p] <= budget:
                parts.append(p)
                budget -= int(rows_per_part[p])
    else:  # another engine's partitioning: a few files spread over the output
        parts = _pick_evenly(list(range(len(files))), 8)
    tables = _read_tables(output_url, [files[p] for p in parts], so, ["label", "pca"])
    out = []
    for t in tables:
        lab = np.asarray(t.column("label").to_pylist(), dtype=object)
        lab = np.where(pd.isna(lab), "", lab)
        col = t.column("pca").combine_chunks()
        if len(col) == 0:
            continue
        flat = col.flatten().to_numpy(zero_copy_only=False)
        k = len(flat) // len(col)
        xy = flat.reshape(len(col), k)[:, :2]
        out.append(pd.DataFrame({"label": lab, "pc1": xy[:, 0], "pc2": xy[:, 1]}))
    if not out:
        return pd.DataFrame(columns=["label", "pc1", "pc2"]), [], len(parts)
    allrows = pd.concat(out, ignore_index=True)
    allrows = allrows[allrows["label"].isin(labels)]
    shown = sorted(allrows["label"].unique())
    if not shown:
        return pd.DataFrame(columns=["label", "pc1", "pc2"]), [], len(parts)
    rng = np.random.default_rng(0)
    per = max(1, limits.scatter_points // len(shown))
    picked = []
    for _lab, g in allrows.groupby("label", sort=True):
        take = (
            rng.choice(len(g), min(per, len(g)), replace=False)
            if len(g) > per
            else np.arange(len(g))
        )
        picked.append(g.iloc[np.sort(take)])
    return pd.concat(picked, ignore_index=True), shown, len(parts)


def _run_scatter(
    output_url: str,
    manifest: dict[str, Any],
    df: pd.DataFrame,
    model: Any,
    so: Options,
    limits: ReportLimits,
) -> _Section:
    try:
        pts, shown, n_files = _scatter_sample(output_url, manifest, df, so, limits)
    except Exception as exc:  # noqa: BLE001 - the section says so
        return _Section(
            "pca-scatter",
            "PCA: first two components",
            _note(f"Cannot read features/: {one_line(exc)}"),
        )
    if not len(pts):
        return _Section("pca-scatter", "PCA: first two components", _note("No keypoints to show."))
    n_labels = df["label"].nunique()
    what = (
        f"{len(pts):,} keypoints of {len(shown)} classes"
        + (f" (of {n_labels}, picked evenly by name)" if len(shown) < n_labels else "")
        + f", sampled from {n_files} of {len((manifest.get('files') or {}).get('features') or [])} features/ files."
    )
    body = _note(what)
    if _mpl() is None:
        means = pts.groupby("label")[["pc1", "pc2"]].agg(["mean", "std"])
        body += _table(
            ["class", "PC1 mean", "PC1 sd", "PC2 mean", "PC2 sd"],
            [
                (_label(lab), *(f"{v:.1f}" for v in r))
                for lab, r in zip(means.index, means.to_numpy(), strict=True)
            ],
            cls="num",
        )
        return _Section("pca-scatter", "PCA: first two components", body)
    ratio = np.asarray(model.explained_variance_ratio, float) if model is not None else None
    fig = _new_fig(10, 5.2)
    ax = fig.add_subplot(1, 1, 1)
    cmap_n = 10 if len(shown) <= 10 else 20
    for i, lab in enumerate(shown):
        g = pts[pts["label"] == lab]
        color = f"C{i}" if cmap_n == 10 else _tab20(i)
        ax.scatter(
            g["pc1"], g["pc2"], s=4, alpha=0.45, color=color, label=_t(lab, 26), linewidths=0
        )
    xl = "PC 1" + (
        f" ({100 * ratio[0]:.1f}% of variance)" if ratio is not None and len(ratio) > 0 else ""
    )
    yl = "PC 2" + (
        f" ({100 * ratio[1]:.1f}% of variance)" if ratio is not None and len(ratio) > 1 else ""
    )
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title("ORB descriptors projected on the first two principal components")
    leg = ax.legend(
        loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False, markerscale=3
    )
    for h in leg.legend_handles:
        if h is not None:
            h.set_alpha(1.0)
    _style(ax)
    body += _figure(_save(fig), "PCA scatter", "One dot per keypoint, coloured by class.")
    return _Section("pca-scatter", "PCA: first two components", body)


def _tab20(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def _run_samples(
    manifest: dict[str, Any], df: pd.DataFrame, input_so: Options, limits: ReportLimits
) -> _Section:
    from fruitdask.features import OrbParams

    title = "Sample images with their ORB keypoints"
    input_url = manifest.get("input") or (manifest.get("config") or {}).get("input")
    orb_cfg = dict((manifest.get("config") or {}).get("orb") or {})
    try:
        params = OrbParams(**orb_cfg)
    except (TypeError, ValueError) as exc:
        return _Section("samples", title, _note(f"The recorded ORB settings are not usable: {exc}"))
    if not len(df) or not input_url:
        return _Section("samples", title, _note("No images."))
    ok = df[df["status"] == "ok"].sort_values("path", kind="stable")
    labels = _pick_evenly(sorted(ok["label"].unique()), limits.sample_classes)
    groups: list[tuple[str, pd.DataFrame]] = []
    for lab in labels:
        g = ok[ok["label"] == lab]
        idx = _pick_evenly(list(range(len(g))), limits.images_per_class)
        groups.append((_label(lab), g.iloc[idx]))
    nokp = df[df["status"] == "no_keypoints"].sort_values("path", kind="stable")
    if len(nokp) and limits.no_keypoint_examples > 0:
        idx = _pick_evenly(list(range(len(nokp))), limits.no_keypoint_examples)
        groups.append(("without keypoints", nokp.iloc[idx]))
    paths = [p for _, g in groups for p in g["path"]]
    data, problem = _read_input_images(str(input_url), paths, input_so)
    n_classes = ok["label"].nunique()
    body = _note(
        f"{len(paths)} images from {min(len(labels), n_classes)} of {n_classes} classes, "
        f"read from the input {input_url} and run through ORB again with the recorded settings "
        f"(nfeatures={params.nfeatures}); keypoints in magenta."
    )
    if problem:
        body += f'<p class="warn">Cannot read the input images: {_e(problem)}</p>'
        return _Section("samples", title, body)
    got = dict(zip(paths, data, strict=True))
    mismatched = 0
    blocks = []
    for name, g in groups:
        cells = []
        rows = zip(g["path"], g["n_keypoints"], g["label"], g["split"], strict=True)
        for path, n_rec, lab, split in rows:
            png, prob, found = _thumbnail(got[path], limits.thumb_px, params, params.max_pixels)
            mism = found is not None and found != int(n_rec)
            mismatched += int(mism)
            kp = f"{int(n_rec)} keypoints" + (f" (now {found})" if mism else "")
            if name == "without keypoints":
                kp = _label(lab)
            if isinstance(split, str) and split:
                kp += f" · {split}"
            cells.append(_thumb_cell(png, prob, kp, path, f"{_label(lab)}: {path}"))
        blocks.append(_block(_e(name), cells))
    body += f'<div class="blocks">{"".join(blocks)}</div>'
    if mismatched:
        body += (
            f'<p class="warn">{mismatched} image(s) give a different number of keypoints now '
            "than in the run (another OpenCV version, or the file changed).</p>"
        )
    return _Section("samples", title, body)


_DIGITS = re.compile(r"\d+")


def _reason(error: str, path: str, input_url: str) -> str:
    """An error message with the file's own path and the numbers taken out, to group by."""
    msg = str(error or "(no message)")
    for p in (io.join(input_url, path) if input_url else None, path):
        if p:
            msg = msg.replace(p, "<file>")
    return _DIGITS.sub("N", msg)


def _run_errors(manifest: dict[str, Any], df: pd.DataFrame, limits: ReportLimits) -> _Section:
    title = "Errors and images without keypoints"
    input_url = str(manifest.get("input") or "")
    bad = df[df["status"] == "error"]
    body = ""
    if not len(bad):
        body += "<p>No errors: every listed file was read and decoded.</p>"
    else:
        reasons = [_reason(e, p, input_url) for e, p in zip(bad["error"], bad["path"], strict=True)]
        bad = bad.assign(reason=reasons)
        groups = bad.groupby("reason", sort=False)
        order = groups.size().sort_values(ascending=False, kind="stable")
        rows = []
        for reason in order.index[: limits.error_groups]:
            g = groups.get_group(reason).sort_values("path", kind="stable")
            some = _pick_evenly(list(g["path"]), limits.examples_per_group)
            ex = "".join(f"<div><code>{_e(p)}</code></div>" for p in some)
            rows.append(
                (
                    f"{len(g):,}",
                    _e(reason if len(reason) < 400 else reason[:399] + "…"),
                    _e(str(g["error"].iloc[0])[:400]),
                    ex,
                )
            )
        body += f"<h3>{_plural(len(bad), 'file')} with errors, {_plural(len(order), 'reason')}</h3>"
        body += _table(["files", "reason", "first message", "examples"], rows, raw=True)
        if len(order) > limits.error_groups:
            rest = int(order.iloc[limits.error_groups :].sum())
            body += _note(
                f"{len(order) - limits.error_groups} more reasons ({rest:,} files) not shown."
            )
    nokp = df[df["status"] == "no_keypoints"]
    if len(nokp):
        dims = (nokp["width"].astype(str) + "×" + nokp["height"].astype(str)).value_counts()
        some = _pick_evenly(sorted(nokp["path"]), limits.examples_per_group)
        ex = ", ".join(f"<code>{_e(p)}</code>" for p in some)
        body += (
            f"<h3>{_plural(len(nokp), 'image')} without keypoints</h3><p>Sizes: "
            + ", ".join(f"{_e(k)} ({int(v):,})" for k, v in dims.head(5).items())
            + f". For example {ex}.</p>"
        )
    return _Section("errors", title, body)


def _run_sections(
    output_url: str,
    manifest: dict[str, Any],
    so: Options,
    input_so: Options,
    limits: ReportLimits,
) -> list[_Section]:
    df = _images_frame(output_url, manifest, so)
    pca_section, model = _run_pca(output_url, manifest, so)
    return [
        _run_summary(manifest, df),
        _run_timeline(manifest),
        _run_images(df),
        _run_keypoints(df, manifest),
        pca_section,
        _run_scatter(output_url, manifest, df, model, so, limits),
        _run_samples(manifest, df, input_so, limits),
        _run_errors(manifest, df, limits),
    ]


def _run_config(manifest: dict[str, Any], output_url: str) -> _Section:
    return _config_section(
        "config",
        manifest,
        [
            ("output", output_url),
            ("input", manifest.get("input")),
            ("run id", manifest.get("run_id")),
            ("created", manifest.get("created")),
            ("engine", manifest.get("engine")),
            ("cluster", json.dumps(manifest.get("cluster")) if manifest.get("cluster") else None),
        ],
    )


# ---------------------------------------------------------------- builders
def _options(so: Options, input_so: Options) -> tuple[dict[str, Any], dict[str, Any]]:
    out = dict(so or {})
    return out, dict(input_so if input_so is not None else out)


def build_run_report(
    output_url: str,
    storage_options: Options = None,
    input_storage_options: Options = None,
    limits: ReportLimits | None = None,
    manifest: dict[str, Any] | None = None,
) -> str:
    """The HTML report of a ``fruitdask run`` output (``fruitdask-output/1``).

    Parameters
    ----------
    output_url : str
        The output folder (local path or fsspec URL).
    storage_options : dict, optional
        fsspec options for the output.
    input_storage_options : dict, optional
        fsspec options for the run's input, read for the sample images
        (default: ``storage_options``).
    limits : ReportLimits, optional
        Sample sizes.
    manifest : dict, optional
        The manifest, when already read with :func:`read_manifest`.

    Returns
    -------
    str
        A complete, self-contained HTML document.

    Raises
    ------
    ReportError, StorageError
    """
    so, input_so = _options(storage_options, input_storage_options)
    limits = limits or ReportLimits()
    manifest = manifest if manifest is not None else read_manifest(output_url, so)
    _expect(manifest, RUN_FORMAT, output_url)
    sections = _run_sections(output_url, manifest, so, input_so, limits)
    sections.append(_run_config(manifest, output_url))
    c = manifest.get("counts") or {}
    return _page(
        f"fruitdask run {manifest.get('run_id', '')}",
        f"{manifest.get('input', '?')} → {output_url} · {_num(c.get('images'))} images, "
        f"{_num(c.get('labels'))} classes · {manifest.get('created', '')}",
        sections,
        [] if _mpl() else [_NO_MPL],
    )


def _expect(manifest: dict[str, Any], fmt: str, url: str) -> None:
    if manifest.get("format") != fmt:
        raise ReportError(f"{url}: a {manifest.get('format')!r} output, not {fmt!r}")


def _train_sections(
    output_url: str, manifest: dict[str, Any], so: Options, limits: ReportLimits
) -> tuple[list[_Section], pd.DataFrame]:
    c = manifest.get("counts") or {}
    clf = manifest.get("classifier") or {}
    voc = manifest.get("vocabulary") or {}
    summary = _cards(
        [
            ("training images", _num(c.get("images"))),
            ("used (with keypoints)", _num(c.get("images_used"))),
            ("without keypoints", _num(c.get("no_keypoints"))),
            ("keypoints", _num(c.get("keypoints"))),
            ("classes", _num(c.get("classes"))),
            ("visual words", _num(voc.get("k"))),
            ("training accuracy", _num(clf.get("train_accuracy"), 3)),
        ]
    )
    feats = manifest.get("features") or {}
    summary += _note(
        f"Features: {'reused from' if feats.get('reused') else 'computed into'} "
        f"{feats.get('output', 'pipeline')}/ (run {feats.get('run_id', '?')}). "
        "Training accuracy is measured on the training images: see an evaluation for the real one."
    )
    sections = [_Section("summary", "Summary", summary)]
    sections.append(_timeline_section("timeline", manifest))

    hist_files = (manifest.get("files") or {}).get("histograms") or []
    cols = ["label", "split", "n_keypoints", "status"]
    hdf = _frame(_read_tables(output_url, hist_files, so, cols), cols)
    if len(hdf):
        hdf["label"] = hdf["label"].astype(object).where(hdf["label"].notna(), "").map(str)
        hdf["status"] = hdf["status"].astype(str)

    # vocabulary
    max_iter = (manifest.get("train") or {}).get("kmeans_max_iter")
    body = _kv_table(
        [
            ("words (k)", _num(voc.get("k"))),
            ("initialisation", voc.get("init", "–")),
            (
                "iterations",
                _num(voc.get("n_iter")) + (f" of at most {max_iter}" if max_iter else ""),
            ),
            ("fitted on keypoints", _num(voc.get("fitted_on_rows"))),
            ("inertia per keypoint", _num(voc.get("inertia_per_keypoint"), 1)),
        ]
    )
    if max_iter and voc.get("n_iter") is not None and int(voc["n_iter"]) >= int(max_iter):
        body += (
            '<p class="warn">k-means stopped at its iteration limit: it may not have '
            "converged (raise the limit with the training options).</p>"
        )
    body += _word_usage(output_url, hist_files, hdf, so, limits)
    sections.append(_Section("vocabulary", "Visual vocabulary", body))

    body = _kv_table(_config_rows(clf))
    sections.append(_Section("classifier", "Classifier", body))

    if len(hdf):
        png, table = _class_chart(hdf)
        b = f"<p>{len(hdf):,} training images in {hdf['label'].nunique():,} classes.</p>"
        b += _figure(png, "training images per class", "Stacked by status.") if png else table
        sections.append(_Section("classes", "Training images per class", b))
    return sections, hdf


def _word_usage(
    output_url: str, files: Sequence[str], hdf: pd.DataFrame, so: Options, limits: ReportLimits
) -> str:
    """How often each visual word occurs, from the histograms of a bounded number of images."""
    if not files or not len(hdf):
        return ""
    per_part = hdf.groupby("part").size()
    parts, n = [], 0
    for p in _pick_evenly(list(per_part.index), len(per_part)):
        if n and n + int(per_part[p]) > limits.histogram_rows:
            break
        parts.append(int(p))
        n += int(per_part[p])
    try:
        tables = _read_tables(
            output_url, [files[p] for p in parts], so, ["histogram", "n_keypoints"]
        )
    except Exception as exc:  # noqa: BLE001 - the section says so
        return _note(f"Cannot read the histograms: {one_line(exc)}")
    sums, rows = None, 0
    for t in tables:
        col = t.column("histogram").combine_chunks()
        if len(col) == 0:
            continue
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        h = flat.reshape(len(col), -1)
        w = t.column("n_keypoints").to_numpy().astype(np.float64)
        s = (h * w[:, None]).sum(0)  # back to keypoint counts
        sums = s if sums is None else sums + s
        rows += len(col)
    if sums is None or sums.sum() <= 0:
        return ""
    share = np.sort(sums / sums.sum())[::-1]
    unused = int((share == 0).sum())
    txt = (
        f"<p>Word usage over {rows:,} images ({len(parts)} of {len(files)} histogram files): "
        f"the most frequent word holds {_pct(share[0])} of the keypoints, the top 10% of words "
        f"{_pct(share[: max(1, len(share) // 10)].sum())}; {unused} word(s) never occur.</p>"
    )
    if _mpl() is None:
        return txt
    fig = _new_fig(10, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(1, len(share) + 1), share, color="#4a7fb5", width=1.0)
    ax.axhline(1 / len(share), color="#c8382d", linewidth=1, linestyle="--", label="uniform")
    ax.set_xlabel("visual word, by frequency")
    ax.set_ylabel("share of keypoints")
    ax.set_title("how often each visual word occurs")
    ax.set_xlim(0.5, len(share) + 0.5)
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    ax.grid(axis="x", visible=False)
    return txt + _figure(
        _save(fig), "visual word usage", "Words sorted from most to least frequent."
    )


def build_train_report(
    output_url: str,
    storage_options: Options = None,
    input_storage_options: Options = None,
    limits: ReportLimits | None = None,
    manifest: dict[str, Any] | None = None,
) -> str:
    """The HTML report of a ``fruitdask train`` output (``fruitdask-train/1``).

    The training summary (vocabulary, classifier, classes), then the report of
    the feature run it holds (``OUT/pipeline``), when that one is complete.
    Parameters and errors as :func:`build_run_report`.
    """
    so, input_so = _options(storage_options, input_storage_options)
    limits = limits or ReportLimits()
    manifest = manifest if manifest is not None else read_manifest(output_url, so)
    _expect(manifest, TRAIN_FORMAT, output_url)
    sections, _ = _train_sections(output_url, manifest, so, limits)
    sub = (manifest.get("features") or {}).get("output") or "pipeline"
    purl = io.join(output_url, sub)
    try:
        pman = read_manifest(purl, so)
        _expect(pman, RUN_FORMAT, purl)
    except (ReportError, StorageError) as exc:
        sections.append(_Section("features-part", "Feature run", _note(f"Not shown: {exc}")))
    else:
        sections.append(
            _Section(
                "features-part",
                "Feature run",
                _note(
                    f"The ORB + PCA run the model was trained on: {sub}/ (run {pman.get('run_id')})."
                ),
            )
        )
        for s in _run_sections(purl, pman, so, input_so, limits):
            if s.id == "summary":
                continue
            sections.append(_Section(f"features-{s.id}", f"Features: {s.title}", s.body))
    sections.append(
        _config_section(
            "config",
            manifest,
            [
                ("output", output_url),
                ("input", manifest.get("input")),
                ("run id", manifest.get("run_id")),
                ("created", manifest.get("created")),
            ],
        )
    )
    c = manifest.get("counts") or {}
    return _page(
        f"fruitdask train {manifest.get('run_id', '')}",
        f"{manifest.get('input', '?')} → {output_url} · {_num(c.get('images'))} training images, "
        f"{_num(c.get('classes'))} classes · {manifest.get('created', '')}",
        sections,
        [] if _mpl() else [_NO_MPL],
    )


def _confusion_chart(cm: np.ndarray, labels: Sequence[str], title: str) -> bytes:
    """A row-normalised confusion matrix of bounded size."""
    n = len(labels)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(11.0 if n <= 80 else 8.0, max(5.0, 0.22 * n + 3.0))
    fig = _new_fig(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    if n <= 80:
        fs = max(4.0, min(9.0, 260.0 / max(n, 1)))
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels([_t(x, 22) for x in labels], rotation=90, fontsize=fs)
        ax.set_yticklabels([_t(x, 22) for x in labels], fontsize=fs)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class")
    return _save(fig)


def _eval_sections(
    output_url: str,
    manifest: dict[str, Any],
    so: Options,
    input_so: Options,
    limits: ReportLimits,
) -> list[_Section]:
    return [
        _eval_summary(manifest),
        _eval_accuracy(manifest),
        *_eval_confusion(output_url, manifest, so, input_so, limits),
        _eval_per_class(manifest),
        _timeline_section("timeline", manifest),
    ]


def _eval_summary(manifest: dict[str, Any]) -> _Section:
    c = manifest.get("counts") or {}
    base = manifest.get("baseline") or {}
    acc = manifest.get("accuracy")
    summary = _cards(
        [
            ("accuracy", _num(acc, 3)),
            (f"majority baseline ({_label(base.get('label'))})", _num(base.get("accuracy"), 3)),
            ("top-3 accuracy", _num(manifest.get("top3_accuracy"), 3)),
            ("images", _num(c.get("images"))),
            ("not classified", _num((c.get("images") or 0) - (c.get("classified") or 0))),
            ("macro F1", _num((manifest.get("macro") or {}).get("f1"), 3)),
        ]
    )
    model = manifest.get("model") or {}
    summary += _note(
        f"Model {model.get('run_id', '?')} ({model.get('kind', '?')}, {model.get('k', '?')} words), "
        f"evaluated on the {manifest.get('split', '?')} split of {manifest.get('input', '?')}. "
        "Images without keypoints cannot be classified and count as wrong."
    )
    return _Section("summary", "Summary", summary)


def _eval_accuracy(manifest: dict[str, Any]) -> _Section:
    """Accuracy against the majority-class baseline."""
    base = manifest.get("baseline") or {}
    wanted = [
        ("this model", manifest.get("accuracy"), "#2f6db5"),
        ("this model, top-3", manifest.get("top3_accuracy"), "#7aa6d8"),
        ("images with keypoints only", manifest.get("accuracy_classified"), "#7aa6d8"),
        (f"majority class ({_label(base.get('label'))})", base.get("accuracy"), "#b0b6c0"),
    ]
    bars = [(k, float(v), col) for k, v, col in wanted if v is not None]
    if _mpl() is not None and bars:
        fig = _new_fig(10, 0.45 * len(bars) + 1.1)
        ax = fig.add_subplot(1, 1, 1)
        y = np.arange(len(bars))
        ax.barh(y, [v for _, v, _ in bars], color=[col for _, _, col in bars], height=0.6)
        for yi, (_, v, _) in zip(y, bars, strict=True):
            ax.text(v + 0.01, yi, f"{v:.3f}", va="center", fontsize=9)
        ax.set_yticks(y)
        ax.set_yticklabels([_t(k, 40) for k, _, _ in bars])
        ax.invert_yaxis()
        ax.set_xlim(0, 1.08)
        ax.set_xlabel("accuracy")
        ax.set_title("accuracy against the majority-class baseline")
        _style(ax)
        ax.grid(axis="y", visible=False)
        body = _figure(
            _save(fig), "accuracy", "The baseline always answers the most frequent training class."
        )
    else:
        body = _table(
            ["", "accuracy", ""],
            [(_e(k), f"{v:.3f}", _bar(v, 1.0)) for k, v, _ in bars],
            cls="num",
            raw=True,
        )
    return _Section("accuracy", "Accuracy", body)


def _eval_confusion(output_url, manifest, so, input_so, limits) -> list[_Section]:
    """The confusion matrix and the most confused pairs, from the predictions."""
    from fruitdask.metrics import compute_metrics

    listed = manifest.get("files") or {}
    names = listed.get("evaluation", []) if isinstance(listed, dict) else listed
    predictions = [f for f in names if str(f).startswith("predictions")]
    pred = None
    if predictions:
        pred = io.read_table(io.join(output_url, predictions[0]), so).to_pandas()
    labels = list((manifest.get("per_class") or {}).keys())
    if pred is not None and len(pred):
        y_true = [str(x) for x in pred["label"]]
        y_pred = [
            None if (p is None or (isinstance(p, float) and math.isnan(p))) else str(p)
            for p in pred["predicted"]
        ]
        labels = sorted(set(labels) | set(y_true) | {p for p in y_pred if p is not None})
        m = compute_metrics(y_true, y_pred, labels)
        cm = np.asarray(m["confusion"], dtype=np.int64)
        if _mpl() is not None:
            png = _confusion_chart(cm, labels, f"{len(labels)} classes, {len(pred):,} images")
            body = _figure(
                png,
                "confusion matrix",
                "Rows: true class; columns: predicted; shade: share of the row.",
            )
            if len(labels) > 80:
                body += _note("Too many classes to name on the axes: see the pairs below.")
        else:
            body = _note("The most confused pairs are listed in the next section.")
        if m.get("not_classified"):
            body += (
                "<p>Not classified (no keypoints or unreadable): "
                + ", ".join(f"{_e(_label(k))} {v}" for k, v in m["not_classified"].items())
                + ".</p>"
            )
        return [
            _Section("confusion", "Confusion matrix", body),
            _confused_pairs(manifest, pred, cm, labels, input_so, limits),
        ]
    return [_Section("confusion", "Confusion matrix", _note("No predictions in this output."))]


def _eval_per_class(manifest: dict[str, Any]) -> _Section:
    per = manifest.get("per_class") or {}
    rows = sorted(per.items(), key=lambda kv: (kv[1].get("f1", 0), kv[0]))
    body = _table(
        ["class", "precision", "recall", "F1", "support", "F1"],
        [
            (
                _e(_label(k)),
                f"{v.get('precision', 0):.3f}",
                f"{v.get('recall', 0):.3f}",
                f"{v.get('f1', 0):.3f}",
                f"{int(v.get('support', 0)):,}",
                _bar(float(v.get("f1", 0)), 1.0),
            )
            for k, v in rows
        ],
        cls="num",
        raw=True,
    )
    return _Section("per-class", "Per class (worst F1 first)", body)


def _confused_pairs(
    manifest: dict[str, Any],
    pred: pd.DataFrame,
    cm: np.ndarray,
    labels: Sequence[str],
    input_so: Options,
    limits: ReportLimits,
) -> _Section:
    title = "Most confused pairs"
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[: limits.confused_pairs]
    pairs = [(int(i // len(labels)), int(i % len(labels))) for i in flat]
    pairs = [(i, j) for i, j in pairs if off[i, j] > 0]
    if not pairs:
        return _Section("confused", title, "<p>No image was confused with another class.</p>")
    pred = pred.assign(
        label=pred["label"].astype(str),
        predicted=pred["predicted"].astype(object),
    )
    wanted: list[tuple[int, int, pd.DataFrame, pd.DataFrame]] = []
    for i, j in pairs:
        t, p = labels[i], labels[j]
        wrong = pred[(pred["label"] == t) & (pred["predicted"] == p)].sort_values(
            "probability", ascending=False
        )
        ref = pred[(pred["label"] == p) & (pred["predicted"] == p)].sort_values(
            "probability", ascending=False
        )
        wanted.append((i, j, wrong.head(limits.confused_examples), ref.head(1)))
    paths = list(
        dict.fromkeys(
            p for _, _, w, r in wanted for p in [*w["path"].astype(str), *r["path"].astype(str)]
        )
    )
    input_url = str(manifest.get("input") or "")
    data, problem = _read_input_images(input_url, paths, input_so)
    got = dict(zip(paths, data, strict=True)) if not problem else {}
    body = _note(
        "Each pair: images of the true class taken for the predicted one (most confident first), "
        "then a correctly classified image of the predicted class for comparison."
    )
    if problem:
        body += f'<p class="warn">Cannot read the input images: {_e(problem)}</p>'
    blocks = []
    for i, j, wrong, ref in wanted:
        t, p = labels[i], labels[j]
        head = (
            f'{_e(_label(t))} → {_e(_label(p))}<br><span class="note">{int(cm[i, j]):,} of '
            f"{int(cm[i].sum()):,} ({_pct(cm[i, j] / max(1, cm[i].sum()))})</span>"
        )
        cells = []
        for kind, rows in (("taken for " + _label(p), wrong), ("a real " + _label(p), ref)):
            for path, prob in zip(rows["path"].astype(str), rows["probability"], strict=True):
                if problem:
                    png, why = None, "input unreadable"
                else:
                    png, why, _ = _thumbnail(
                        got.get(path, FileNotFoundError(path)), limits.thumb_px, None, 40_000_000
                    )
                cells.append(_thumb_cell(png, why, f"{kind}, p={float(prob):.2f}", path, path))
        blocks.append(_block(head, cells))
    body += f'<div class="blocks">{"".join(blocks)}</div>'
    return _Section("confused", title, body)


def build_evaluation_report(
    output_url: str,
    storage_options: Options = None,
    input_storage_options: Options = None,
    limits: ReportLimits | None = None,
    manifest: dict[str, Any] | None = None,
) -> str:
    """The HTML report of a ``fruitdask evaluate`` output (``fruitdask-evaluation/1``).

    Accuracy against the majority baseline, the confusion matrix, the most
    confused pairs with example images, per-class scores. Parameters and
    errors as :func:`build_run_report`.
    """
    so, input_so = _options(storage_options, input_storage_options)
    limits = limits or ReportLimits()
    manifest = manifest if manifest is not None else read_manifest(output_url, so)
    _expect(manifest, EVAL_FORMAT, output_url)
    sections = _eval_sections(output_url, manifest, so, input_so, limits)
    sections.append(
        _config_section(
            "config",
            manifest,
            [
                ("output", output_url),
                ("input", manifest.get("input")),
                ("split", manifest.get("split")),
                ("model", json.dumps(manifest.get("model"))),
                ("created", manifest.get("created")),
            ],
        )
    )
    c = manifest.get("counts") or {}
    return _page(
        "fruitdask evaluation",
        f"{manifest.get('input', '?')} ({manifest.get('split', '?')}) → {output_url} · "
        f"{_num(c.get('images'))} images · accuracy {_num(manifest.get('accuracy'), 3)} · "
        f"{manifest.get('created', '')}",
        sections,
        [] if _mpl() else [_NO_MPL],
    )


_BUILDERS: dict[str, Callable[..., str]] = {
    RUN_FORMAT: build_run_report,
    TRAIN_FORMAT: build_train_report,
    EVAL_FORMAT: build_evaluation_report,
}


def build_report(
    output_url: str,
    storage_options: Options = None,
    input_storage_options: Options = None,
    limits: ReportLimits | None = None,
) -> str:
    """The HTML report of any finished fruitdask output, by its manifest's ``format``.

    Raises
    ------
    ReportError
        Not a finished fruitdask output (see :func:`read_manifest`).
    StorageError
        The output cannot be read.
    """
    manifest = read_manifest(output_url, storage_options)
    builder = _BUILDERS[manifest["format"]]
    return builder(output_url, storage_options, input_storage_options, limits, manifest=manifest)


def write_report(
    output_url: str,
    storage_options: Options = None,
    input_storage_options: Options = None,
    limits: ReportLimits | None = None,
    to: str | None = None,
) -> str:
    """Build the report of ``output_url`` and write it; returns where it was written.

    Parameters
    ----------
    to : str, optional
        Where to write (a file URL); default ``output_url/report.html``. Written
        with the output's ``storage_options``; one PUT on S3, atomic locally.
    """
    page = build_report(output_url, storage_options, input_storage_options, limits)
    url = to or io.join(output_url, REPORT_FILE)
    io.write_bytes(url, page.encode("utf-8"), storage_options)
    return url
