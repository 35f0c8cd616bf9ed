"""``/api/session``: the web page signs in once and then holds only a cookie (SPEC 8).

The page never keeps a token: it sends one (or a one-time code ``eventq ui`` printed) to
``POST /api/session`` and gets an HttpOnly, ``SameSite=Strict`` cookie, ``Secure`` over
TLS, that only the server can read. The cookie is random; the log keeps its SHA-256
(``SessionOpened``), so a session survives a restart and every sign-in is in the audit
trail. How a cookie authenticates a request, and the ``Origin`` rule for requests that
change something, are in ``eventq/http/app.py`` (``session_user``); when a session ends,
its streams end (``eventq/http/access.py``).

A sign-in code is made by a signed-in caller for themselves (``POST /api/session/code``,
what ``eventq ui`` does with the local admin's token) and kept in memory only, as its
SHA-256: single use, valid for five minutes, and bound to the token that made it, so
the session it opens ends when that token is revoked. A restart forgets the codes, which
costs one more ``eventq ui``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from eventq.auth import User, token_hash
from eventq.http.app import (
    ORCH,
    SESSION_COOKIE,
    TOKEN_SHA256,
    ApiError,
    current_user,
    decode_body,
    own_origin,
    same_origin,
)
from eventq.sessions import EndSession, OpenSession, Session

routes = web.RouteTableDef()

#: A sign-in code is good for this long, once.
CODE_SECONDS = 300.0
Secret = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class SignIn(msgspec.Struct, forbid_unknown_fields=True):
    """A user's (or the admin's) API token, or a one-time sign-in code: exactly one."""

    token: Secret | None = None
    code: Secret | None = None


@dataclass
class SignInCodes:
    """Unused codes by their SHA-256: (the maker's token digest, when it expires)."""

    codes: dict[str, tuple[str, float]] = field(default_factory=dict)

    def make(self, token_sha256: str, now: float) -> tuple[str, float]:
        self.codes = {d: c for d, c in self.codes.items() if c[1] > now}
        code, expires = secrets.token_urlsafe(24), now + CODE_SECONDS
        self.codes[token_hash(code)] = (token_sha256, expires)
        return code, expires

    def redeem(self, code: str, now: float) -> str | None:
        """The maker's token digest; None if the code is unknown, used or expired. A code
        is spent by its first use, whatever comes of it."""
        found = self.codes.pop(token_hash(code), None)
        if found is None or found[1] <= now:
            return None
        return found[0]


CODES = web.AppKey("sign_in_codes", SignInCodes)


def setup(app: web.Application) -> None:
    app[CODES] = SignInCodes()
    app.add_routes(routes)


def session_body(user: User, session: Session) -> dict[str, Any]:
    """Who is signed in, at their level now (a promotion shows at once), and until when."""
    return {"user": user.name, "level": user.level.value, "expires_at": session.expires_at}


def _vouching_token(request: web.Request,
                    body: SignIn) -> tuple[str, Literal["token", "code"]]:
    """(the digest of the token that vouches for the session, how it was shown)."""
    if (body.token is None) == (body.code is None):
        raise ApiError(422, "send either token or code", "token")
    if body.token is not None:
        return token_hash(body.token), "token"
    assert body.code is not None
    orch = request.app[ORCH]
    maker = request.app[CODES].redeem(body.code, orch.clock.now())
    if maker is None:
        raise ApiError(401, "unknown, used or expired sign-in code; run `eventq ui` again")
    return maker, "code"


@routes.post("/api/session")
async def sign_in(request: web.Request) -> web.Response:
    # A page of another site must not sign a browser in as someone else either.
    if "Origin" in request.headers and not same_origin(request):
        raise ApiError(403, f"sign in from this server's own page (Origin {own_origin(request)})")
    body = decode_body(await request.read(), SignIn)
    orch = request.app[ORCH]
    token_sha256, via = _vouching_token(request, body)
    cookie = secrets.token_urlsafe(32)
    digest = token_hash(cookie)
    outcome, _ = await orch.registry.ask(OpenSession(digest, token_sha256, via))
    await outcome.durable
    session = orch.sessions.session(digest)
    user = orch.users.by_name.get(session.name) if session is not None else None
    assert session is not None and user is not None
    resp = web.json_response(session_body(user, session))
    resp.set_cookie(SESSION_COOKIE, cookie, path="/", httponly=True, samesite="Strict",
                    secure=request.secure or None,
                    max_age=max(1, int(session.expires_at - orch.clock.now())))
    return resp


def _cookie_session(request: web.Request) -> tuple[str, User, Session] | None:
    """The digest, user and session of the request's cookie, while the session stands."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    orch, digest = request.app[ORCH], token_hash(cookie)
    user, _ = orch.sessions.standing(digest, orch.clock.now(), orch.users)
    session = orch.sessions.session(digest)
    return (digest, user, session) if user is not None and session is not None else None


@routes.get("/api/session")
async def who_am_i(request: web.Request) -> web.Response:
    found = _cookie_session(request)
    if found is None:
        raise ApiError(401, "not signed in (no session cookie, or its session has ended)")
    return web.json_response(session_body(found[1], found[2]))


@routes.delete("/api/session")
async def sign_out(request: web.Request) -> web.Response:
    """Ends the cookie's session at once (its streams close); without one, nothing to do."""
    found = _cookie_session(request)
    if found is not None:
        if not same_origin(request):
            raise ApiError(403, "sign out from this server's own page "
                                f"(Origin {own_origin(request)})")
        orch = request.app[ORCH]
        outcome, _ = await orch.registry.ask(
            EndSession(found[1].principal, found[0]))
        await outcome.durable
    resp = web.Response(status=204)
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp


@routes.post("/api/session/code")
async def make_code(request: web.Request) -> web.Response:
    """A one-time sign-in code for the caller, for a browser (``eventq ui``)."""
    user = current_user(request)
    orch = request.app[ORCH]
    code, expires = request.app[CODES].make(request[TOKEN_SHA256], orch.clock.now())
    return web.json_response({"code": code, "expires_at": expires, "user": user.name,
                              "link": f"/#signin={code}"}, status=201)
