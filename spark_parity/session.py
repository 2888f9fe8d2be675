"""Get a SparkSession: check Java and pyspark first, so a missing one is one line.

pyspark is an optional dependency (``pip install fruitdask[spark]``) and needs a
Java 17+ runtime. Both are checked here, before any JVM is launched, because
pyspark's own failure is a Py4J traceback ending in ``JAVA_GATEWAY_EXITED``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fruitdask.cancel import StopToken
from fruitdask.errors import InputError

__all__ = [
    "MIN_JAVA",
    "SparkSpec",
    "SparkUnavailable",
    "build_cds_archive",
    "cds_archive_path",
    "find_java",
    "import_pyspark",
    "java_major",
    "parse_master",
    "quiet_pandas_warning",
    "start",
    "ui_url",
]

#: Spark 4 runs on Java 17 and 21.
MIN_JAVA = 17

_JAVA_HINT = (
    f"Spark needs Java {MIN_JAVA}+ (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
)


class SparkUnavailable(InputError):
    """pyspark or a suitable Java is missing, or the Spark driver could not start."""


@dataclass(frozen=True)
class SparkSpec:
    """Where and how to start Spark.

    Attributes
    ----------
    master : str
        ``local[N]``, ``local[*]``, ``spark://...`` or ``yarn``; ``local[N]`` with
        N the number of cores when None.
    driver_memory : str, optional
        ``spark.driver.memory`` (in local mode the executors live in the driver JVM).
    conf : dict
        Extra Spark settings, applied last (they win).
    event_log : str, optional
        A folder for Spark's event log, which the history server reads.
    java_options : tuple of str
        Extra options for the driver JVM (in local mode the only JVM).
    fast_start : bool
        Only the C1 JIT compiler (``-XX:TieredStopAtLevel=1``): in a job where
        the JVM schedules and moves bytes while Python does the work, C2's
        compiles cost more than they save (measured on 2 cores, 20,000 images:
        a quarter less CPU in all, start-up 16 s -> 13 s).
    cds : bool
        Map Spark's classes from the class-data-sharing archive of
        :func:`build_cds_archive`, when there is one (start-up 12 s -> 6 s).
    """

    master: str | None = None
    driver_memory: str | None = None
    conf: dict[str, str] = field(default_factory=dict)
    event_log: str | None = None
    java_options: tuple[str, ...] = ()
    fast_start: bool = False
    cds: bool = False
    app_name: str = "fruitdask-spark-parity"

    def resolved_master(self) -> str:
        return self.master or f"local[{os.cpu_count() or 1}]"


_MASTER = re.compile(r"^local(\[(\*|\d+)(,\s*\d+)?\])?$")


def parse_master(master: str) -> int | None:
    """Cores of a ``local`` master (None for a cluster master); ValueError when malformed."""
    m = _MASTER.match(master.strip())
    if m is None:
        if master.startswith(("spark://", "yarn", "k8s://", "mesos://")):
            return None
        raise ValueError(
            f"master must be local, local[N], local[*], spark://host:port or yarn, got {master!r}"
        )
    n = m.group(2)
    if n is None:
        return 1
    if n == "*":
        return os.cpu_count() or 1
    if int(n) < 1:
        raise ValueError(f"master {master!r}: needs at least one core")
    return int(n)


def import_pyspark():
    """Import pyspark, or raise SparkUnavailable with the install hint."""
    try:
        with warnings.catch_warnings():
            # pyspark 4.x warns on pandas >= 3 at import; the job does not use the
            # pandas-on-Spark API it is about.
            warnings.simplefilter("ignore", FutureWarning)
            import pyspark
            import pyspark.sql
    except ImportError as exc:
        raise SparkUnavailable(
            f"pyspark is not installed ({exc}): pip install fruitdask[spark]"
        ) from None
    return pyspark


def java_major(version_text: str) -> int | None:
    """Major version from ``java -version`` output (``"1.8.0_292"`` is 8, ``"17.0.15"`` 17)."""
    m = re.search(r'version "(\d+)(?:\.(\d+))?', version_text)
    if m is None:
        return None
    major = int(m.group(1))
    if major == 1 and m.group(2) is not None:
        return int(m.group(2))
    return major


def find_java() -> tuple[str, int]:
    """The ``java`` Spark's launcher will run, and its major version.

    Resolved as ``bin/spark-class`` does: ``$JAVA_HOME/bin/java`` when JAVA_HOME
    is set, otherwise ``java`` on the PATH.

    Raises
    ------
    SparkUnavailable
        No java, one that does not run, or one older than :data:`MIN_JAVA`.
    """
    home = os.environ.get("JAVA_HOME")
    if home:
        exe = os.path.join(home, "bin", "java")
        if not os.access(exe, os.X_OK):
            raise SparkUnavailable(f"JAVA_HOME={home} has no bin/java; {_JAVA_HINT}")
    else:
        found = shutil.which("java")
        if found is None:
            raise SparkUnavailable(f"java not found (JAVA_HOME unset, none on PATH); {_JAVA_HINT}")
        exe = found
    text = _java_version(exe)
    major = java_major(text or "")
    if text is None or major is None:
        raise SparkUnavailable(f"{exe} -version failed; {_JAVA_HINT}")
    if major < MIN_JAVA:
        raise SparkUnavailable(f"{exe} is Java {major}; {_JAVA_HINT}")
    return exe, major


@functools.cache
def _java_version(exe: str) -> str | None:
    try:
        proc = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SparkUnavailable(f"{exe} does not run ({exc}); {_JAVA_HINT}") from None
    return proc.stderr + proc.stdout if proc.returncode == 0 else None


# ---------------------------------------------------------------- class-data sharing
def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fruitdask" / "spark-cds"


def cds_archive_path() -> Path:
    """Where the class-data-sharing archive for this pyspark + Java lives.

    The name hashes the pyspark version, where its jars are and which, and the
    exact Java build: an archive from another JVM, venv or classpath is never
    used (a mismatched or
    truncated archive can crash the JVM, so it is only ever renamed into place
    whole, by :func:`build_cds_archive`).
    """
    import pyspark

    exe, _ = find_java()
    jars_dir = os.path.realpath(os.path.join(os.path.dirname(pyspark.__file__), "jars"))
    jars = sorted(os.listdir(jars_dir))
    key = json.dumps(
        [pyspark.__version__, os.path.realpath(exe), _java_version(exe), jars_dir, jars]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return _cache_dir() / f"spark-{pyspark.__version__}-{digest}.jsa"


def _wait_for_session(sid: int, deadline: float) -> None:
    """Wait until every process of session ``sid`` (the JVM a run left) has
    exited; on the deadline kill them and raise ``TimeoutExpired``."""
    import psutil

    members = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid:
                members.append(p)
    _, alive = psutil.wait_procs(members, timeout=max(0.0, deadline - time.monotonic()))
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if alive:
        raise subprocess.TimeoutExpired(f"session {sid}", 0)


def _remove_stale_partials(target: Path) -> None:
    """Archives half-written by builds whose process is gone (~200 MB each)."""
    import psutil

    for old in target.parent.glob(f"{target.stem}.*.partial"):
        pid = old.name[len(target.stem) + 1 :].split("-", 1)[0]
        if not pid.isdigit() or not psutil.pid_exists(int(pid)):
            old.unlink(missing_ok=True)


def build_cds_archive(timeout: float = 600) -> Path:
    """Write the class-data-sharing archive :class:`SparkSpec` ``fast_start`` uses.

    Runs the tuned job once on a few generated images in a subprocess whose JVM
    dumps every class it loaded (``-XX:ArchiveClassesAtExit``, JDK 13+) when it
    exits; the archive (~200 MB) is renamed into place only after that JVM is
    gone. Later JVMs map Spark's classes from it instead of searching ~250 jars
    for each (class loading was most of the start-up CPU). Idempotent.

    Raises
    ------
    SparkUnavailable
        No usable Java, or the run failed.
    """
    import sys

    from fruitdask import sample

    target = cds_archive_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    partial = target.with_name(f"{target.stem}.{os.getpid()}-{uuid.uuid4().hex[:6]}.partial")
    with tempfile.TemporaryDirectory(prefix="fruitdask-cds-") as tmp:
        sample.generate(os.path.join(tmp, "in"), classes=2, per_class=20, seed=0, workers=1)
        cmd = [sys.executable, "-m", "spark_parity", "run", "--input", os.path.join(tmp, "in"),
               "--output", os.path.join(tmp, "out"), "--master", "local[2]", "--quiet",
               "--no-cds", f"--java-option=-XX:ArchiveClassesAtExit={partial}"]  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            # In a session of its own: the JVM outlives the Python process (it
            # exits when the gateway's pipe closes, and then writes the archive),
            # and its output goes to the log file, not to our pipes.
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True) as proc:  # fmt: skip
                try:
                    _, stderr = proc.communicate(timeout=timeout)
                finally:
                    _wait_for_session(proc.pid, deadline)
        except subprocess.TimeoutExpired:
            partial.unlink(missing_ok=True)
            raise SparkUnavailable(f"building {target} took more than {timeout:.0f}s") from None
    if proc.returncode != 0 or not partial.exists() or partial.stat().st_size == 0:
        partial.unlink(missing_ok=True)
        tail = (stderr.strip().splitlines() or ["no archive written, no error printed"])[-1]
        raise SparkUnavailable(f"could not build the class-data-sharing archive: {tail}")
    os.replace(partial, target)
    return target


# Spark logs INFO to the console by default; warnings and errors are enough.
# Task failures are logged by the executor with a full Python traceback and then
# re-raised in the driver, where the job turns them into one line: keep only that.
_LOG4J = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n%ex
logger.hadoop.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop.level = error
logger.executor.name = org.apache.spark.executor.Executor
logger.executor.level = off
logger.tsm.name = org.apache.spark.scheduler.TaskSetManager
logger.tsm.level = off
logger.pyrunner.name = org.apache.spark.api.python.PythonRunner
logger.pyrunner.level = off
logger.blocks.name = org.apache.spark.storage.BlockManager
logger.blocks.level = error
"""


def _log4j_file() -> str:
    path = os.path.join(tempfile.gettempdir(), f"fruitdask-spark-log4j2-{os.getuid()}.properties")
    if not os.path.exists(path) or open(path).read() != _LOG4J:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(_LOG4J)
        os.replace(tmp, path)
    return path


def _java_options(spec: SparkSpec) -> str:
    opts = [
        f"-Dlog4j2.configurationFile=file:{_log4j_file()}",
        # a JVM crash report goes to the temp folder, not the current directory
        f"-XX:ErrorFile={tempfile.gettempdir()}/fruitdask-spark-hs_err_pid%p.log",
    ]
    if spec.fast_start:
        opts.append("-XX:TieredStopAtLevel=1")
    archive = _usable_archive(spec)
    if archive is not None:
        opts.append(f"-XX:SharedArchiveFile={archive}")
    opts.extend(spec.java_options)
    return " ".join(opts)


def _usable_archive(spec: SparkSpec) -> Path | None:
    """The CDS archive a local driver starts with, if asked for and built.
    Never on a cluster master: an EMR node's Spark has its jars elsewhere
    than pyspark's package, and its JVMs were not the ones the archive was made
    from."""
    if not spec.cds or parse_master(spec.resolved_master()) is None:
        return None
    try:
        path = cds_archive_path()
    except (OSError, SparkUnavailable):  # no jars folder; no Java to ask
        return None
    return path if path.exists() else None


def _builder_conf(spec: SparkSpec) -> dict[str, str]:
    conf: dict[str, Any] = {
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.driver.extraJavaOptions": _java_options(spec),
        # One Python worker per core, reused across tasks: the modules the job
        # imports (OpenCV, pyarrow) are loaded once per worker, not per task.
        "spark.python.worker.reuse": "true",
        # The warm-up's 32-element array expression would log a "truncated plan" warning.
        "spark.sql.debug.maxToStringFields": "100",
    }
    if parse_master(spec.resolved_master()) is not None:
        # A local master: bind the driver, its block manager and the UI to
        # loopback (the Dask side does the same; the UI has no authentication).
        # On a cluster the executors must reach the driver, so Spark's own
        # choice (the host's address) stands.
        conf["spark.driver.host"] = "127.0.0.1"
        conf["spark.driver.bindAddress"] = "127.0.0.1"
    if spec.driver_memory:
        conf["spark.driver.memory"] = spec.driver_memory
    if spec.event_log:
        conf["spark.eventLog.enabled"] = "true"
        conf["spark.eventLog.dir"] = spec.event_log
    conf.update(spec.conf)
    return {k: str(v) for k, v in conf.items()}


# Imported once in each Python worker at start-up, so the first partition does
# not pay ~0.5 s of imports inside the timed extraction (cf. fruitdask.cluster).
_WARM_MODULES = ("cv2", "pyarrow.parquet", "fruitdask.tables", "fruitdask.source")


def _warm(batches):
    import importlib

    import pyarrow as pa

    for name in _WARM_MODULES:
        importlib.import_module(name)
    n = sum(b.num_rows for b in batches)
    yield pa.RecordBatch.from_pydict({"n": pa.array([n], pa.int64())})


def _warm_ml(spark) -> None:
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    x = F.array(*[((F.col("id") * (i + 3)) % 11).cast("float") for i in range(32)])
    df = spark.range(0, 64, 1, 1).select(array_to_vector(x).alias("v"))
    PCA(k=2, inputCol="v").fit(df)


def warm_up(spark, cores: int) -> None:
    """Start one Python worker per core and import the job's modules in it; load
    Spark ML's classes (the first PCA fit of a JVM costs ~3 s more than the next).

    Both are start-up costs of any job, as the Dask side's imports on its workers.
    """
    ml = threading.Thread(target=_warm_ml, args=(spark,), daemon=True)
    ml.start()  # JVM-side; overlaps the Python workers' imports
    spark.range(0, cores, 1, cores).mapInArrow(_warm, "n long").collect()
    ml.join()


@contextlib.contextmanager
def start(spec: SparkSpec, stop: StopToken | None = None) -> Iterator[tuple[Any, float]]:
    """Yield ``(spark, startup_seconds)``; the session is stopped on exit, error or Ctrl-C.

    A stop request (``stop``) during the start-up ends it: the JVM being
    launched is killed, the warm-up's jobs are cancelled, and
    :class:`~fruitdask.errors.Cancelled` is raised.

    Raises
    ------
    SparkUnavailable
        pyspark or Java is missing, or the JVM did not start.
    """
    t0 = time.perf_counter()
    stop = stop or StopToken()
    stop.check()
    import_pyspark()
    find_java()
    master = spec.resolved_master()
    cores = parse_master(master)
    from pyspark.sql import SparkSession

    # The driver and the local executors bind to loopback (SPARK_LOCAL_IP is read
    # by the launcher before any conf): no "hostname resolves to a loopback" warning.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.master(master).appName(spec.app_name)
    for k, v in _builder_conf(spec).items():
        builder = builder.config(k, v)
    known = _spark_jvms()
    forget = stop.on_stop(lambda: _kill_new_jvms(known))
    try:
        stop.check()  # a stop acted on before the callback was registered
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            spark = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - a Py4J/launcher failure becomes one line
        stop.check()  # the launch was killed by a stop request
        raise SparkUnavailable(f"the Spark driver did not start: {_first_line(exc)}") from None
    finally:
        forget()
    try:
        stop.on_stop(spark.sparkContext.cancelAllJobs)
        stop.check()
        spark.sparkContext.setLogLevel("WARN")
        try:
            with quiet_pandas_warning():
                warm_up(spark, cores or spark.sparkContext.defaultParallelism)
        except Exception:
            stop.check()  # the warm-up's jobs were cancelled
            raise
        stop.check()
        yield spark, time.perf_counter() - t0
    finally:
        with contextlib.suppress(Exception):  # a JVM killed during the start-up
            spark.stop()


def _spark_jvms() -> set[int]:
    """The Spark JVMs this process launched (pyspark runs ``spark-submit``)."""
    import psutil

    found = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("org.apache.spark" in a for a in p.cmdline()):
                found.add(p.pid)
    return found


def _kill_new_jvms(known: set[int]) -> None:
    """Kill the Spark JVM being launched (a stop request during start-up);
    pyspark's launcher then fails at once instead of finishing the start."""
    import psutil

    for pid in _spark_jvms() - known:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


@contextlib.contextmanager
def quiet_pandas_warning() -> Iterator[None]:
    """Silence pyspark 4.x's warning, at every Arrow UDF, that it does not fully
    support pandas >= 3: the job hands Arrow batches, not pandas objects, to Spark."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="PySpark does not yet fully support pandas", category=FutureWarning
        )
        yield


def ui_url(spark) -> str | None:
    """The Spark UI of this session (None when the UI is disabled)."""
    try:
        return spark.sparkContext.uiWebUrl
    except Exception:  # noqa: BLE001 - informational only
        return None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
