"""What every command shares: argument groups built from the settings'
dataclasses, the streams (result on stdout, notes on stderr, noise to a log
file), the progress printer, and the supervisor that turns signals into a
clean stop."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any, NoReturn, TextIO, TypeVar

from fruitdask.cancel import StopToken
from fruitdask.config import (
    ClusterSpec,
    OrbSettings,
    RunConfig,
    SampleSpec,
    config_fields,
    describe,
    flag_of,
)
from fruitdask.errors import Cancelled, FruitdaskError, InputError

__all__ = [
    "EXIT_USAGE",
    "Parser",
    "ProgressPrinter",
    "Supervisor",
    "Terminal",
    "add_cluster_arguments",
    "add_orb_arguments",
    "add_run_settings",
    "add_storage_arguments",
    "build_run_config",
    "cluster_spec",
    "display_url",
    "ensure_default_sample",
    "open_cluster",
    "positive",
    "storage_options_from_args",
    "term",
]

EXIT_USAGE = 2
T = TypeVar("T")


class _Help(argparse.HelpFormatter):
    """Shows an option's default unless its help already says it, or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "(default" in text or default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and defaults shown in help texts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def _print_message(self, message: str, file: Any = None) -> None:
        # help to the terminal's stdout, errors to its stderr (sys.stdout and
        # sys.stderr may point at the log file: Terminal.redirect)
        if message:
            (term.out if file is sys.stdout else term.err).write(message)


# ---------------------------------------------------------------- streams
class Terminal:
    """Where a command's words go: ``out`` the result, ``err`` progress and notes.

    :func:`redirect` points the process's own file descriptors 1 and 2 (and
    so every child process: workers, the JVM) at a log file; only what is
    written to ``out`` and ``err`` reaches the terminal.
    """

    def __init__(self) -> None:
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self.log_path: str | None = None

    def redirect(self, log_path: str) -> None:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        out_fd, err_fd = os.dup(1), os.dup(2)
        self.out = os.fdopen(out_fd, "w", buffering=1, encoding="utf-8", errors="replace")
        self.err = os.fdopen(err_fd, "w", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self.log_path = log_path
        logging.basicConfig(
            stream=sys.stderr,
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )

    def say(self, line: str) -> None:
        """A note for the person watching (stderr)."""
        self.err.write(line + "\n")
        self.err.flush()

    def result(self, text: str) -> None:
        """The command's result (stdout)."""
        self.out.write(text + "\n")
        self.out.flush()


#: The streams of the running command (replaced by ``console_main``).
term = Terminal()


def log_file() -> str:
    """A fresh log file path under ``~/.cache/fruitdask/logs`` (the last 20 are kept)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "fruitdask", "logs")
    with contextlib.suppress(OSError):
        old = sorted(os.listdir(folder))
        for name in old[:-19]:
            os.remove(os.path.join(folder, name))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(folder, f"fruitdask-{stamp}-{os.getpid()}.log")


def display_url(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


# ---------------------------------------------------------------- arguments
def positive(name: str, value: float | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"{name} must be >= 1, got {value}")


def _add_fields(group, cls: type, only: tuple[str, ...] | None = None, **overrides: Any) -> None:
    """One option per :func:`fruitdask.config.setting` field of ``cls``."""
    for f, _ in config_fields(cls):
        if only is not None and f.name not in only:
            continue
        m = f.metadata
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": describe(cls, f)}
        if m["kind"] is bool:
            continue
        if m["choices"]:
            kw["choices"] = m["choices"]
        elif m["kind"] in (int, float):
            kw["type"] = _number(m["kind"], flag_of(cls, f))
            kw["metavar"] = "N" if m["kind"] is int else "X"
        else:
            kw["metavar"] = f.name.split("_")[-1].upper()
        kw.update(overrides.get(f.name, {}))
        group.add_argument(flag_of(cls, f), **kw)


def _number(kind: type, flag: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def add_storage_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage (fsspec; AWS_* environment variables are honoured)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    g.add_argument("--anon", action="store_true", help="anonymous S3 access")
    g.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="extra fsspec storage option (repeatable; VALUE parsed as JSON when it can be); "
        "s3_client=s3fs reads S3 with s3fs instead of pyarrow",
    )


def add_orb_arguments(p: argparse.ArgumentParser) -> None:
    _add_fields(p.add_argument_group("ORB"), OrbSettings)


def add_run_settings(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """The PCA and partitioning options of ``run`` (all, or ``only`` these fields)."""
    names = ("partition_size", "pca_method", "n_components", "pca_batch_size", "pca_sample")
    _add_fields(p, RunConfig, only or names)


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    _add_fields(g, ClusterSpec)
    g.add_argument(
        "--report",
        metavar="FILE.html",
        help="also save Dask's performance report of the run (works offline)",
    )


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def storage_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """fsspec storage options from ``--endpoint-url``, ``--anon``, ``--storage-option``."""
    so: dict[str, Any] = {}
    for item in args.storage_option or []:
        if "=" not in item:
            raise InputError(f"--storage-option expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        so[key.strip()] = _parse_value(value)
    if args.endpoint_url:
        so["endpoint_url"] = args.endpoint_url
    if args.anon:
        so["anon"] = True
    return so


def build_run_config(args: argparse.Namespace, **fixed: Any) -> RunConfig:
    """A :class:`RunConfig` from a parsed command line (unset options from dask.config)."""
    orb = {f.name: getattr(args, f.name, None) for f in fields(OrbSettings)}
    given = {
        "input": args.input,
        "output": getattr(args, "output", None),
        "storage_options": storage_options_from_args(args),
        "partition_size": getattr(args, "partition_size", None),
        "pca_method": getattr(args, "pca_method", None),
        "n_components": getattr(args, "n_components", None),
        "pca_batch_size": getattr(args, "pca_batch_size", None),
        "pca_sample": getattr(args, "pca_sample", None),
        "write_descriptors": False if getattr(args, "no_descriptors", False) else None,
        "overwrite": getattr(args, "overwrite", False),
        "resume": getattr(args, "resume", False),
    }
    return RunConfig.from_config(**{**given, **fixed}, **orb)


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    given = {f.name: getattr(args, f.name, None) for f, _ in config_fields(ClusterSpec)}
    extra = {k: v for k, v in vars(args).items() if k.startswith("ec2_") and v}
    spec = ClusterSpec.from_config(**given, extra=extra)
    if extra and spec.kind != "ec2":
        flags = ", ".join("--" + k.removeprefix("ec2_").replace("_", "-") for k in sorted(extra))
        raise InputError(f"{flags}: only with --cluster ec2")
    if spec.kind == "local":
        from fruitdask.cluster import check_local

        spec = check_local(spec)
    elif "://" in spec.kind:
        from fruitdask.cluster import check_scheduler

        check_scheduler(spec.kind)
    return spec


@contextlib.contextmanager
def open_cluster(spec: ClusterSpec, stop: StopToken) -> Iterator[tuple[Any, float]]:
    """``(client, startup_seconds)`` for ``spec``: local, a scheduler, or EC2."""
    if spec.kind == "ec2":
        from distributed import Client

        from fruitdask.aws.ec2 import ec2_cluster  # fruitdask[aws]

        t0 = time.perf_counter()
        with ec2_cluster(spec) as cluster, Client(cluster) as client:
            yield client, time.perf_counter() - t0
        return
    from fruitdask.cluster import connect, exposure

    warning = exposure(spec) if spec.kind == "local" else None
    if warning:
        term.say(warning)
    with connect(spec) as (client, startup):
        # a stop during start-up: leave before any work is submitted
        stop.on_stop(lambda: client.close(timeout=2))
        stop.check()
        yield client, startup


def ensure_default_sample(quiet: bool = False) -> str:
    """Generate (once) the embedded sample data set and return its folder."""
    from fruitdask import sample

    spec = SampleSpec.from_config()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "fruitdask", f"sample-c{spec.classes}-n{spec.per_class}-s{spec.seed}")
    if not quiet:
        term.say(f"input: generated sample data set ({spec.classes} classes) in {path}")
    sample.generate(path, classes=spec.classes, per_class=spec.per_class, seed=spec.seed)
    return path


# ---------------------------------------------------------------- progress
class ProgressPrinter:
    """One updating line on a terminal; a line every few seconds otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or term.err
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int, items: int) -> None:
        now = time.perf_counter()
        final = done == total
        if not self.tty and not final and now - self.last < 2.0:
            return
        self.last = now
        rate = items / max(now - self.t0, 1e-9)
        unit = "images" if stage in ("extract", "pack", "encode") else "descriptors"
        line = f"{stage}: {done}/{total} partitions, {items:,} {unit} ({rate:,.0f}/s)"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        if final:
            self.t0 = time.perf_counter()


# ---------------------------------------------------------------- signals
class Supervisor:
    """Run a command's body in a thread, and turn SIGINT/SIGTERM into a clean stop.

    The handlers only record the signal (:meth:`StopToken.request`); this
    thread then fires the body's cancel callbacks and waits for it to stop.
    The outcome it reports is the truth: a body that committed before the
    stop returns normally (:attr:`StopToken.committed`), one that did not
    raises :class:`Cancelled`.
    """

    #: Seconds a stopped body gets to cancel its work and close its cluster.
    GRACE = 20.0

    def __init__(self) -> None:
        self.stop = StopToken()

    def run(self, body: Callable[[StopToken], T]) -> T:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = body(self.stop)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                box["error"] = exc

        def handler(signum: int, frame: Any) -> None:
            self.stop.request(signum)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        thread = threading.Thread(target=target, name="fruitdask-run", daemon=True)
        try:
            thread.start()
            deadline = None
            while thread.is_alive():
                thread.join(0.1)
                if self.stop.requested and deadline is None:
                    self.stop.fire()
                    deadline = time.monotonic() + self.GRACE
                if deadline is not None and time.monotonic() > deadline:
                    break
            self.stop.close()  # from here on nothing can commit
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if "value" in box:
            return box["value"]
        error = box.get("error")
        if self.stop.requested and not isinstance(error, FruitdaskError | None):
            error = None  # whatever a cancelled future raised: it is the stop
        if self.stop.requested and (error is None or isinstance(error, Cancelled)):
            raise Cancelled(self.stop.signum)
        if error is None:  # pragma: no cover - the thread always leaves one
            raise Cancelled(self.stop.signum)
        raise error
