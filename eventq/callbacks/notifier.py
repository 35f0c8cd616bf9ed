"""Sends what ``Notifications`` says is owed, and starts the ``--on-finish`` hook.

Effects only once the ending is durable: an ending is noted as it is appended and acted on
from ``EventLog.on_durable``; at a start, what the replayed log owes is sent again. Nothing
here can hold the queue or the event loop: each notification is a task of its own, a try is
bounded in time (``post_timeout``) and in connections per receiver (``PER_RECEIVER``), and
all it does to the rest of the server is append the try's outcome, decided by the pure
``decide_try`` right after reading what is owed, with no await in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import aiohttp
import msgspec
import structlog
import yarl

from eventq import __version__
from eventq import events as ev
from eventq.callbacks.hooks import Hooks
from eventq.callbacks.owed import (
    TERMINAL_EVENTS,
    Ending,
    Key,
    Notifications,
    RetryPolicy,
    TryResult,
    decide_try,
    notification_id,
    payload,
)
from eventq.callbacks.urls import shown
from eventq.clock import Clock
from eventq.log import EventLog, Record

log = structlog.get_logger()

#: Tries in flight to one receiver (scheme, host, port) at once; more wait their turn.
PER_RECEIVER = 4
#: Characters of an error kept in the log.
ERROR_CHARS = 300


@dataclass(frozen=True)
class CallbackSettings:
    """``eventq server``'s completion callbacks."""

    #: Every job's end is POSTed here too (``--notify-url``).
    notify_url: str | None = None
    #: Run by ``sh -c`` when a job ends (``--on-finish``).
    on_finish: str | None = None
    on_finish_timeout: float = 60.0
    #: Seconds one try may take, connecting included.
    post_timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class Notifier:
    DURABLE_READS: ClassVar[frozenset[type]] = frozenset({*TERMINAL_EVENTS, ev.AttemptEnded})

    log: EventLog
    notifications: Notifications
    clock: Clock
    settings: CallbackSettings
    #: Endings appended and not yet durable, by the seq that ended them.
    appended: dict[int, list[Ending]] = field(default_factory=dict)
    deliveries: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    hooks: Hooks | None = None
    #: Set once ``stop`` began: an end that becomes durable later is left to the next start.
    stopped: bool = False
    _session: aiohttp.ClientSession | None = None
    _turns: dict[yarl.URL, asyncio.Semaphore] = field(default_factory=dict)

    def start(self) -> None:
        """Record the server's URL if it changed; send what the log owes; listen."""
        if self.settings.notify_url != self.notifications.server_url:
            self.log.append("system", [ev.ServerNotifyUrlSet(url=self.settings.notify_url)])
        if self.settings.on_finish:
            self.hooks = Hooks(self.settings.on_finish, self.settings.on_finish_timeout, self.log)
        self.notifications.listener = self._appended
        for key in list(self.notifications.owed):
            self._deliver_soon(key)

    def _appended(self, ending: Ending) -> None:
        self.appended.setdefault(ending.ending, []).append(ending)

    def on_durable(self, records: Sequence[Record]) -> None:
        if self.stopped:
            return
        for record in records:
            for ending in self.appended.pop(record.seq, ()):
                for key in self.notifications.owed_by(ending):
                    self._deliver_soon(key)
                if self.hooks is not None:
                    self.hooks.run_for(ending)

    def _deliver_soon(self, key: Key) -> None:
        if key not in self.deliveries:
            task = asyncio.get_running_loop().create_task(self._deliver(key))
            self.deliveries[key] = task
            task.add_done_callback(lambda _: self.deliveries.pop(key, None))

    async def _deliver(self, key: Key) -> None:
        """Try until delivered or given up, each try when it is due."""
        while (owed := self.notifications.owed.get(key)) is not None:
            await self._until(owed.due)
            url = self.notifications.url_of(key)
            body = msgspec.json.encode(payload(key, owed))
            result = None if url is None else await self._post(url, key, body)
            owed = self.notifications.owed.get(key)
            if owed is None:
                return
            event = decide_try(key, owed, result, self.clock.now(), self.settings.retry)
            self.log.append("system", [event])
            self._tell(event, url)

    async def _until(self, when: float) -> None:
        """Wait on the server's clock (a test's simulated one moves when told)."""
        if when <= self.clock.now():
            return
        due: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.clock.call_at(when, lambda: _settle(due))
        try:
            await due
        finally:
            timer.cancel()

    async def _post(self, url: str, key: Key, body: bytes) -> TryResult:
        target = yarl.URL(url)
        turn = self._turns.setdefault(target.origin(), asyncio.Semaphore(PER_RECEIVER))
        headers = {"Content-Type": "application/json", "Idempotency-Key": notification_id(key)}
        async with turn:
            try:
                async with asyncio.timeout(self.settings.post_timeout):
                    async with self.session.post(url, data=body, headers=headers,
                                                 allow_redirects=False) as reply:
                        if 200 <= reply.status < 300:
                            return TryResult(reply.status)
                        return TryResult(reply.status, f"HTTP {reply.status} {reply.reason}")
            except TimeoutError:
                return TryResult(None, f"no answer within {self.settings.post_timeout:g} s")
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                return TryResult(None, (str(exc) or type(exc).__name__)[:ERROR_CHARS])

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"eventq/{__version__}"},
                timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def _tell(self, event: ev.Event, url: str | None) -> None:
        where = None if url is None else shown(url)
        if isinstance(event, ev.NotificationDelivered):
            log.info("notification_delivered", job_id=event.job_id, target=event.target,
                     url=where, tries=event.tries, status=event.status)
        elif isinstance(event, ev.NotificationFailed):
            (log.warning if event.retry_at is not None else log.error)(
                "notification_failed" if event.retry_at is not None else
                "notification_given_up", job_id=event.job_id, target=event.target, url=where,
                tries=event.tries, error=event.error, retry_at=event.retry_at)

    async def stop(self) -> None:
        """Stop trying (what is owed is sent after the next start) and end running hooks."""
        self.stopped = True
        self.notifications.listener = None
        tasks = list(self.deliveries.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.hooks is not None:
            await self.hooks.stop()
        if self._session is not None:
            await self._session.close()


def _settle(due: asyncio.Future[None]) -> None:
    if not due.done():
        due.set_result(None)
