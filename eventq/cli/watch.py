"""``--watch``: a view redrawn from the server's event stream, never on a polling timer.

The stream is subscribed to before the view is first read, so no change between the two is
missed. Each event that concerns the view marks it stale; it is then read again and redrawn,
at most every REDRAW_SECONDS however fast events come. On a terminal a table is redrawn in
place; piped, each change is printed under a ``--- HH:MM:SS`` line, and with
``--format json`` as one line of JSON. On a terminal, relative times ("in 38 min") and
runtimes are redrawn from the last reading every second, without asking the server.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from eventq.cli import output
from eventq.cli.client import Client, CliError, parse_sse

if TYPE_CHECKING:
    from rich.console import RenderableType

#: The least time between two readings of the view while events arrive.
REDRAW_SECONDS = 0.25
#: How often a terminal's relative times and runtimes are redrawn when nothing happens
#: (from the last reading: the server is not asked).
TICK_SECONDS = 1.0

#: One message of the stream (event, data); None once the stream has closed.
Message = tuple[str, str] | None


class Subscription:
    """``GET /api/events/stream``, read by a thread of its own into a queue, so that the
    caller can wait for a message or a deadline, whichever comes first."""

    def __init__(self, api: Client) -> None:
        self.messages: queue.Queue[Message] = queue.Queue()
        self._resp = api.open("GET", "/api/events/stream", timeout=None)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError), self._resp:
            for message in parse_sse(self._resp):
                self.messages.put((message.event, message.data))
        self.messages.put(None)


class View(Protocol):
    """What a watch shows: read from the server, drawn, and told which events matter."""

    def start(self) -> None:
        """Read it whole (at each subscription to the stream)."""
        ...

    def read(self) -> None:
        """Read it again once events have concerned it."""
        ...

    def concerns(self, record: dict[str, Any]) -> bool:
        """Whether an event of the stream may change what it shows (a view that folds
        events itself applies it here)."""
        ...

    def draw(self, now: float) -> RenderableType: ...

    def as_json(self) -> Any: ...

    def over(self) -> bool:
        """Whether the watch has shown all there is (a watched job has ended)."""
        ...


def watch(api: Client, view: View, fmt: str) -> int:
    """Follow until Ctrl-C, or until the view is over; a stream the server drops for
    falling behind is subscribed to again."""
    try:
        while True:
            # A stream is closed by its reader thread when it ends: closing it from here
            # would wait for the buffer lock that thread holds while it waits for data
            # (a keepalive, up to 15 s away). A watch that ends ends the process.
            why = _follow(Subscription(api), view, fmt)
            if why == "over":
                return 0
            if why != "resubscribe":
                raise CliError(f"the server closed the event stream: {why}" if why != "closed"
                               else "the server closed the event stream (did it stop?)")
    except KeyboardInterrupt:
        return 0


def _follow(subscription: Subscription, view: View, fmt: str) -> str:
    """Read and draw the view, then again as events concern it; why it stopped: "over",
    "resubscribe", "closed", or the reason the server gave for ending the stream."""
    view.start()
    with _screen(fmt) as (show, ticking):
        show(view)
        stale, last = False, time.monotonic()
        while not view.over():
            wait = max(0.0, last + REDRAW_SECONDS - time.monotonic()) if stale \
                else TICK_SECONDS if ticking else None
            try:
                message = subscription.messages.get(timeout=wait)
            except queue.Empty:
                message = ("", "")
            if message is None:
                return "closed"
            event, data = message
            if event == "dropped":
                return "resubscribe"
            if event == "revoked":
                return str(json.loads(data).get("reason"))
            if event:  # always told: a view that folds events must see each one
                stale = _concerns(view, data) or stale
            if stale and time.monotonic() - last >= REDRAW_SECONDS:
                view.read()
                stale, last = False, time.monotonic()
                show(view)
            elif not event and not stale:
                show(view)  # time passed: relative times and runtimes move on
    return "over"


def _concerns(view: View, data: str) -> bool:
    try:
        record = json.loads(data)
    except ValueError:
        return False
    return isinstance(record, dict) and view.concerns(record)


@contextlib.contextmanager
def _screen(fmt: str) -> Iterator[tuple[Callable[[View], None], bool]]:
    """How a reading is shown, and whether it is shown again as time passes: in place on a
    terminal (again each TICK_SECONDS), else once for each reading that differs from the
    one before."""
    if fmt == "json":
        yield _on_change(lambda view: print(
            json.dumps(output.readable_times(view.as_json())), flush=True)), False
        return
    console = output.console
    if not console.is_terminal:
        def frame(view: View) -> None:
            stamp = datetime.datetime.now().strftime("%H:%M:%S")
            console.print(f"--- {stamp}", markup=False, highlight=False)
            console.print(view.draw(time.time()))
            console.file.flush()

        yield _on_change(frame), False
        return
    from rich.live import Live

    with Live(console=console, auto_refresh=False) as live:
        yield (lambda view: live.update(view.draw(time.time()), refresh=True)), True


def _on_change(put: Callable[[View], None]) -> Callable[[View], None]:
    """``put`` a reading only when what it holds differs from the one before."""
    shown = [""]

    def show(view: View) -> None:
        held = json.dumps(view.as_json(), sort_keys=True, default=str)
        if held != shown[0]:
            shown[0] = held
            put(view)
    return show
