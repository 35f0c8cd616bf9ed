"""Users and their tokens, folded from events. Tokens are stored only as SHA-256."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from eventq import events as ev
from eventq.log import Record

TOKEN_FILE = "admin.token"


@dataclass(frozen=True)
class User:
    name: str
    level: ev.Level
    team: str | None

    @property
    def principal(self) -> str:
        return f"user:{self.name}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str = "eq") -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


@dataclass
class Users:
    """Users by token hash; lookups compare in constant time."""

    by_hash: dict[str, User] = field(default_factory=dict)
    by_name: dict[str, User] = field(default_factory=dict)

    def evolve(self, record: Record) -> None:
        e = record.event
        if isinstance(e, ev.UserCreated):
            user = User(e.name, e.level, e.team)
            self.by_hash[e.token_sha256] = user
            self.by_name[e.name] = user

    def authenticate(self, token: str) -> User | None:
        digest = token_hash(token)
        found = None
        for stored, user in self.by_hash.items():
            if hmac.compare_digest(stored, digest):
                found = user
        return found


def write_secret(path: Path, text: str) -> None:
    """Write a file readable only by its owner (0600), atomically."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
