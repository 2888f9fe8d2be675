"""Stopping a run by flag: a signal handler records the request, the run stops itself.

An exception raised from inside a signal handler lands wherever the main thread
happens to be; inside distributed's GC callback Python prints "Exception
ignored" and swallows it, and the run went on. So the handlers only call
:meth:`StopToken.request` (an attribute assignment, safe in a handler); the
supervising thread notices it, runs the registered cancel callbacks (cancel the
futures, the Spark jobs), and the run raises :class:`~fruitdask.errors.Cancelled`
at its next :meth:`StopToken.check`. The commit of an output happens inside
:meth:`StopToken.critical`, so whoever reports the outcome can tell for certain
whether ``_SUCCESS`` was written before the stop.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from fruitdask.errors import Cancelled, FruitdaskError

__all__ = ["StopToken"]


class StopToken:
    """A stop request shared by the CLI's supervisor and the run it supervises."""

    def __init__(self) -> None:
        self.signum: int | None = None
        #: The run id an output committed under :meth:`critical`, if any.
        self.committed: str | None = None
        self._requested = False
        self._error: FruitdaskError | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._fired = False
        self._holds: list[str] = []
        #: How many times a stop was asked for (a second Ctrl-C is counted, not obeyed).
        self.requests = 0
        #: The clean-up each request found running (recorded in the handler, said
        #: by the supervisor even if the clean-up ended before it looked).
        self.requests_during_hold: list[str] = []

    # -- asking
    def request(self, signum: int | None = None) -> None:
        """Ask the run to stop. Safe to call from a signal handler (no locks)."""
        if not self._requested:
            self.signum = signum
        self._requested = True
        self.requests += 1
        # a slice, not a test then an index: the hold may end in between
        self.requests_during_hold.extend(self._holds[-1:])

    def fail(self, error: FruitdaskError) -> None:
        """Ask the run to stop with ``error`` (e.g. the output's lock was lost);
        the first error recorded is the one raised (later ones are its effects)."""
        if self._error is None:
            self._error = error
        self._requested = True

    @property
    def requested(self) -> bool:
        return self._requested

    @property
    def error(self) -> FruitdaskError | None:
        """The error :meth:`fail` recorded, if any."""
        return self._error

    # -- the run's side
    def check(self) -> None:
        """Raise :class:`Cancelled` (or the recorded error) if a stop was requested."""
        if self._requested or self._closed:
            if self._error is not None:
                raise self._error
            raise Cancelled(self.signum)

    def on_stop(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` when the stop is acted on (:meth:`fire`); returns a
        function that unregisters it. Registered after the fact, it runs at once."""
        with self._lock:
            fire_now = self._fired
            if not fire_now:
                self._callbacks.append(callback)
        if fire_now:
            _quietly(callback)

        def remove() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section no stop can interrupt half-way: the commit. A stop requested
        before it raises on entry; one requested during it waits for its end."""
        with self._lock:
            self.check()
            yield

    @contextlib.contextmanager
    def holding(self, note: str) -> Iterator[None]:
        """A clean-up that must run to its end even after a stop (terminating
        cloud instances): whoever supervises the run waits for it beyond any
        grace period, whatever signals follow. ``note`` says what is going on."""
        self._holds.append(note)
        try:
            yield
        finally:
            self._holds.remove(note)

    @property
    def held(self) -> str | None:
        """The note of the clean-up that must finish first, if one is running."""
        holds = self._holds[-1:]
        return holds[0] if holds else None

    # -- the supervisor's side
    def fire(self) -> None:
        """Run the cancel callbacks (once, in the calling thread, never in a handler)."""
        with self._lock:
            if self._fired:
                return
            self._fired = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            _quietly(cb)

    def close(self) -> None:
        """After this returns no :meth:`critical` section can start again: whatever
        the run committed before is all it will ever commit."""
        with self._lock:
            self._closed = True


def _quietly(callback: Callable[[], None]) -> None:
    # A cancel callback that fails (a client already closed) must not stop the others.
    with contextlib.suppress(Exception):
        callback()
