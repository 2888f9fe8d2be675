"""`fruitdask.fetch`: ordered read-ahead whose depth follows the store's latency.

The fake store's requests block on events the test sets, and time is a fake
clock, so nothing here depends on how fast the machine is: no sleeps, no
timing asserts. Waits carry a 30 s timeout only so a bug fails instead of
hanging.
"""

from __future__ import annotations

import threading

import pytest

from fruitdask.fetch import Window, fetch_ordered

WAIT = 30


class Store:
    """A fake store whose requests each wait until the test releases their key."""

    def __init__(self, fail: frozenset = frozenset()) -> None:
        self.cond = threading.Condition()
        self.started: list[int] = []
        self.released: set[int] = set()
        self.active = self.peak = 0
        self.fail = fail

    def get(self, key: int) -> bytes:
        with self.cond:
            self.started.append(key)
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.cond.notify_all()
            ok = self.cond.wait_for(lambda: key in self.released, WAIT)
            self.active -= 1
        if not ok:
            raise TimeoutError(f"key {key} never released")
        if key in self.fail:
            raise OSError(f"bad key {key}")
        return b"%d" % key

    def wait_started(self, n: int) -> list[int]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.started) >= n, WAIT)
            return list(self.started)

    def release(self, *keys: int) -> None:
        with self.cond:
            self.released.update(keys)
            self.cond.notify_all()


class Consumer(threading.Thread):
    """Drives an iterator on its own thread, one item per ``step()``."""

    def __init__(self, it) -> None:
        super().__init__(daemon=True)
        self.it = it
        self.got: list = []
        self.go = threading.Semaphore(0)
        self.cond = threading.Condition()
        self.done = False

    def run(self) -> None:
        try:
            while True:
                self.go.acquire()
                try:
                    item = next(self.it)
                except StopIteration:
                    return
                with self.cond:
                    self.got.append(item)
                    self.cond.notify_all()
        finally:
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.go.release()

    def wait_got(self, n: int) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got) >= n or self.done, WAIT)
            return list(self.got)


def _fixed(n: int) -> Window:
    return Window(low=n, high=n, initial=n)


def _fetch_threads() -> int:
    return sum(t.name.startswith("fruitdask-fetch") for t in threading.enumerate())


# ---------------------------------------------------------------- the policy


def test_window_is_littles_law_within_bounds():
    w = Window(low=4, high=128, initial=16, gain=2, history=8, warmup=4)
    assert w.size == 16
    for _ in range(3):
        w.fetched(0.050)
        w.consumed(0.001)
    assert w.size == 16  # not enough seen yet
    w.fetched(0.050)
    w.consumed(0.001)
    assert w.size == 100  # 2 * 50 ms / 1 ms
    for _ in range(8):  # the store moves next door
        w.fetched(0.001)
    assert w.size == 4  # 2 * 1 ms / 1 ms = 2, held at low
    for _ in range(8):  # a consumer that does nothing
        w.consumed(0.0)
    assert w.size == 128


def test_window_uses_medians_not_outliers():
    w = Window(low=1, high=1000, gain=1, history=5, warmup=5)
    for lat in (0.010, 0.010, 0.010, 0.010, 5.0):
        w.fetched(lat)
    for work in (0.001, 0.001, 0.001, 0.001, 3.0):
        w.consumed(work)
    assert w.size == 10


@pytest.mark.parametrize(
    "kw", [{"low": 0}, {"low": 5, "high": 4}, {"gain": 0}, {"warmup": 0}, {"warmup": 65}]
)
def test_window_refuses_bad_bounds(kw):
    with pytest.raises(ValueError):
        Window(**kw)


# ---------------------------------------------------------------- the iterator


def test_results_in_key_order_whatever_order_they_arrive_in():
    store = Store(fail=frozenset({3}))
    c = Consumer(fetch_ordered(store.get, range(8), _fixed(8)))
    c.start()
    c.step(9)
    assert sorted(store.wait_started(8)) == list(range(8))  # all in flight at once
    store.release(*reversed(range(8)))
    got = c.wait_got(8)
    c.join(WAIT)
    assert got[:3] == [b"0", b"1", b"2"] and got[4:] == [b"4", b"5", b"6", b"7"]
    assert isinstance(got[3], OSError) and "bad key 3" in str(got[3])  # in its place
    assert sorted(store.started) == list(range(8))  # each key fetched once


def test_never_more_than_the_window_ahead_of_the_consumer():
    store = Store()
    c = Consumer(fetch_ordered(store.get, range(10), _fixed(3)))
    c.start()
    c.step()
    assert sorted(store.wait_started(3)) == [0, 1, 2]
    store.release(0)
    assert c.wait_got(1) == [b"0"]
    # the consumer holds item 0; nothing more is requested until it asks again
    assert sorted(store.started) == [0, 1, 2]
    c.step()
    assert sorted(store.wait_started(4)) == [0, 1, 2, 3]
    store.release(*range(10))
    c.step(20)
    assert c.wait_got(10) == [b"%d" % k for k in range(10)]
    c.join(WAIT)
    assert store.peak <= 3


class ThreadClock:
    """Each thread has its own time, moved only by that thread: requests 'take'
    what the fake store adds on the fetching thread, the consumer's work what
    the consumer adds on its thread. Deterministic whatever the scheduling."""

    def __init__(self) -> None:
        self.local = threading.local()

    def __call__(self) -> float:
        return getattr(self.local, "t", 0.0)

    def spend(self, seconds: float) -> None:
        self.local.t = self() + seconds


@pytest.mark.parametrize(("latency", "want"), [(0.040, 64), (0.0005, 2)])
def test_read_ahead_follows_latency(latency, want):
    clock = ThreadClock()
    store = Store()

    def get(key: int) -> bytes:
        clock.spend(latency)  # on the fetching thread: the request's latency
        return store.get(key)

    w = Window(low=2, high=64, initial=2, gain=2, history=4, warmup=4)
    it = fetch_ordered(get, range(200), w, clock=clock)
    try:
        for i in range(4):  # until 4 requests and 4 items are measured: 2 ahead
            store.release(i)
            assert next(it) == b"%d" % i
            assert len(store.wait_started(i + 2)) == i + 2
            clock.spend(0.001)  # on this thread: the consumer's work on the item
        # measured: 2 * 40 ms / 1 ms = 80 -> high (64); 2 * 0.5 ms / 1 ms = 1 -> low (2)
        store.release(4)
        assert next(it) == b"4"
        assert w.size == want
        assert len(store.wait_started(4 + want)) == 4 + want  # and no more
    finally:
        store.release(*range(200))
    assert list(it) == [b"%d" % k for k in range(5, 200)]


def test_closing_early_cancels_the_rest_and_leaves_no_thread():
    before = _fetch_threads()
    store = Store()
    store.release(0, 1)
    it = fetch_ordered(store.get, range(100), _fixed(4))
    assert next(it) == b"0" and next(it) == b"1"
    # requested so far: 0..4 (four ahead of the consumer); 2, 3, 4 still running
    assert sorted(store.wait_started(5)) == [0, 1, 2, 3, 4]
    closed = threading.Event()

    def close() -> None:
        it.close()  # returns once the running requests have
        closed.set()

    t = threading.Thread(target=close)
    t.start()
    store.release(*range(100))
    t.join(WAIT)
    assert closed.is_set()
    assert sorted(store.started) == [0, 1, 2, 3, 4]  # nothing requested after the close
    assert _fetch_threads() == before


def test_empty_and_instant():
    before = _fetch_threads()
    assert list(fetch_ordered(lambda k: k, [])) == []
    assert list(fetch_ordered(lambda k: k * 2, range(50))) == [k * 2 for k in range(50)]
    assert _fetch_threads() == before
