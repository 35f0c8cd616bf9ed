"""Pausing the cyclic garbage collector around work that builds much and frees little.

A replay, a 10,000-row import, a 10,000-job batch: what they build either lives on (the
state) or is freed by reference counting, so the collector would only scan it again
and again (a third of a large replay, a sixth of an import). Pauses may overlap (two
batches on one event loop): the collector resumes when the last one ends.

Worker connections are long-lived too: ``keep_soon`` moves a burst of them, and the reads
they wait on, out of the collector's view once it has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Iterator

_pauses = 0
_resume = False
_keep = False
#: The loop a freeze is due on, if one is (a loop that closed first leaves it behind).
_keep_due: asyncio.AbstractEventLoop | None = None
#: How long after a connection its burst is taken to have passed.
BURST_SECONDS = 1.0
#: Closed connections between two full collections of what is frozen.
CLOSES_PER_SWEEP = 5000
#: And at most this long between two: a freeze also keeps whatever other cycles (a web
#: page's closed stream, a request's exception) had outlived a young collection when they
#: became garbage, and those would otherwise wait for the closes forever.
SWEEP_SECONDS = 600.0
#: Connected workers from which freezing pays: below, a collection's scan of them is short.
FREEZE_FROM_CONNECTIONS = 500
_closed = 0
_freezes = 0
_last_sweep = time.monotonic()


@contextlib.contextmanager
def collector_paused(keeps: bool = False) -> Iterator[None]:
    """``keeps``: what the work builds is long-lived state (a batch's jobs). It is moved
    out of the collector's view when the pause ends (``gc.freeze``), instead of being
    scanned at the next collection: 10,000 jobs would cost a 20 ms young collection.
    Reference counting still frees them when they go. A freeze also keeps whatever cyclic
    garbage exists at that moment; the server makes little (measured: 0.3 objects per
    submission, from its connections), so that is a few kilobytes per batch at most."""
    global _pauses, _resume, _keep
    if _pauses == 0:
        _resume, _keep = gc.isenabled(), False
        gc.disable()
    _pauses += 1
    _keep = _keep or keeps
    try:
        yield
    finally:
        _pauses -= 1
        if _pauses == 0:
            if _keep:
                gc.freeze()
            if _resume:
                gc.enable()


def worth_keeping(connections: int) -> bool:
    """Whether a server with ``connections`` workers connected freezes their connections."""
    return connections >= FREEZE_FROM_CONNECTIONS


def keep_soon() -> None:
    """What was just built lives on (a worker's connection, its next read): freeze it out
    of the collector's view within ``BURST_SECONDS``, once per such period at most.

    Measured at 10,000 workers: the young collections of a welcome burst cost 20-150 ms
    each and an older one 250-780 ms; at rest, the reads the connections wait on,
    renewed with each heartbeat, filled the young generation with 157,000 objects whose
    one collection held the loop for 115 ms of CPU. A dispatch waits behind each. A freeze
    is cheap (it moves lists); the young collection just before it is over a second's
    objects only, and frees what cyclic garbage they hold, so that none is kept."""
    global _keep_due
    loop = asyncio.get_running_loop()
    if _keep_due is not loop:
        _keep_due = loop
        loop.call_later(BURST_SECONDS, _keep_now)


def _keep_now() -> None:
    global _keep_due, _closed, _freezes, _last_sweep
    _keep_due = None
    _freezes += 1
    if _closed >= CLOSES_PER_SWEEP or time.monotonic() - _last_sweep >= SWEEP_SECONDS:
        # What was frozen and is garbage now (closed connections' cycles, and any other
        # cycle frozen before it was found): sweep it all.
        _closed, _last_sweep = 0, time.monotonic()
        gc.unfreeze()
        gc.collect()
    else:
        gc.collect(0)
    gc.freeze()


def freezes() -> int:
    """How many freezes ``keep_soon`` has made: a connection notes it as it opens."""
    return _freezes


def connection_closed(opened_at: int) -> None:
    """A connection opened at ``freezes() == opened_at`` ended. If it was frozen since,
    its cycles can only be freed by a full collection of what is frozen: one runs (one
    long pause: 0.6 s of CPU measured at 10,000 workers) every ``CLOSES_PER_SWEEP`` such
    closes, so the garbage kept is bounded by that many connections' (a few kilobytes
    each). One that ends before a freeze (a storm's failed handshakes) is collected as
    usual."""
    global _closed
    if _freezes > opened_at:
        _closed += 1
