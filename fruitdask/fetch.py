"""Fetch many keys ahead of their consumer, in order, with as many requests in
flight as the store's latency calls for.

A task reads ~1,000 small objects one GET each and decodes them in order. With
a fixed number of requests in flight the task is as fast as the store only
where that number happens to match the latency: 16 kept a loopback server
busy, and left the cores idle most of the time against a store 20 ms away.
By Little's law a consumer that spends ``s`` seconds on each item, fed by a
store that answers in ``L`` seconds, needs ``L / s`` requests in flight so
that it never waits. :func:`fetch_ordered` measures both as it goes and
keeps ``gain * L / s`` requests ahead of the consumer, within bounds; no
setting needs to know the store.

Nothing here knows about S3: ``get`` is any blocking function of a key
(it runs on this module's threads, so it should release the GIL while it
waits, as pyarrow's and botocore's clients do).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["Window", "fetch_ordered"]

K = TypeVar("K")
T = TypeVar("T")


class Window:
    """How many requests to keep ahead of the consumer, from what has been seen.

    ``size`` is ``ceil(gain * L / s)`` within ``[low, high]``: ``L`` the median
    latency of the last ``history`` requests, ``s`` the median time the
    consumer spent on each of its last ``history`` items (its own work, not
    its waits for data). Until ``warmup`` of each have been seen, ``initial``.
    ``gain`` covers the spread of latencies: with items consumed in order, the
    consumer waits for the slowest request in the window, not the median one.

    Where the store itself is the bottleneck (SeaweedFS on the same two cores)
    requests queue there and ``L`` grows with the window, so the window grows
    to ``high``. Measured there, 4 to 128 in flight read and decoded at the
    same rate (380-456 images/s, within the noise), so at worst ``high``
    costs threads and connections. Medians, not minima, because a real
    store's latencies spread: sizing by the fastest requests would leave the
    consumer waiting on the typical ones.

    One ``Window`` may serve many :func:`fetch_ordered` calls, one after the
    other or at once (it is thread-safe), so that the next call against the
    same store starts at the size the last one found.
    """

    def __init__(
        self,
        low: int = 4,
        high: int = 128,
        initial: int = 16,
        gain: float = 2.0,
        history: int = 64,
        warmup: int = 8,
    ) -> None:
        if not 1 <= low <= high:
            raise ValueError(f"need 1 <= low <= high, got low={low}, high={high}")
        if gain <= 0 or history < 1 or not 1 <= warmup <= history:
            raise ValueError("need gain > 0 and 1 <= warmup <= history")
        self.low, self.high = low, high
        self.initial = min(max(initial, low), high)
        self.gain = gain
        self.warmup = warmup
        self._latency: collections.deque[float] = collections.deque(maxlen=history)
        self._work: collections.deque[float] = collections.deque(maxlen=history)
        self._lock = threading.Lock()
        self._size = self.initial
        #: seconds consumers spent waiting for an item that had not arrived yet
        self.waited = 0.0
        #: items consumers got without waiting / after waiting
        self.ready = self.stalled = 0

    @property
    def size(self) -> int:
        return self._size

    def fetched(self, seconds: float) -> None:
        """A request took ``seconds``, from start to result."""
        with self._lock:
            self._latency.append(seconds)
            self._resize()

    def consumed(self, seconds: float) -> None:
        """The consumer spent ``seconds`` on an item before asking for the next."""
        with self._lock:
            self._work.append(seconds)
            self._resize()

    def _resize(self) -> None:
        if len(self._latency) < self.warmup or len(self._work) < self.warmup:
            return
        latency = _median(self._latency)
        work = max(_median(self._work), 1e-6)  # a consumer that does nothing: as fast as allowed
        want = math.ceil(self.gain * latency / work)
        self._size = min(max(want, self.low), self.high)

    def delivered(self, waited: float | None) -> None:
        """An item went to the consumer, after it ``waited`` seconds (None: it was ready)."""
        with self._lock:
            if waited is None:
                self.ready += 1
            else:
                self.stalled += 1
                self.waited += waited

    def __repr__(self) -> str:
        return (
            f"Window(size={self._size}, low={self.low}, high={self.high}, "
            f"waited={self.waited:.3f}s, stalled={self.stalled}, ready={self.ready})"
        )


def _median(values: Iterable[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def fetch_ordered(
    get: Callable[[K], T],
    keys: Iterable[K],
    window: Window | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[T | Exception]:
    """Yield ``get(key)`` for each key, in the keys' order, fetching ahead.

    Parameters
    ----------
    get : callable
        Blocking fetch of one key. What it returns is yielded; an exception it
        raises is yielded in the key's place (not raised), so one bad key does
        not end the iteration.
    keys : iterable
        The keys, read at once.
    window : Window, optional
        The sizing policy and its measurements; pass the same one to calls
        against the same store. Default: a new ``Window()``.
    clock : callable
        Seconds, monotonic (tests pass a fake one).

    Yields
    ------
    The results, in order. At most ``window.size`` keys are ever requested
    but not yet yielded, and at most ``window.high`` threads run ``get``.
    Closing the iterator early cancels the requests not yet started and
    waits for the running ones, so no thread outlives the iteration.
    """
    keys = list(keys)
    w = window if window is not None else Window()
    if not keys:
        return

    def timed(key: K) -> T | Exception:
        t = clock()
        try:
            return get(key)
        except Exception as exc:  # noqa: BLE001 - yielded in the key's place
            return exc
        finally:
            w.fetched(clock() - t)

    pool = ThreadPoolExecutor(min(w.high, len(keys)), thread_name_prefix="fruitdask-fetch")
    ahead: collections.deque[Future] = collections.deque()
    nxt = 0
    try:
        for _ in range(len(keys)):
            while nxt < len(keys) and len(ahead) < max(1, w.size):
                ahead.append(pool.submit(timed, keys[nxt]))
                nxt += 1
            head = ahead.popleft()
            if head.done():
                w.delivered(None)
            else:
                t = clock()
                head.result()
                w.delivered(clock() - t)
            result = head.result()
            t = clock()
            yield result
            w.consumed(clock() - t)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
