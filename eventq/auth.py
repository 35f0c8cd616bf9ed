"""Users and their tokens, folded from events. Tokens are stored only as SHA-256."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from eventq import events as ev
from eventq.paths import TOKEN_FILE as TOKEN_FILE  # the CLI reads it without this module

if TYPE_CHECKING:  # annotations only: the log (asyncio, aiosqlite) is not needed to fold users
    from eventq.log import Record


@dataclass(frozen=True)
class User:
    name: str
    level: ev.Level
    team: str | None

    @property
    def principal(self) -> str:
        return f"user:{self.name}"


def may_act_for(user: User, owner: str) -> bool:
    """A job's owner or an admin (SPEC 8): who may see a job's details and act on it."""
    return user.name == owner or user.level == ev.Level.ADMIN


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str = "eq") -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


#: The prefix of a worker array's secret (``eventq worker --slurm`` derives its token).
ARRAY_PREFIX = "wa_"


def task_token(array_secret: str, task: int) -> str:
    """The worker token of one task of an array: HMAC of the array's secret and the task's
    number. The server keeps only each task's hash; a task's token opens only its worker."""
    digest = hmac.new(array_secret.encode(), f"eventq task {task}".encode(), hashlib.sha256)
    return "wt_" + base64.urlsafe_b64encode(digest.digest()).decode().rstrip("=")


_USER_EVENTS = frozenset({ev.UserCreated, ev.UserUpdated, ev.UserDeleted, ev.TokenIssued,
                          ev.TokenRevoked})


@dataclass
class TokenIndex:
    """Live token hashes (SHA-256, hex) and whom each opens: a user's name, a worker's id.

    A hash is found by its first 64 bits, then compared whole in constant time: a lookup
    costs the same with 2 tokens or 10,000, and its timing could tell only where the hash
    of a random token falls, which helps no one make one."""

    #: Hex digits of a hash that find its candidates (64 bits: one candidate, in practice).
    PREFIX: ClassVar[int] = 16

    owner: dict[str, str] = field(default_factory=dict)
    #: The first PREFIX hex digits of each live hash -> the hashes that start so.
    by_prefix: dict[str, list[str]] = field(default_factory=dict)

    def add(self, digest: str, owner: str) -> None:
        self.owner[digest] = owner
        self.by_prefix.setdefault(digest[:self.PREFIX], []).append(digest)

    def discard(self, digest: str) -> None:
        if self.owner.pop(digest, None) is None:
            return
        prefix = digest[:self.PREFIX]
        rest = [d for d in self.by_prefix.get(prefix, ()) if d != digest]
        if rest:
            self.by_prefix[prefix] = rest
        else:
            self.by_prefix.pop(prefix, None)

    def find(self, digest: str) -> str | None:
        """Whom the token with this hash opens; None if no live token has it."""
        for stored in self.by_prefix.get(digest[:self.PREFIX], ()):
            if hmac.compare_digest(stored, digest):
                return self.owner[stored]
        return None


@dataclass
class Users:
    """Users and their live tokens (by SHA-256), folded from events."""

    READS: ClassVar[frozenset[type]] = _USER_EVENTS
    PREFIX: ClassVar[int] = TokenIndex.PREFIX

    by_name: dict[str, User] = field(default_factory=dict)
    #: Live token hashes -> user name.
    index: TokenIndex = field(default_factory=TokenIndex)

    @property
    def tokens(self) -> dict[str, str]:
        """Live token hash -> user name."""
        return self.index.owner

    def evolve(self, record: Record) -> None:
        e = record.event
        if type(e) not in _USER_EVENTS:
            return
        if isinstance(e, ev.UserCreated | ev.UserUpdated):
            self.by_name[e.name] = User(e.name, e.level, e.team)
        if isinstance(e, ev.UserCreated | ev.TokenIssued):
            self.index.add(e.token_sha256, e.name)
        elif isinstance(e, ev.TokenRevoked):
            self._revoke(e.name, e.token_sha256)
        elif isinstance(e, ev.UserDeleted):
            self.by_name.pop(e.name, None)
            self._revoke(e.name, None)

    def _revoke(self, name: str, digest: str | None) -> None:
        """Forget one token of ``name`` (by its hash), or every one when ``digest`` is None."""
        if digest is not None:
            if self.tokens.get(digest) == name:
                self.index.discard(digest)
            return
        for held in [h for h, n in self.tokens.items() if n == name]:
            self.index.discard(held)

    def authenticate(self, token: str) -> User | None:
        """The user a token belongs to; None if unknown or revoked."""
        return self.holder(token_hash(token))

    def holder(self, digest: str) -> User | None:
        """The user of the token with this SHA-256 (hex) as they are now; None if no live
        token has it (``TokenIndex.find``)."""
        name = self.index.find(digest)
        return None if name is None else self.by_name.get(name)

    def token_count(self, name: str) -> int:
        return sum(1 for n in self.tokens.values() if n == name)


def write_secret(path: Path, text: str) -> None:
    """Write a file readable only by its owner (0600), atomically."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
