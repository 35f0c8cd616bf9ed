"""The actor runtime: a mailbox, one message at a time, ``tell`` and ``ask``.

An actor's handler runs to completion before the next message is taken, so the
actor's own state never changes under it. Stopping fails every message still
queued with ``ActorStopped``; no ``ask`` is left hanging.

``idle`` says the actor is between messages with none waiting: a synchronous step taken
then (no ``await`` in it) is one message handled whole, in the order it was sent, without
the mailbox's two turns of the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Generic, TypeVar

import structlog

Msg = TypeVar("Msg")
log = structlog.get_logger()


class ActorStopped(RuntimeError):
    """The actor stopped before it could answer."""

    def __init__(self, name: str) -> None:
        super().__init__(f"actor {name} stopped")


class Actor(Generic[Msg]):
    """Subclasses implement ``receive``; callers use ``tell`` and ``ask``."""

    name = "actor"

    def __init__(self) -> None:
        self._mailbox: asyncio.Queue[tuple[Msg, asyncio.Future[Any] | None]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._current: asyncio.Future[Any] | None = None
        #: A message is being handled (its handler may be suspended at an await).
        self._busy = False

    async def receive(self, message: Msg) -> Any:
        raise NotImplementedError

    def idle(self) -> bool:
        """Running, handling no message, and none queued: a synchronous step taken now
        comes after every message sent before it and before every one sent after."""
        return self._task is not None and not self._stopped and not self._busy and \
            self._mailbox.empty()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def tell(self, message: Msg) -> None:
        """Send without waiting for an answer."""
        if self._stopped:
            raise ActorStopped(self.name)
        self._mailbox.put_nowait((message, None))

    async def ask(self, message: Msg) -> Any:
        """Send and wait for the handler's answer (or its exception)."""
        if self._stopped:
            raise ActorStopped(self.name)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._mailbox.put_nowait((message, future))
        return await future

    async def _run(self) -> None:
        while True:
            message, reply = await self._mailbox.get()
            self._current, self._busy = reply, True
            try:
                result = await self.receive(message)
            except Exception as exc:
                if reply is not None and not reply.done():
                    reply.set_exception(exc)
                else:
                    log.exception("actor_message_failed", actor=self.name)
                continue
            finally:
                self._busy = False
            if reply is not None and not reply.done():
                reply.set_result(result)

    async def stop(self) -> None:
        """Stop taking messages; everything still queued fails with ActorStopped."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._current is not None and not self._current.done():
            self._current.set_exception(ActorStopped(self.name))
        while not self._mailbox.empty():
            _, reply = self._mailbox.get_nowait()
            if reply is not None and not reply.done():
                reply.set_exception(ActorStopped(self.name))
