"""``python -m fruitdask``: argument parsing and printing only; no pipeline logic.

Exit codes: 0 success, 2 bad arguments or bad input (one line on stderr, nothing
written), 130 interrupted (SIGINT), 143 terminated (SIGTERM), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["console_main", "main"]

EXIT_USAGE = 2

# Sub-command modules that add themselves to the parser: each has
# ``register(subparsers)`` and sets ``func`` on its parser.
_EXTENSIONS = ("fruitdask.cli_bovw", "fruitdask.cli_aws")


class _Terminated(BaseException):
    """Raised by the SIGTERM handler so context managers tear the cluster down."""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def storage_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Build fsspec storage options from ``--endpoint-url``, ``--anon``, ``--storage-option``."""
    so: dict[str, Any] = {}
    for item in args.storage_option or []:
        if "=" not in item:
            raise UsageError(f"--storage-option expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        so[key.strip()] = _parse_value(value)
    if args.endpoint_url:
        so["endpoint_url"] = args.endpoint_url
    if args.anon:
        so["anon"] = True
    return so


def add_storage_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage (fsspec; AWS_* environment variables are honoured)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    g.add_argument("--anon", action="store_true", help="anonymous S3 access")
    g.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="extra fsspec storage option (repeatable; VALUE parsed as JSON when it can be)",
    )


def add_orb_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ORB")
    g.add_argument("--nfeatures", type=int, help="max keypoints per image (default 500)")
    g.add_argument("--scale-factor", type=float, help="pyramid scale factor (default 1.2)")
    g.add_argument("--nlevels", type=int, help="pyramid levels (default 8)")
    g.add_argument("--edge-threshold", type=int, help="border without keypoints (default 31)")
    g.add_argument("--fast-threshold", type=int, help="FAST threshold (default 20)")
    g.add_argument("--max-pixels", type=int, help="refuse larger images (default 40,000,000)")


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--cluster",
        default=None,
        help="local (default), ec2, or the address of a running scheduler (tcp://host:8786)",
    )
    g.add_argument("--workers", type=int, help="worker processes (default: fill the cores)")
    g.add_argument(
        "--threads-per-worker",
        type=int,
        help="threads per worker (default: 2 if the cores are even)",
    )
    g.add_argument("--memory-limit", help="per-worker memory limit, e.g. 4GiB (default auto)")
    g.add_argument(
        "--host",
        help="interface the local scheduler binds to (default 127.0.0.1; "
        "0.0.0.0 exposes the unauthenticated dashboard)",
    )
    g.add_argument("--dashboard-address", help="dashboard bind address (default 127.0.0.1:8787)")
    g.add_argument("--report", metavar="FILE.html", help="save a Dask performance report")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def build_parser() -> argparse.ArgumentParser:
    from fruitdask import __version__

    parser = _Parser(prog="fruitdask", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fruitdask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    r = sub.add_parser(
        "run",
        help="images -> ORB descriptors -> PCA -> Parquet",
        description="Extract ORB descriptors from every image under INPUT, fit PCA, write "
        "Parquet to OUTPUT. With no INPUT, a generated sample data set is used.",
    )
    r.add_argument("--input", "-i", help="folder or URL of images (default: generated sample)")
    r.add_argument(
        "--output", "-o", help="folder or URL for the result (default ./fruitdask-output)"
    )
    r.add_argument("--overwrite", action="store_true", help="replace an existing output")
    r.add_argument("--resume", action="store_true", help="finish an interrupted run")
    r.add_argument("--partition-size", type=int, help="images per task (default 1000)")
    r.add_argument("--n-components", type=int, help="PCA components, 1-32 (default 20)")
    r.add_argument("--pca", choices=("incremental", "exact"), help="PCA fit (default incremental)")
    r.add_argument("--pca-batch-size", type=int, help="IncrementalPCA rows per batch")
    r.add_argument(
        "--pca-sample",
        type=int,
        help="descriptors IncrementalPCA is fitted on, a uniform sample (0 = all; default 131072)",
    )
    r.add_argument(
        "--no-descriptors", action="store_true", help="do not keep the raw descriptors/ table"
    )
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(r)
    add_orb_arguments(r)
    add_cluster_arguments(r)
    r.set_defaults(func=cmd_run)
    extensions = [
        importlib.import_module(name)
        for name in _EXTENSIONS
        if importlib.util.find_spec(name) is not None
    ]
    for ext in extensions:  # e.g. the EC2 options of `run` (dest prefixed ec2_)
        if hasattr(ext, "add_run_arguments"):
            ext.add_run_arguments(r)

    pk = sub.add_parser(
        "pack",
        help="pack a tree of small images into Parquet shards of image bytes",
        description="Pack the images under SRC into a few Parquet shards under DST (local or "
        "S3, S3 to S3 included). `run --input DST` reads the shards transparently. An "
        "interrupted pack resumes when run again.",
    )
    pk.add_argument("src", help="folder or URL of images")
    pk.add_argument("dst", help="folder or URL for the shards")
    pk.add_argument("--shard-size", type=int, default=5000, help="images per shard (5000)")
    pk.add_argument(
        "--row-group-size", type=int, default=250, help="images per Parquet row group (250)"
    )
    pk.add_argument("--overwrite", action="store_true", help="replace what DST holds")
    pk.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_storage_arguments(pk)
    add_cluster_arguments(pk)
    pk.set_defaults(func=cmd_pack, report=None)

    s = sub.add_parser("sample", help="generate a Fruits-360-like sample data set")
    s.add_argument("out_dir", help="folder to create")
    s.add_argument("--classes", type=int, default=None, help="number of classes, 1-131")
    s.add_argument("--per-class", type=int, default=None, help="Training images per class")
    s.add_argument("--total", type=int, default=None, help="total images, split like Fruits-360")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--workers", type=int, default=None, help="processes (default: cores)")
    s.set_defaults(func=cmd_sample)

    for ext in extensions:
        ext.register(sub)
    return parser


# ---------------------------------------------------------------- run
def _sample_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fruitdask")


def ensure_default_sample(quiet: bool = False) -> str:
    """Generate (once) the embedded sample data set and return its folder."""
    from fruitdask import sample
    from fruitdask.config import config_get

    classes = int(config_get("sample.classes"))
    per_class = int(config_get("sample.per-class"))
    seed = int(config_get("sample.seed"))
    path = os.path.join(_sample_dir(), f"sample-c{classes}-n{per_class}-s{seed}")
    if not quiet:
        print(f"input: generated sample data set ({classes} classes) in {path}", flush=True)
    sample.generate(path, classes=classes, per_class=per_class, seed=seed)
    return path


class _ProgressPrinter:
    """One updating line on a terminal; a line every few seconds otherwise."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int, items: int) -> None:
        now = time.perf_counter()
        final = done == total
        if not self.tty and not final and now - self.last < 2.0:
            return
        self.last = now
        rate = items / max(now - self.t0, 1e-9)
        unit = "images" if stage in ("extract", "pack") else "descriptors"
        line = f"{stage}: {done}/{total} partitions, {items:,} {unit} ({rate:,.0f}/s)"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        if final:
            self.t0 = time.perf_counter()


def _display_url(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _print_summary(summary, args) -> None:
    if args.json:
        out = {
            "output": summary.output,
            "run_id": summary.run_id,
            "images": summary.images,
            "ok": summary.images_ok,
            "no_keypoints": summary.images_no_keypoints,
            "error": summary.images_error,
            "descriptors": summary.descriptors,
            "partitions": summary.partitions,
            "partitions_resumed": summary.partitions_resumed,
            "timings": summary.timings,
            "images_per_s": round(summary.images_per_s, 1),
            "pca": summary.pca,
        }
        print(json.dumps(out))
        return
    t = summary.timings
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in t.items())
    print(
        f"images: {summary.images:,} ({summary.images_ok:,} ok, "
        f"{summary.images_no_keypoints:,} no keypoints, {summary.images_error:,} failed)\n"
        f"descriptors: {summary.descriptors:,} in {summary.partitions} partitions"
        + (f" ({summary.partitions_resumed} resumed)" if summary.partitions_resumed else "")
        + f"\nstages: {stages}\n"
        f"throughput: {summary.images_per_s:,.0f} images/s (start-up excluded)\n"
        f"pca: {summary.pca.get('method')}, {summary.pca.get('n_components')} components "
        f"fitted on {summary.pca.get('fitted_on_rows', 0):,} descriptors, explained variance "
        f"{summary.pca.get('explained_variance_ratio', 0):.4f} of all descriptors "
        f"(exact {summary.pca.get('exact_explained_variance_ratio', 0):.4f}, "
        f"max angle to exact {summary.pca.get('max_principal_angle_to_exact_deg', 0):.2f} deg)\n"
        f"output: {_display_url(summary.output)}"
    )


def build_run_config(args: argparse.Namespace):
    from fruitdask.config import RunConfig

    for name in ("partition_size", "nfeatures", "nlevels", "max_pixels", "pca_batch_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name, None))
    so = storage_options_from_args(args)
    try:
        return RunConfig.from_config(
            input=args.input,
            output=args.output,
            storage_options=so,
            partition_size=args.partition_size,
            pca_method=args.pca,
            n_components=args.n_components,
            pca_batch_size=args.pca_batch_size,
            pca_sample=args.pca_sample,
            write_descriptors=False if args.no_descriptors else None,
            overwrite=args.overwrite,
            resume=args.resume,
            nfeatures=args.nfeatures,
            scale_factor=args.scale_factor,
            nlevels=args.nlevels,
            edge_threshold=args.edge_threshold,
            fast_threshold=args.fast_threshold,
            max_pixels=args.max_pixels,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cluster_spec(args: argparse.Namespace):
    from fruitdask.cluster import ClusterSpec

    try:
        return ClusterSpec(
            kind=args.cluster or "local",
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            memory_limit=args.memory_limit,
            host=args.host,
            dashboard_address=args.dashboard_address,
            extra={k: v for k, v in vars(args).items() if k.startswith("ec2_") and v is not None},
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from fruitdask import pipeline
    from fruitdask.cluster import connect, dashboard_link

    spec = cluster_spec(args)
    stray = sorted(k for k, v in spec.extra.items() if v)
    if stray and spec.kind != "ec2":
        flags = ", ".join("--" + k.removeprefix("ec2_").replace("_", "-") for k in stray)
        raise UsageError(f"{flags}: only with --cluster ec2")
    if spec.kind == "ec2" and getattr(args, "ec2_dry_run", False):
        from fruitdask.aws.ec2 import describe_plan  # fruitdask[aws]

        print(describe_plan(spec))  # what would be created; no AWS call
        return 0
    if args.input is None:
        args.input = ensure_default_sample(args.quiet)
    cfg = build_run_config(args)
    if args.report:
        from fruitdask.io import StorageError, check_local_folder

        try:
            check_local_folder(os.path.dirname(os.path.abspath(args.report)))
        except StorageError as exc:
            raise UsageError(f"--report {args.report}: {exc}") from None
    # Validate the input before starting a cluster: a bad URL costs no start-up.
    t = time.perf_counter()
    listing = pipeline.list_input(cfg)
    listing_s = time.perf_counter() - t
    if not args.quiet:
        print(f"input: {cfg.input} ({len(listing):,} images, {listing['label'].nunique()} labels)")
    pipeline.preload(cfg.pca_method, wait=False)  # client imports overlap the cluster start
    with connect(spec) as (client, startup):
        link = dashboard_link(client)
        if link and not args.quiet:
            print(f"Dask dashboard: {link}", flush=True)
        report: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if args.report:
            from distributed import performance_report

            report = performance_report(filename=args.report)
        progress = None if args.quiet else _ProgressPrinter()
        with report:
            summary = pipeline.run(
                cfg,
                client,
                progress=progress,
                listing=listing,
                startup_seconds=startup,
                listing_seconds=listing_s,
            )
    if summary.already_complete:
        print(f"{cfg.output}: already complete, nothing to resume")
        return 0
    _print_summary(summary, args)
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from fruitdask import pack
    from fruitdask.cluster import connect, dashboard_link

    _positive("--shard-size", args.shard_size)
    _positive("--row-group-size", args.row_group_size)
    so = storage_options_from_args(args)
    spec = cluster_spec(args)
    with connect(spec) as (client, _):
        link = dashboard_link(client)
        if link and not args.quiet:
            print(f"Dask dashboard: {link}", flush=True)
        s = pack.pack(
            args.src,
            args.dst,
            client,
            so,
            shard_size=args.shard_size,
            row_group_size=args.row_group_size,
            overwrite=args.overwrite,
            progress=None if args.quiet else _ProgressPrinter(),
        )
    if s.already_complete:
        print(f"{args.dst}: already a pack of {args.src}, nothing to do")
        return 0
    print(
        f"packed {s.images:,} images into {s.shards} shards ({s.bytes / 1e6:,.1f} MB"
        + (f", {s.shards_resumed} resumed" if s.shards_resumed else "")
        + (f", {s.unreadable} unreadable" if s.unreadable else "")
        + f") in {s.seconds:.1f}s: {_display_url(args.dst)}"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from fruitdask import sample
    from fruitdask.config import config_get

    classes = args.classes if args.classes is not None else 131
    seed = args.seed if args.seed is not None else int(config_get("sample.seed"))
    _positive("--classes", classes)
    _positive("--per-class", args.per_class)
    _positive("--total", args.total)
    try:
        if args.total is not None:
            s = sample.generate_total(
                args.out_dir, args.total, classes=classes, seed=seed, workers=args.workers
            )
        else:
            per_class = args.per_class or int(config_get("sample.per-class"))
            s = sample.generate(
                args.out_dir, classes=classes, per_class=per_class, seed=seed, workers=args.workers
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(
        f"{s.root}: {s.training + s.test:,} images ({s.training:,} Training, {s.test:,} Test) "
        f"in {s.classes} classes, {s.seconds:.1f}s"
    )
    return 0


# ---------------------------------------------------------------- entry point
def _on_sigterm(signum, frame):
    raise _Terminated()


def _known_errors() -> tuple[type[BaseException], ...]:
    from fruitdask.cluster import ClusterError
    from fruitdask.io import StorageError
    from fruitdask.pack import PackExistsError
    from fruitdask.pipeline import OutputExistsError

    errs: list[type[BaseException]] = [
        UsageError,
        PackExistsError,
        StorageError,
        OutputExistsError,
        ClusterError,
        FileExistsError,
    ]
    return tuple(errs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except _known_errors() as exc:
        print(f"fruitdask: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "fruitdask: interrupted; no _SUCCESS written (use --resume to finish)", file=sys.stderr
        )
        return 130
    except _Terminated:
        print(
            "fruitdask: terminated; no _SUCCESS written (use --resume to finish)", file=sys.stderr
        )
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def console_main() -> NoReturn:
    """``python -m fruitdask`` / the ``fruitdask`` script: :func:`main`, then exit at once.

    By the time :func:`main` returns, every command has closed what it opened
    (clusters, files, output) and printed its result; what is left is the
    interpreter's own teardown of the ~3,000 modules a run imports (dask-ml,
    sklearn, scipy, bokeh), which takes ~1 s on 2 cores and changes nothing.
    """
    import logging

    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
