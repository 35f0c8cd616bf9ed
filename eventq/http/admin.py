"""``/api/admin/users``: users, levels, teams and tokens (admins only)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from eventq import events as ev
from eventq.actors.registry import AddUser, DeleteUser, IssueToken, RevokeTokens, UpdateUser
from eventq.auth import User
from eventq.http import bounds as b
from eventq.http.common import ORCH, ApiError, decode_body, require_admin

routes = web.RouteTableDef()

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=b.PRINTABLE)]


class NewUser(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    level: ev.Level = ev.Level.RESEARCHER
    team: b.Team | None = None


class UserChange(msgspec.Struct, forbid_unknown_fields=True):
    level: ev.Level | None = None
    team: b.Team | None = None


def user_dict(user: User, tokens: int) -> dict[str, Any]:
    return {"name": user.name, "level": user.level.value, "team": user.team, "tokens": tokens}


async def _registry(request: web.Request, message: Any) -> str | None:
    outcome, token = await request.app[ORCH].registry.ask(message)
    if outcome.durable is not None:
        await outcome.durable
    return token  # type: ignore[no-any-return]


@routes.get("/api/admin/users")
async def list_users(request: web.Request) -> web.Response:
    require_admin(request)
    users = request.app[ORCH].users
    return web.json_response({"users": [user_dict(u, users.token_count(u.name))
                                        for u in users.by_name.values()]})


@routes.post("/api/admin/users")
async def add_user(request: web.Request) -> web.Response:
    admin = require_admin(request)
    body = decode_body(await request.read(), NewUser)
    token = await _registry(request, AddUser(admin.principal, body.name, body.level, body.team))
    users = request.app[ORCH].users
    return web.json_response({**user_dict(users.by_name[body.name], 1), "token": token},
                             status=201)


def _known(request: web.Request) -> User:
    name = request.match_info["name"]
    user = request.app[ORCH].users.by_name.get(name)
    if user is None:
        raise ApiError(404, f"no user {name}")
    return user


@routes.patch("/api/admin/users/{name}")
async def change_user(request: web.Request) -> web.Response:
    admin, user = require_admin(request), _known(request)
    body = decode_body(await request.read(), UserChange)
    level = body.level or user.level
    team = body.team if body.team is not None else user.team
    await _registry(request, UpdateUser(admin.principal, user.name, level, team or None))
    users = request.app[ORCH].users
    return web.json_response(user_dict(users.by_name[user.name], users.token_count(user.name)))


@routes.delete("/api/admin/users/{name}")
async def delete_user(request: web.Request) -> web.Response:
    admin, user = require_admin(request), _known(request)
    await _registry(request, DeleteUser(admin.principal, user.name))
    return web.json_response({"success": True, "name": user.name, "deleted": True})


@routes.post("/api/admin/users/{name}/tokens")
async def issue_token(request: web.Request) -> web.Response:
    admin, user = require_admin(request), _known(request)
    token = await _registry(request, IssueToken(admin.principal, user.name))
    return web.json_response({"name": user.name, "token": token}, status=201)


@routes.delete("/api/admin/users/{name}/tokens")
async def revoke_tokens(request: web.Request) -> web.Response:
    admin, user = require_admin(request), _known(request)
    await _registry(request, RevokeTokens(admin.principal, user.name))
    return web.json_response({"success": True, "name": user.name, "tokens": 0})
