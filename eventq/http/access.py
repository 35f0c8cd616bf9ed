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

Worker streams are not here: the worker hub closes them when a worker's token is rotated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from eventq.auth import User, Users
from eventq.http.app import ORCH, TOKEN_SHA256, current_user
from eventq.log import Record

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
    #: Why the stream must end; None while it may go on.
    ended: str | None = None
    #: Called once, when it ends: wakes a stream that waits for something else.
    on_end: Callable[[], None] = field(default=_nothing)


class Accesses:
    """The open accesses of one application, checked again on every change to users."""

    def __init__(self, users: Users) -> None:
        self.users = users
        self.live: set[Access] = set()

    def watch(self, access: Access) -> None:
        self.live.add(access)
        self._check(access)

    def unwatch(self, access: Access) -> None:
        self.live.discard(access)

    def evolve(self, record: Record) -> None:
        for access in list(self.live):
            self._check(access)

    def _check(self, access: Access) -> None:
        user = self.users.holder(access.token_sha256)
        why = REVOKED if user is None else access.allows(user)
        if user is not None and why is None:
            access.user = user
            return
        self.live.discard(access)
        access.ended = why
        access.on_end()


ACCESSES = web.AppKey("stream_accesses", Accesses)


def setup(app: web.Application) -> None:
    """Check open streams on every change to users; stop when the application stops."""
    orch = app[ORCH]
    accesses = app[ACCESSES] = Accesses(orch.users)
    orch.log.subscribe(accesses.evolve, Users.READS)

    async def detach(_: web.Application) -> None:
        orch.log.unsubscribe(accesses.evolve)

    app.on_cleanup.append(detach)


def opened_with(request: web.Request, allows: Allows = anyone) -> Access:
    """The access of the stream ``request`` opens; ``watch`` it once its stream is ready
    to be ended (``on_end``)."""
    return Access(request[TOKEN_SHA256], current_user(request), allows)


def watch(request: web.Request, access: Access) -> None:
    """Check ``access`` on every change to users from now on, and at once (it may end
    here: see ``Access.ended``). Pair with ``unwatch``."""
    request.app[ACCESSES].watch(access)


def unwatch(request: web.Request, access: Access) -> None:
    request.app[ACCESSES].unwatch(access)


def revoked_body(access: Access, **extra: Any) -> dict[str, Any]:
    """The data of a stream's last event once its access has ended."""
    return {"reason": access.ended, **extra}
