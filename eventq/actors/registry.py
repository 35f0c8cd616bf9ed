"""The registry: the single owner of users and their tokens (workers join it later).

Tokens are random, made at the edge, shown once, and only their SHA-256 is recorded.
"""

from __future__ import annotations

import re

import msgspec

from eventq import events as ev
from eventq.actors.runtime import Actor
from eventq.actors.scheduler import CommandError, Outcome
from eventq.auth import Users, new_token, token_hash
from eventq.log import EventLog

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class AddUser(msgspec.Struct, frozen=True):
    principal: str
    name: str
    level: ev.Level
    team: str | None = None


class UpdateUser(msgspec.Struct, frozen=True):
    principal: str
    name: str
    level: ev.Level
    team: str | None = None


class IssueToken(msgspec.Struct, frozen=True):
    principal: str
    name: str


class RevokeTokens(msgspec.Struct, frozen=True):
    """Revoke one token (by its hash) or, with None, every token of the user."""

    principal: str
    name: str
    token_sha256: str | None = None


RegistryMsg = AddUser | UpdateUser | IssueToken | RevokeTokens


def decide_user(users: Users, cmd: AddUser | UpdateUser, digest: str) -> list[ev.Event]:
    if isinstance(cmd, AddUser):
        if not NAME.match(cmd.name):
            raise CommandError(422, f"user name {cmd.name!r} must be 1-64 of a-z 0-9 _ . -")
        if cmd.name in users.by_name:
            raise CommandError(409, f"user {cmd.name} already exists")
        return [ev.UserCreated(name=cmd.name, level=cmd.level, team=cmd.team,
                               token_sha256=digest)]
    if cmd.name not in users.by_name:
        raise CommandError(404, f"no user {cmd.name}")
    return [ev.UserUpdated(name=cmd.name, level=cmd.level, team=cmd.team)]


def decide_token(users: Users, cmd: IssueToken | RevokeTokens, digest: str) -> list[ev.Event]:
    if cmd.name not in users.by_name:
        raise CommandError(404, f"no user {cmd.name}")
    if isinstance(cmd, IssueToken):
        return [ev.TokenIssued(name=cmd.name, token_sha256=digest)]
    if cmd.token_sha256 is not None and users.tokens.get(cmd.token_sha256) != cmd.name:
        raise CommandError(404, f"user {cmd.name} has no such token")
    return [ev.TokenRevoked(name=cmd.name, token_sha256=cmd.token_sha256)]


class Registry(Actor[RegistryMsg]):
    """Answers with (Outcome, token or None); the token is shown once and never stored."""

    name = "registry"

    def __init__(self, log: EventLog, users: Users) -> None:
        super().__init__()
        self.log, self.users = log, users

    async def receive(self, message: RegistryMsg) -> tuple[Outcome, str | None]:
        token = new_token() if isinstance(message, AddUser | IssueToken) else None
        digest = token_hash(token) if token else ""
        if isinstance(message, AddUser | UpdateUser):
            events = decide_user(self.users, message, digest)
        else:
            events = decide_token(self.users, message, digest)
        appended = self.log.append(message.principal, events)
        return Outcome(events, appended.durable), token
