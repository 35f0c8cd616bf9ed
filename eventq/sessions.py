"""Browser sessions, folded from events: a session is valid only while everything that
vouched for it still holds (SPEC 8).

A session is opened with a token (or a one-time code made with one) and records that
token's SHA-256 and its user's level then. ``holder`` answers, at each request, whether it
still stands: not signed out, not expired (a fixed end, never extended by use), its token
still live (a revocation, or the user's removal, ends it), and its user not demoted below
the level it was opened at (a page that shows admin controls must not outlive the admin).
Nothing but the log decides it, so a session survives a restart and ends the same way.

Sessions are events, not memory: a sign-in is a security-relevant action (SPEC 8: the
audit trail is the log), and one row per sign-in and sign-out keeps the log bounded. The
cookie itself is never stored: only its SHA-256.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import msgspec

from eventq import events as ev
from eventq.actors.scheduler import CommandError
from eventq.auth import User, Users

if TYPE_CHECKING:  # annotations only
    from eventq.log import Record

#: A session lasts this long from its sign-in, however it is used (12 hours).
LIFETIME_SECONDS = 12 * 3600.0
#: Levels in order: a session ends when its user falls below the level it was opened at.
RANK = {ev.Level.VIEWER: 0, ev.Level.RESEARCHER: 1, ev.Level.LEAD: 2, ev.Level.ADMIN: 3}


@dataclass(frozen=True)
class Session:
    name: str
    level: ev.Level
    token_sha256: str
    expires_at: float


@dataclass
class Sessions:
    """Open sessions by the SHA-256 of their cookie."""

    READS: ClassVar[frozenset[type]] = frozenset({ev.SessionOpened, ev.SessionEnded})

    by_digest: dict[str, Session] = field(default_factory=dict)

    def evolve(self, record: Record) -> None:
        e = record.event
        if isinstance(e, ev.SessionOpened):
            # Expired sessions are forgotten as new ones open: the map stays as small as
            # the sessions that could still be used.
            self.by_digest = {d: s for d, s in self.by_digest.items()
                              if s.expires_at > record.time}
            self.by_digest[e.session_sha256] = Session(e.name, e.level, e.token_sha256,
                                                       e.expires_at)
        elif isinstance(e, ev.SessionEnded):
            self.by_digest.pop(e.session_sha256, None)

    def holder(self, digest: str, now: float, users: Users) -> User | None:
        """The user of the session with this cookie digest as they are now; None if the
        session ended, expired, lost its token, or its user was demoted."""
        user, _ = self.standing(digest, now, users)
        return user

    def standing(self, digest: str, now: float,
                 users: Users) -> tuple[User | None, str | None]:
        """(its user, None) while the session stands; (None, why) once it has ended."""
        session = self.by_digest.get(digest)
        if session is None:
            return None, ENDED
        if now >= session.expires_at:
            return None, EXPIRED
        user = users.holder(session.token_sha256)
        if user is None or user.name != session.name:
            return None, REVOKED
        if RANK[user.level] < RANK[session.level]:
            return None, DEMOTED.format(was=session.level, now=user.level)
        return user, None

    def session(self, digest: str) -> Session | None:
        return self.by_digest.get(digest)


ENDED = "no such session (signed out, or never signed in); sign in again"
EXPIRED = "the session has expired; sign in again"
REVOKED = "the token this session was opened with is no longer valid (revoked)"
DEMOTED = "the session's user is no longer {was} (now {now}); sign in again"


class OpenSession(msgspec.Struct, frozen=True):
    """Sign in: ``session_sha256`` is the digest of a cookie made at the edge (the secret
    never reaches the registry), ``token_sha256`` that of the token that vouches for it (the
    one sent, or the one a sign-in code was made with)."""

    session_sha256: str
    token_sha256: str
    via: Literal["token", "code"]


class EndSession(msgspec.Struct, frozen=True):
    principal: str
    session_sha256: str
    reason: str = "signed out"


def decide_session(users: Users, sessions: Sessions, cmd: OpenSession | EndSession,
                   now: float) -> tuple[str, list[ev.Event]]:
    """(principal, events): a session for the token's user, or the end of one that is
    open (ending one that is not is nothing)."""
    if isinstance(cmd, EndSession):
        if sessions.session(cmd.session_sha256) is None:
            return cmd.principal, []
        return cmd.principal, [ev.SessionEnded(session_sha256=cmd.session_sha256,
                                               reason=cmd.reason)]
    user = users.holder(cmd.token_sha256)
    if user is None:
        raise CommandError(401, "invalid or revoked token")
    return user.principal, [ev.SessionOpened(
        session_sha256=cmd.session_sha256, name=user.name, level=user.level,
        token_sha256=cmd.token_sha256, expires_at=now + LIFETIME_SECONDS, via=cmd.via)]
