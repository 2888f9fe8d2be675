"""`fruitdask.testing.LatencyProxy`: a real store's latency in front of SeaweedFS.

Times are asserted as lower bounds only (the proxy must add at least what it
is told to), except where the point is overlap: there the bound is several
times what a slow machine needs. Nothing waits with ``sleep()``: every wait
is on a response, a thread or a socket.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import psutil
import pytest

from fruitdask import io
from fruitdask.testing import S3_KEY, S3_SECRET, LatencyProxy
from fruitdask.testing import _RequestFramer as Framer

# ---------------------------------------------------------------- the framer (no server)


def _feed_all(framer: Framer, data: bytes, step: int) -> list[tuple[bytes | None, bytes]]:
    out = []
    for i in range(0, len(data), step):
        out += framer.feed(data[i : i + step])
    return out


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_framer_finds_requests_not_body_bytes(step):
    fake = b"GET /not-a-request HTTP/1.1\r\nHost: x\r\n\r\n"
    chunked_body = b"5\r\nhello\r\n" + f"{len(fake):x};ext=1\r\n".encode() + fake + b"\r\n0\r\n"
    stream = (
        b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(fake)
        + fake
        # blank lines between requests are allowed
        + b"\r\nGET /b/k HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"POST /b/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked_body
        + b"X-Trailer: 1\r\n\r\n"
        + b"HEAD /b/k HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    )
    out = _feed_all(Framer(), stream, step)
    assert b"".join(chunk for _, chunk in out) == stream
    assert [line for line, _ in out if line is not None] == [
        b"PUT /b/k HTTP/1.1",
        b"GET /b/k HTTP/1.1",
        b"POST /b/c HTTP/1.1",
        b"HEAD /b/k HTTP/1.1",
    ]


def test_framer_turns_opaque_after_upgrade_and_bad_framing():
    for head in (
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n",
        b"PUT /k HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    ):
        framer = Framer()
        rest = b"GET / HTTP/1.1\r\n\r\n" * 3
        out = framer.feed(head + rest)
        assert [line for line, _ in out if line is not None] == [head.split(b"\r\n")[0]]
        assert b"".join(c for _, c in out) == head + rest
    # a head that never ends is passed on once it is too long to be one
    framer = Framer()
    junk = b"x" * (70 * 1024)
    assert (
        b"".join(c for _, c in framer.feed(junk) + framer.feed(b"\r\n\r\n")) == junk + b"\r\n\r\n"
    )


def test_refuses_addresses_off_this_machine():
    with pytest.raises(ValueError, match="loopback"):
        LatencyProxy(("192.0.2.1", 80))  # TEST-NET-1: never reached, refused up front
    with pytest.raises(ValueError, match="loopback"):
        LatencyProxy(("127.0.0.1", 80), host="0.0.0.0")
    with pytest.raises(ValueError, match="request_delay"):
        LatencyProxy(("127.0.0.1", 80), request_delay=-1)


# ---------------------------------------------------------------- through SeaweedFS

OBJECTS = {
    "d/empty.jpg": b"",
    "d/small.jpg": random.Random(1).randbytes(3_500),
    # body bytes that look like a request must not count as one
    "d/fake.jpg": b"GET /x HTTP/1.1\r\nHost: y\r\n\r\n" * 100,
    "d/mid.jpg": random.Random(2).randbytes(70_000),
    "d/big.jpg": random.Random(3).randbytes(1_500_000),
}


@pytest.fixture(scope="module")
def bucket(s3):
    url = s3.make_bucket()
    s3.fs().pipe({f"{url[5:]}/{k}": v for k, v in OBJECTS.items()})
    return url[5:]


@pytest.fixture
def proxy(s3):
    """Start proxies in front of the S3 server; each is closed, and checked clean, after."""
    made: list[LatencyProxy] = []

    def make(**kw) -> LatencyProxy:
        p = LatencyProxy(("127.0.0.1", s3.port), **kw).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
        assert p.errors == []


def _client(endpoint: str, pool: int = 10):
    """A plain botocore S3 client (one pooled connection per concurrent call)."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        config=Config(
            max_pool_connections=pool,
            retries={"max_attempts": 1, "mode": "standard"},
            signature_version="s3v4",
            s3={"addressing_style": "path"},
        ),
    )


def _get(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.mark.s3
def test_objects_are_byte_identical_through_the_proxy(s3, proxy, bucket):
    p = proxy(request_delay=0.01, first_byte_delay=0.01)
    so = {**s3.storage_options, "endpoint_url": p.endpoint_url}
    keys = [k.split("/", 1)[1] for k in OBJECTS]
    # pyarrow's client, as fruitdask reads (a HEAD then a GET per object) ...
    got = list(io.iter_objects(f"s3://{bucket}/d", keys, so))
    assert got == list(OBJECTS.values())
    assert p.stats.requests["GET"] >= len(OBJECTS)
    # ... botocore's, and a PUT whose body looks like requests
    client = _client(p.endpoint_url)
    for k, v in OBJECTS.items():
        assert _get(client, bucket, k) == v
    before = p.stats.requests.copy()
    body = OBJECTS["d/fake.jpg"] + OBJECTS["d/mid.jpg"]
    client.put_object(Bucket=bucket, Key="put/through-proxy.jpg", Body=body)
    assert s3.fs().cat_file(f"{bucket}/put/through-proxy.jpg") == body
    assert p.stats.requests - before == {"PUT": 1}


@pytest.mark.s3
@pytest.mark.parametrize("which", ["request_delay", "first_byte_delay"])
def test_each_request_on_a_kept_alive_connection_is_delayed(proxy, bucket, which):
    d, n = 0.05, 8
    p = proxy(request_delay=0.0, first_byte_delay=0.0)
    client = _client(p.endpoint_url, pool=1)
    _get(client, bucket, "d/small.jpg")  # connect (and load botocore) before timing
    setattr(p, which, d)
    t = time.perf_counter()
    for _ in range(n):
        assert _get(client, bucket, "d/small.jpg") == OBJECTS["d/small.jpg"]
    assert time.perf_counter() - t >= n * d
    assert p.stats.connections == 1  # all on the one connection
    assert p.stats.requests["GET"] == n + 1


@pytest.mark.s3
def test_concurrent_requests_overlap(proxy, bucket):
    d, n = 0.2, 20
    p = proxy(request_delay=d)
    client = _client(p.endpoint_url, pool=n)
    _get(client, bucket, "d/small.jpg")
    start = threading.Barrier(n + 1)

    def one(_):
        start.wait()
        return _get(client, bucket, "d/small.jpg")

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        start.wait()
        t = time.perf_counter()
        got = [f.result() for f in futures]
        elapsed = time.perf_counter() - t
    assert got == [OBJECTS["d/small.jpg"]] * n
    # serially this is >= n*d = 4 s; overlapped ~d, even on a machine 3x slower
    assert d <= elapsed < 10 * d
    assert p.stats.peak >= 2


@pytest.mark.s3
def test_bandwidth_cap_bounds_transfer_time(proxy, bucket):
    rate = 1_000_000  # bytes/s
    p = proxy(request_delay=0.0, bandwidth=rate)
    client = _client(p.endpoint_url, pool=1)
    _get(client, bucket, "d/small.jpg")
    t = time.perf_counter()
    assert _get(client, bucket, "d/big.jpg") == OBJECTS["d/big.jpg"]
    assert time.perf_counter() - t >= len(OBJECTS["d/big.jpg"]) / rate


def _presigned(endpoint: str, bucket: str, key: str) -> str:
    url = _client(endpoint).generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600
    )
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


@pytest.mark.s3
def test_many_connections_at_once(proxy, bucket):
    n = 80
    p = proxy(request_delay=0.05)
    path = _presigned(p.endpoint_url, bucket, "d/mid.jpg")
    conns = [http.client.HTTPConnection(p.host, p.port, timeout=60) for _ in range(n)]
    try:
        for c in conns:
            c.request("GET", path)
        for _ in range(2):  # and each again, kept alive
            for c in conns:
                r = c.getresponse()
                assert r.status == 200 and r.read() == OBJECTS["d/mid.jpg"]
                c.request("GET", path)
        for c in conns:
            assert c.getresponse().read() == OBJECTS["d/mid.jpg"]
    finally:
        for c in conns:
            c.close()
    assert p.stats.connections == n and p.stats.peak == n
    assert p.stats.requests["GET"] == 3 * n


def _proxy_threads() -> int:
    return sum(t.name == "fruitdask-latency-proxy" for t in threading.enumerate())


def _sockets_on(port: int) -> list:
    return [c for c in psutil.Process(os.getpid()).net_connections("tcp") if c.laddr.port == port]


@pytest.mark.s3
def test_close_ends_connections_thread_and_port(s3, bucket):
    threads = _proxy_threads()
    arrived = threading.Event()
    p = LatencyProxy(
        ("127.0.0.1", s3.port), request_delay=0.01, on_request=lambda *_: arrived.set()
    ).start()
    assert _proxy_threads() == threads + 1
    port = p.port
    path = _presigned(p.endpoint_url, bucket, "d/small.jpg")
    idle = http.client.HTTPConnection(p.host, port, timeout=30)
    idle.request("GET", path)
    assert idle.getresponse().read() == OBJECTS["d/small.jpg"]
    # one connection idle, one with a request waiting out a long delay
    p.request_delay = 60
    arrived.clear()
    busy = socket.create_connection((p.host, port), timeout=30)
    busy.sendall(f"GET {path} HTTP/1.1\r\nHost: {p.host}:{port}\r\n\r\n".encode())
    try:
        assert arrived.wait(30)  # the proxy holds the request
        t = time.perf_counter()
        p.close()
        assert time.perf_counter() - t < 30  # not the 60 s delay
        for sock in (idle.sock, busy):
            sock.settimeout(30)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        idle.close()
        busy.close()
    assert p.errors == []
    assert _proxy_threads() == threads
    assert _sockets_on(port) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((p.host, port), timeout=30).close()
    p.close()  # again: nothing to do
    # the port is free for the next listener
    with LatencyProxy(("127.0.0.1", s3.port), port=port, request_delay=0) as again:
        c = http.client.HTTPConnection(again.host, port, timeout=30)
        c.request("GET", path)
        assert c.getresponse().read() == OBJECTS["d/small.jpg"]
        c.close()
    assert _proxy_threads() == threads
