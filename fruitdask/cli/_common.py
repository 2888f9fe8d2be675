"""What every command shares: argument groups built from the settings'
dataclasses, the streams (result on stdout, notes on stderr, noise to a log
file), the progress printer, and the supervisor that turns signals into a
clean stop."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import fields, replace
from typing import Any, NoReturn, TextIO, TypeVar

from fruitdask import io
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
    "contacting",
    "display_url",
    "ensure_default_sample",
    "open_cluster",
    "positive",
    "show_dashboard",
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
        self._out: TextIO | None = None
        self._err: TextIO | None = None
        self.log_path: str | None = None

    # Until :meth:`redirect`, the process's streams as they are now (a caller
    # that replaces sys.stdout, like pytest's capsys, sees the output).
    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr

    def redirect(self, log_path: str) -> None:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        out_fd, err_fd = os.dup(1), os.dup(2)
        self._out = os.fdopen(out_fd, "w", buffering=1, encoding="utf-8", errors="replace")
        self._err = os.fdopen(err_fd, "w", buffering=1, encoding="utf-8", errors="replace")
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


def storage_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """fsspec storage options from ``--endpoint-url``, ``--anon``, ``--storage-option``."""
    return io.parse_storage_options(args.storage_option, args.endpoint_url, args.anon)


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


def _data_paths(args: argparse.Namespace) -> dict[str, str | None]:
    """The input and output of a command (``--input``/``--output``, or pack's
    ``src``/``dst``), unset ones as dask.config would fill them."""
    import dask.config

    if hasattr(args, "src"):
        return {"SRC": args.src, "DST": getattr(args, "dst", None)}
    paths: dict[str, str | None] = {"--input": getattr(args, "input", None)}
    if hasattr(args, "output"):
        # a value set in dask.config counts; the packaged local default does not
        packaged = {f.name: f.default for f in fields(RunConfig)}["output"]
        configured = dask.config.get("fruitdask.output", None)
        paths["--output"] = args.output or (configured if configured != packaged else None)
    return paths


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    """The cluster of a command line, checked before anything starts: a local
    cluster's options, and for a remote one (``ec2``, a scheduler on another
    machine) that the input and output are URLs its workers can reach."""
    from fruitdask.cluster import check_local, check_remote_paths, is_remote

    given = {f.name: getattr(args, f.name, None) for f, _ in config_fields(ClusterSpec)}
    extra = {k: v for k, v in vars(args).items() if k.startswith("ec2_") and v}
    spec = ClusterSpec.from_config(**given, extra=extra)
    if extra and spec.kind != "ec2":
        flags = ", ".join("--" + k.removeprefix("ec2_").replace("_", "-") for k in sorted(extra))
        raise InputError(f"{flags}: only with --cluster ec2")
    if spec.kind == "local":
        return check_local(spec)
    if "://" in spec.kind:
        from fruitdask.cluster import check_scheduler

        check_scheduler(spec)
    if is_remote(spec.kind):
        paths = _data_paths(args)
        check_remote_paths(spec.kind, paths)
        if spec.kind == "ec2":
            # what ec2_cluster checks and stages before it creates anything
            urls = list(paths.values())
            data = {"input": urls[0], "output": urls[-1], "storage_options":
                    storage_options_from_args(args)}  # fmt: skip
            spec = replace(spec, extra={**spec.extra, "ec2_data": data})
    return spec


@contextlib.contextmanager
def open_cluster(
    spec: ClusterSpec, stop: StopToken, progress: ProgressPrinter | None = None
) -> Iterator[tuple[Any, float]]:
    """``(client, startup_seconds)`` for ``spec``: local, a scheduler, or EC2;
    its workers' memory watched while it is open (:class:`MemoryWatch`)."""
    from fruitdask.cluster import MemoryWatch

    with _cluster(spec, stop) as (client, startup):
        with MemoryWatch(client, stop, spec.pause_timeout) as watch:
            if progress is not None:
                progress.pressure = watch.note
            yield client, startup


@contextlib.contextmanager
def _cluster(spec: ClusterSpec, stop: StopToken) -> Iterator[tuple[Any, float]]:
    if spec.kind == "ec2":
        from distributed import Client

        from fruitdask.aws.ec2 import ec2_cluster  # fruitdask[aws]
        from fruitdask.cluster import check_versions

        t0 = time.perf_counter()
        with ec2_cluster(spec, stop=stop, say=term.say) as cluster, Client(cluster) as client:
            check_versions(client)
            stop.check()
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


def show_dashboard(client, spec: ClusterSpec, quiet: bool) -> None:
    """The dashboard's address (stderr), and the port actually used when the
    one asked for was busy (distributed then picks another)."""
    from fruitdask.cluster import dashboard_link

    link = dashboard_link(client)
    if not link or quiet:
        return
    term.say(f"Dask dashboard: {link}")
    asked = str(spec.dashboard_address or "").rpartition(":")[2]
    if spec.kind == "local" and asked not in ("", "0") and f":{asked}/" not in link:
        used = link.split("://", 1)[-1].split("/", 1)[0].rpartition(":")[2]
        term.say(f"note: port {asked} was busy; the dashboard is on port {used}")


@contextlib.contextmanager
def contacting(url: str, storage_options: dict[str, Any], after: float = 2.0) -> Iterator[None]:
    """A "contacting ..." line on stderr when listing ``url`` takes longer than
    ``after`` seconds (a slow endpoint), so the user knows what the wait is."""
    done = threading.Event()

    def note() -> None:
        if not done.wait(after):
            where = storage_options.get("endpoint_url") or url
            term.say(f"contacting {where} ... (no answer yet)")

    t = threading.Thread(target=note, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()


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
_UNITS = {"extract": "images", "pack": "images", "encode": "images", "features": "descriptors"}


class ProgressPrinter:
    """Every stage's progress on stderr: live bars (tqdm) on a terminal, plain
    lines otherwise (one per stage start and end, and one every few seconds
    while tasks finish). ``__call__`` takes task progress, :meth:`stage` the
    stage events of :class:`fruitdask.pipeline.Timer`."""

    #: Seconds between plain lines while a stage's tasks finish.
    EVERY = 2.0

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or term.err
        self.tty = self.stream.isatty()
        self.bar: Any = None
        self.bar_stage = ""
        self._pending: threading.Timer | None = None
        #: A short note on the cluster's memory, added to task progress.
        self.pressure: Callable[[], str] | None = None
        self.t0 = time.perf_counter()
        self.last = 0.0

    def stage(self, stage: str, event: str, seconds: float) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if event == "begin":
            self.t0 = time.perf_counter()
            # a line only if the stage lasts: a refusal at once stays one line
            self._pending = threading.Timer(self.EVERY, self._line, (f"{stage}: working ...",))
            self._pending.daemon = True
            self._pending.start()
        else:
            self._close()
            self._line(f"{stage}: done in {seconds:.2f}s")

    def __call__(self, stage: str, done: int, total: int, items: int) -> None:
        unit = _UNITS.get(stage, "items")
        now = time.perf_counter()
        rate = items / max(now - self.t0, 1e-9)
        memory = self.pressure() if self.pressure is not None else ""
        if self.tty:
            self._bar(stage, done, total, f"{items:,} {unit}, {rate:,.0f}/s"
                      + (f", {memory}" if memory else ""))  # fmt: skip
            return
        if done != total and now - self.last < self.EVERY:
            return
        self.last = now
        self._line(f"{stage}: {done}/{total} tasks, {items:,} {unit} ({rate:,.0f}/s)"
                   + (f", {memory}" if memory else ""))  # fmt: skip

    def note(self, line: str) -> None:
        """A line from a stage that has no task counts (e.g. KMeans iterations)."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self._line(line)

    def _bar(self, stage: str, done: int, total: int, postfix: str) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar_stage != stage:
            self._close()
            self.bar = tqdm(total=total, desc=stage, unit="task", file=self.stream, leave=True,
                            dynamic_ncols=True)  # fmt: skip
            self.bar_stage = stage
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(done - self.bar.n)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


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

    def _tell_held(self, told: int) -> int:
        """Say, for each signal that came during a clean-up that must finish
        (recorded by the handler), that it does not skip it."""
        for note in self.stop.requests_during_hold[told:]:
            term.say(f"stopping: {note} (a further signal does not skip it)")
        return len(self.stop.requests_during_hold)

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
            announced, told = False, 0
            while thread.is_alive():
                thread.join(0.1)
                if self.stop.requested and deadline is None:
                    self.stop.fire()
                    deadline = time.monotonic() + self.GRACE
                held = self.stop.held
                if held and self.stop.requested and not announced:
                    term.say(f"stopping: {held}")  # cloud instances going: say so, and wait
                    announced = True
                told = self._tell_held(told)
                if deadline is not None and time.monotonic() > deadline and not held:
                    break
            self._tell_held(told)
            self.stop.close()  # from here on nothing can commit
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if "value" in box:
            if self.stop.requested:
                name = signal.Signals(self.stop.signum).name if self.stop.signum else "a stop"
                term.say(f"note: {name} arrived after the result was committed; nothing was lost")
            return box["value"]
        error = box.get("error")
        if self.stop.requested and not isinstance(error, FruitdaskError | None):
            error = None  # whatever a cancelled future raised: it is the stop
        if self.stop.requested and (error is None or isinstance(error, Cancelled)):
            raise self.stop.error or Cancelled(self.stop.signum)
        if error is None:  # pragma: no cover - the thread always leaves one
            raise Cancelled(self.stop.signum)
        raise error
