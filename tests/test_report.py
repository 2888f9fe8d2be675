"""The HTML report (fruitdask.report) of real run, train and evaluate outputs.

Outputs are built once per module: a generated sample plus hostile names (a file
called ``<script>...``, a class folder with markup, ``&`` and ``$`` in its name),
a corrupt, an empty and a truncated file, and an image too small for keypoints.
The reports are parsed with :mod:`html.parser`; one test renders them in
headless Chromium when it is installed.

CLI glue (draft for ``fruitdask/cli/``)::

    p = sub.add_parser("report", help="write OUT/report.html for a finished output")
    report.add_report_arguments(p)     # OUT, --to, --input-storage-option, sample sizes
    add_storage_arguments(p)           # --endpoint-url, --anon, --storage-option
    p.set_defaults(func=lambda a: report.cmd_report(a, storage_options_from_args(a)))

    # ReportError is an InputError (exit 2, one line), like StorageError.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest

from fruitdask import classify, pipeline, report, sample
from fruitdask.config import RunConfig

HOSTILE_FILE = "x<script>alert(1)<!--.jpg"
HOSTILE_LABEL = 'Evil <i>&amp; "Co" $x$'

RUN_SECTIONS = {
    "summary",
    "timeline",
    "images",
    "keypoints",
    "pca",
    "pca-scatter",
    "samples",
    "errors",
    "config",
}
TRAIN_SECTIONS = {
    "summary",
    "timeline",
    "vocabulary",
    "classifier",
    "classes",
    "features-part",
    *(f"features-{s}" for s in RUN_SECTIONS - {"summary", "config"}),
    "config",
}
EVAL_SECTIONS = {"summary", "accuracy", "confusion", "confused", "per-class", "timeline", "config"}
SECTIONS = {"run": RUN_SECTIONS, "train": TRAIN_SECTIONS, "eval": EVAL_SECTIONS}

# Every tag the report may contain: data never adds one.
TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "h4",
    "p", "nav", "ol", "li", "a", "main", "section", "div", "span", "table", "thead",
    "tbody", "tr", "th", "td", "figure", "img", "figcaption", "code", "details",
    "summary", "footer", "br",
}  # fmt: skip


class Page(HTMLParser):
    """What the tests look at: tags, ids, images, links, texts."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.ids: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.styles: list[str] = []
        self.sections: dict[str, list[str]] = {}  # section id -> img srcs
        self._section: list[str] = []
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        for k, v in attrs:
            self.attrs.append((tag, k, v or ""))
        if "id" in a:
            self.ids.append(a["id"] or "")
        if tag == "section":
            self._section.append(a.get("id") or "")
            self.sections.setdefault(a.get("id") or "", [])
        if tag == "img":
            self.imgs.append(a)
            for sid in self._section:
                self.sections[sid].append(a.get("src") or "")
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "section" and self._section:
            self._section.pop()
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def _png(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix) :], validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.size > 0
    return img


def _tiny_png(size: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((size, size, 3), 127, np.uint8))
    assert ok
    return buf.tobytes()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report") / "in"
    sample.generate(root, classes=4, per_class=10, seed=2)
    train = root / "Training"
    first = sorted(p for p in train.iterdir() if p.is_dir())[0]
    jpgs = sorted(first.glob("*.jpg"))
    (first / HOSTILE_FILE).write_bytes(b"this is not an image")  # error: cannot decode
    (first / "empty.jpg").write_bytes(b"")  # error: empty file
    (first / "truncated.jpg").write_bytes(jpgs[0].read_bytes()[:200])
    (first / "tiny.png").write_bytes(_tiny_png(20))  # no keypoints
    for split in ("Training", "Test"):
        evil = root / split / HOSTILE_LABEL
        evil.mkdir()
        for i, src in enumerate(jpgs[:3]):
            shutil.copy(src, evil / f"e{i}.jpg")
    return root


@pytest.fixture(scope="module")
def outputs(data, dask_client, tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("report-out")
    run_out = str(base / "run")
    pipeline.run(RunConfig(input=str(data), output=run_out), dask_client)
    model_out = str(base / "model")
    classify.train(
        RunConfig(input=str(data), output=model_out, write_descriptors=False),
        dask_client,
        classify.TrainOptions(words=8),
    )
    model = classify.load_model(classify.model_url(model_out))
    eval_out = str(base / "eval")
    classify.evaluate(model, str(data), eval_out, dask_client)
    return {"run": run_out, "train": model_out, "eval": eval_out}


@pytest.fixture(scope="module")
def pages(outputs) -> dict[str, str]:
    out = {}
    for kind, url in outputs.items():
        written = report.write_report(url)
        assert written == os.path.join(url, report.REPORT_FILE)
        out[kind] = Path(written).read_text(encoding="utf-8")
    return out


KINDS = ["run", "train", "eval"]


# ---------------------------------------------------------------- self-contained
@pytest.mark.parametrize("kind", KINDS)
def test_every_image_is_an_embedded_png(pages, kind):
    page = Page(pages[kind])
    assert len(page.imgs) >= 4
    for img in page.imgs:
        _png(img["src"] or "")
        assert img.get("alt")


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_external(pages, kind):
    text = pages[kind]
    page = Page(text)
    assert "script" not in page.tags
    assert not re.search(r"<\s*script", text, re.I)
    for tag, attr, value in page.attrs:
        if attr in ("src", "href", "action", "srcset", "poster", "data"):
            v = value.strip().lower()
            assert not v.startswith(("http:", "https:", "//", "file:", "ftp:")), (tag, attr)
            if attr == "href":
                assert v.startswith("#"), (tag, value)
            if attr == "src":
                assert v.startswith("data:image/png;base64,"), (tag, value[:60])
        assert not attr.startswith("on"), (tag, attr)  # no event handlers
        if attr == "style":
            assert "url(" not in value and "@import" not in value
    css = "".join(page.styles)
    assert "url(" not in css and "@import" not in css
    # the page forbids anything but inline CSS and data: images, should a bug add one
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


@pytest.mark.parametrize("kind", KINDS)
def test_sections_and_table_of_contents(pages, kind):
    page = Page(pages[kind])
    assert len(page.ids) == len(set(page.ids)), "ids must be unique"
    assert SECTIONS[kind] <= set(page.sections), SECTIONS[kind] - set(page.sections)
    links = [v[1:] for t, a, v in page.attrs if t == "a" and a == "href"]
    assert set(links) >= set(page.sections) - {""}
    assert set(links) <= set(page.ids)


@pytest.mark.parametrize("kind", KINDS)
def test_only_known_tags(pages, kind):
    """Markup in file names and labels is text: it never becomes an element."""
    assert set(Page(pages[kind]).tags) <= TAGS


# ---------------------------------------------------------------- escaping
def test_hostile_file_name_and_label_are_escaped(pages):
    run = pages["run"]
    assert "<script" not in run and "<!--" not in run.split("<body>", 1)[1]
    assert "x&lt;script&gt;alert(1)&lt;!--.jpg" in run  # in the errors section
    assert "<i>" not in run
    escaped = "Evil &lt;i&gt;&amp;amp; &quot;Co&quot; $x$"
    assert escaped in run  # the sample grid names the class
    assert escaped in pages["eval"]  # per-class table


def test_hostile_label_in_charts_renders(pages):
    """A ``$...$`` label is drawn as text, not parsed as mathtext (which could fail)."""
    page = Page(pages["run"])
    assert len(page.sections["images"]) == 1  # the class chart was drawn


# ---------------------------------------------------------------- run sections
def test_run_errors_grouped_by_reason(pages):
    page = pages["run"]
    section = page.split('id="errors"', 1)[1].split("</section>", 1)[0]
    assert "3 files with errors" in section
    assert "cannot decode image" in section
    assert "empty file (N bytes)" in section  # numbers taken out of the reason
    assert "1 image without keypoints" in section and "tiny.png" in section


def test_run_samples_show_keypoints_of_several_classes(pages, outputs):
    page = Page(pages["run"])
    thumbs = page.sections["samples"]
    manifest = json.loads(Path(outputs["run"], "manifest.json").read_text())
    classes = manifest["counts"]["labels"]
    limits = report.ReportLimits()
    # every class (5 <= sample_classes), 3 each, plus the image without keypoints
    assert len(thumbs) == classes * limits.images_per_class + 1
    sizes = {_png(s).shape[:2] for s in thumbs}
    assert max(max(s) for s in sizes) == limits.thumb_px
    # magenta (anti-aliased) keypoints are drawn on the images that have some
    drawn = sum(
        int(((img[..., 0] > 180) & (img[..., 1] < 90) & (img[..., 2] > 180)).sum()) > 50
        for img in (_png(s) for s in thumbs)
    )
    assert drawn >= classes * limits.images_per_class - 1


def test_run_scatter_and_scree_drawn(pages):
    page = Page(pages["run"])
    assert len(page.sections["pca"]) == 1
    assert len(page.sections["pca-scatter"]) == 1
    assert len(page.sections["keypoints"]) == 1
    assert len(page.sections["timeline"]) == 1


def test_unreachable_input_is_reported_not_fatal(outputs, tmp_path):
    manifest = report.read_manifest(outputs["run"])
    manifest["input"] = str(tmp_path / "moved-away")
    text = report.build_run_report(outputs["run"], manifest=manifest)
    page = Page(text)
    assert page.sections["samples"] == []
    section = text.split('id="samples"', 1)[1].split("</section>", 1)[0]
    assert "Cannot read the input images" in section and "not found" in section
    assert RUN_SECTIONS <= set(page.sections)


def test_limits_bound_the_samples(outputs):
    limits = report.ReportLimits(
        sample_classes=2, images_per_class=1, no_keypoint_examples=0, scatter_points=50
    )
    page = Page(report.build_report(outputs["run"], limits=limits))
    assert len(page.sections["samples"]) == 2


def test_samples_of_a_packed_input(data, dask_client, tmp_path):
    from fruitdask import pack

    packed = str(tmp_path / "packed")
    pack.pack(str(data), packed, dask_client, shard_size=40, row_group_size=16)
    out = str(tmp_path / "out")
    pipeline.run(RunConfig(input=packed, output=out), dask_client)
    text = report.build_report(out)
    page = Page(text)
    assert len(page.sections["samples"]) >= 4  # thumbnails read from the shards
    assert "Cannot read the input" not in text and 'class="miss"' not in text


# ---------------------------------------------------------------- train / evaluate
def test_train_report_holds_the_feature_run(pages):
    page = Page(pages["train"])
    assert len(page.sections["features-samples"]) > 0
    text = pages["train"]
    assert "visual words" in text and "training accuracy" in text


def test_eval_report_confusion_and_pairs(pages, outputs):
    page = Page(pages["eval"])
    assert len(page.sections["confusion"]) == 1
    cm = _png(page.sections["confusion"][0])
    assert cm.shape[0] > 300
    manifest = json.loads(Path(outputs["eval"], "manifest.json").read_text())
    text = pages["eval"]
    assert f"{manifest['accuracy']:.3f}" in text
    assert f"{manifest['baseline']['accuracy']:.3f}" in text
    if manifest["accuracy_classified"] < 1.0:  # some pair was confused: examples shown
        assert len(page.sections["confused"]) >= 2


# ---------------------------------------------------------------- protocol
def _fake_output(tmp_path: Path, manifest: dict, success: str | None) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    if success is not None:
        (tmp_path / "_SUCCESS").write_text(success + "\n")
    return str(tmp_path)


def test_refuses_unfinished_or_mixed_outputs(outputs, tmp_path):
    good = json.loads(Path(outputs["run"], "manifest.json").read_text())
    with pytest.raises(report.ReportError, match="no committed result"):
        report.build_report(_fake_output(tmp_path / "a", good, None))
    with pytest.raises(report.ReportError, match="no committed result"):
        report.build_report(_fake_output(tmp_path / "b", good, "other"))
    with pytest.raises(report.ReportError, match="no committed result"):
        report.build_report(str(tmp_path))
    with pytest.raises(report.ReportError, match="unknown output format"):
        report.build_report(_fake_output(tmp_path / "c", {"format": "x/1", "run_id": "r"}, "r"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text("{not json")
    (tmp_path / "d" / "_SUCCESS").write_text("r\n")
    with pytest.raises(report.ReportError, match="no committed result"):
        report.build_report(str(tmp_path / "d"))
    with pytest.raises(report.ReportError, match="not 'fruitdask-train/1'"):
        report.build_train_report(outputs["run"])


def test_reads_only_the_listed_files(outputs, tmp_path):
    """A stray file of another run in a table folder is not read (no globbing)."""
    copy = tmp_path / "copy"
    shutil.copytree(outputs["run"], copy)
    (copy / "report.html").unlink()
    (copy / "images" / "part-00000-deadbeef.parquet").write_bytes(b"not parquet")
    text = report.build_report(str(copy))
    assert "deadbeef" not in text


# ---------------------------------------------------------------- without matplotlib
def test_without_matplotlib_tables_instead_of_charts(outputs, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    for kind in KINDS:
        text = report.build_report(outputs[kind])
        page = Page(text)
        assert "fruitdask[plot]" in text
        assert SECTIONS[kind] <= set(page.sections)
        for img in page.imgs:  # only thumbnails (drawn by OpenCV) remain
            _png(img["src"] or "")
        if kind == "run":
            assert page.sections["timeline"] == [] and page.sections["pca"] == []
            assert "transform_write" in text  # the timeline as a table
            assert len(page.sections["samples"]) > 0
        if kind == "eval":
            assert page.sections["confusion"] == []


# ---------------------------------------------------------------- CLI glue
def test_the_report_command(outputs, tmp_path, cli):
    dest = tmp_path / "r.html"
    r = cli.run("report", outputs["eval"], "--to", str(dest), "--images-per-class", "1")
    assert r.returncode == 0, r.stderr
    assert dest.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert r.stdout.startswith(f"report: {dest}")
    r = cli.run("report", str(tmp_path / "nothing"))
    cli.one_line(r, "no committed result")


# ---------------------------------------------------------------- S3
@pytest.mark.s3
def test_report_of_an_s3_output(dask_client, s3, data):
    bucket = s3.make_bucket()
    s3.upload_tree(data, f"{bucket}/in")
    so = s3.storage_options
    out = f"{bucket}/out"
    pipeline.run(RunConfig(input=f"{bucket}/in", output=out, storage_options=so), dask_client)
    url = report.write_report(out, so)
    assert url == f"{out}/{report.REPORT_FILE}"
    text = s3.fs().cat_file(url.removeprefix("s3://")).decode()
    page = Page(text)
    assert RUN_SECTIONS <= set(page.sections)
    assert len(page.sections["samples"]) > 0  # thumbnails read from the S3 input
    assert "Cannot read the input" not in text


# ---------------------------------------------------------------- a real browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _render(browser: str, html_path: Path, png: Path) -> list[str]:
    """Screenshot ``html_path``; returns the console messages Chromium logged."""
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--hide-scrollbars",
                "--window-size=1280,2400",
                f"--screenshot={png}",
                html_path.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert png.exists(), r.stderr[-2000:]
    return [line for line in r.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH")
def test_renders_in_chromium(outputs, pages, tmp_path):
    browser = _chromium()
    assert browser
    # the detector works: a page breaking the rules logs console messages
    bad = tmp_path / "bad.html"
    bad.write_text(
        pages["eval"].replace("</main>", '<img src="http://example.invalid/x.png"></main>')
    )
    assert _render(browser, bad, tmp_path / "bad.png")
    for kind in KINDS:
        shot = tmp_path / f"{kind}.png"
        console = _render(browser, Path(outputs[kind]) / report.REPORT_FILE, shot)
        assert console == [], console
        img = cv2.imread(str(shot))
        assert img is not None and img.shape[1] == 1280
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # not blank
        assert (img < 128).any(axis=2).mean() > 0.005  # some dark text and charts
