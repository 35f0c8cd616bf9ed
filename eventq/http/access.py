"""A stream a user opens lives only while the token that opened it is valid (SPEC 8).

Every user stream (the event stream, a log follow, any other) holds an ``Access``: the
SHA-256 of the token it was opened with, its user as they are now, and the rule the stream
needs of that user (``allows``). ``Accesses`` reads every change to users and tokens as it
is appended, the moment REST starts answering 401, and checks each open access again:
one whose token is gone (revoked, its user removed) or whose user may no longer have what
it shows (an admin who follows another user's job and is demoted) ends, and its stream
sends ``event: revoked`` with the reason as its last event. A stream that may go on sees
its user's new level at once. An access is checked also when it starts, so a revocation
between a request's authentication and its stream's start is not missed.

A stream opened by the web page holds its session too: it ends when the session does (its
sign-out, its token's revocation, its user's demotion: ``eventq.sessions``), and at the
session's expiry, for which a timer is set when it is watched.

Worker streams are not here: the worker hub closes them when a worker's token is rotated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from eventq.auth import User, Users
from eventq.clock import Clock, Timer
from eventq.http.app import ORCH, SESSION_SHA256, TOKEN_SHA256, current_user
from eventq.log import Record
from eventq.sessions import Sessions

#: Why ``user`` may no longer have what a stream shows; None while they may.
Allows = Callable[[User], str | None]
REVOKED = "the token this stream was opened with is no longer valid (revoked)"


def anyone(user: User) -> str | None:
    return None


def _nothing() -> None:
    return None


@dataclass(eq=False)
class Access:
    """What an open stream was opened with, and whether it may go on."""

    token_sha256: str
    user: User
    allows: Allows = anyone
    #: The session it was opened with (the web page), if any: it ends with it.
    session_sha256: str | None = None
    #: Why the stream must end; None while it may go on.
    ended: str | None = None
    #: Called once, when it ends: wakes a stream that waits for something else.
    on_end: Callable[[], None] = field(default=_nothing)


class Accesses:
    """The open accesses of one application, checked again on every change to users and
    sessions, and when a session's time is up."""

    def __init__(self, users: Users, sessions: Sessions, clock: Clock) -> None:
        self.users, self.sessions, self.clock = users, sessions, clock
        self.live: set[Access] = set()
        self.timers: dict[Access, Timer] = {}

    def watch(self, access: Access) -> None:
        self.live.add(access)
        session = self.sessions.session(access.session_sha256 or "")
        if session is not None:
            self.timers[access] = self.clock.call_at(
                session.expires_at, lambda: self._check(access) if access in self.live else None)
        self._check(access)

    def unwatch(self, access: Access) -> None:
        self.live.discard(access)
        timer = self.timers.pop(access, None)
        if timer is not None:
            timer.cancel()

    def evolve(self, record: Record) -> None:
        for access in list(self.live):
            self._check(access)

    def _check(self, access: Access) -> None:
        if access.session_sha256 is not None:
            user, why = self.sessions.standing(access.session_sha256, self.clock.now(),
                                               self.users)
        else:
            user = self.users.holder(access.token_sha256)
            why = REVOKED if user is None else None
        why = why if user is None else access.allows(user)
        if user is not None and why is None:
            access.user = user
            return
        self.unwatch(access)
        access.ended = why
        access.on_end()


ACCESSES = web.AppKey("stream_accesses", Accesses)


def setup(app: web.Application) -> None:
    """Check open streams on every change to users and sessions; stop when the
    application stops."""
    orch = app[ORCH]
    accesses = app[ACCESSES] = Accesses(orch.users, orch.sessions, orch.clock)
    orch.log.subscribe(accesses.evolve, Users.READS | Sessions.READS)

    async def detach(_: web.Application) -> None:
        orch.log.unsubscribe(accesses.evolve)

    app.on_cleanup.append(detach)


def opened_with(request: web.Request, allows: Allows = anyone) -> Access:
    """The access of the stream ``request`` opens; ``watch`` it once its stream is ready
    to be ended (``on_end``)."""
    return Access(request[TOKEN_SHA256], current_user(request), allows,
                  request.get(SESSION_SHA256))


def watch(request: web.Request, access: Access) -> None:
    """Check ``access`` on every change to users from now on, and at once (it may end
    here: see ``Access.ended``). Pair with ``unwatch``."""
    request.app[ACCESSES].watch(access)


def unwatch(request: web.Request, access: Access) -> None:
    request.app[ACCESSES].unwatch(access)


def revoked_body(access: Access, **extra: Any) -> dict[str, Any]:
    """The data of a stream's last event once its access has ended."""
    return {"reason": access.ended, **extra}
