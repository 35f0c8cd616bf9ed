"""What every route module shares: the app's keys, authentication (bearer token or session
cookie, and the Origin check), the JSON error replies, and decoding bodies.

Route modules import from here and ``app.py`` imports the route modules: the package has no
import circle."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web
from yarl import URL

from eventq.actors.scheduler import CommandError
from eventq.auth import User, may_act_for, token_hash
from eventq.events import Level
from eventq.http.bounds import JSON_DEPTH, PATTERN_WORDS
from eventq.server import Orchestrator

ORCH = web.AppKey("orchestrator", Orchestrator)
USER = web.RequestKey("user", User)
#: The SHA-256 of the token the request was made with: a stream lives only while it is valid.
TOKEN_SHA256 = web.RequestKey("token_sha256", str)
#: The SHA-256 of the session cookie the request was made with, if it was (the web page).
SESSION_SHA256 = web.RequestKey("session_sha256", str)
#: The web page's session cookie (``eventq/http/session.py`` sets it).
SESSION_COOKIE = "eventq_session"
#: Methods that change something: with a session cookie, only from the server's own origin.
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
T = TypeVar("T")
log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Reachable without a token: the API's description holds no data; signing in and out
#: checks its own credentials (``eventq/http/session.py``).
PUBLIC = frozenset({"/api/openapi.json", "/api/session", "/"})
#: The web page's own files (``eventq/http/ui.py``): public, as the page itself is.
PAGE_FILES = "/ui/"
#: The paths an app answers without a token: PUBLIC, and /metrics with --metrics-public.
OPEN_PATHS = web.AppKey("open_paths", frozenset[str])
_FIELD = re.compile(r"`\$\.([^`\[]+)")


class ApiError(Exception):
    """Answered as ``{"error": message, "field": field, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.detail = status, message, field, detail

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.detail is not None:
            body["detail"] = self.detail
        return web.json_response(body, status=self.status)


def validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> ApiError:
    """msgspec says ``Expected `int`, got `str` - at `$.gpus```: name the field, and say
    what is wrong in words (a limit, or what a pattern forbids)."""
    text = str(exc)
    match = _FIELD.search(text)
    # ValidationError is a DecodeError too: only a real decode failure is "not JSON".
    if not isinstance(exc, msgspec.ValidationError) and match is None:
        return ApiError(422, "request body is not valid JSON", detail=text)
    field = match[1] if match else None
    if field is None and "unknown field" in text:
        field = text.split("`")[1]
    if field is None and "missing required field" in text:
        field = text.split("`")[1]
    if not field:
        return ApiError(422, "invalid request", None, text)
    return ApiError(422, f"invalid field {field}: {_in_words(text)}", field, text)


def _in_words(text: str) -> str:
    what = text.split(" - at `")[0]
    for pattern, words in PATTERN_WORDS.items():
        if f"matching regex {pattern!r}" in what:
            return words
    return what


def decode_body(raw: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise ApiError(422, "request body is nested too deeply to read (free JSON fields "
                            f"may nest at most {JSON_DEPTH} levels)") from None


def current_user(request: web.Request) -> User:
    return request[USER]


def require_admin(request: web.Request) -> User:
    user = current_user(request)
    if user.level != Level.ADMIN:
        raise ApiError(403, "only admins may do this")
    return user


def require_owner(request: web.Request, owner: str, doing: str) -> User:
    """The job's owner or an admin (SPEC 8)."""
    user = current_user(request)
    if not may_act_for(user, owner):
        raise ApiError(403, only_owner(doing))
    return user


def only_owner(doing: str) -> str:
    return f"only the job's owner or an admin may {doing}"


#: Worker routes authenticate with X-Worker-Token themselves; user tokens open none.
WORKER_ROUTES = "/api/workers/"


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate the caller, and answer every refusal as JSON. One middleware rather
    than two: each is one more coroutine on every request."""
    try:
        path = request.path
        if path not in request.app[OPEN_PATHS] and not path.startswith((WORKER_ROUTES, PAGE_FILES)):
            request[USER] = authenticate(request)
        return await handler(request)
    except ApiError as exc:
        if exc.status in (401, 403):
            refused(request, exc)
        return exc.response()
    except CommandError as exc:
        return ApiError(exc.status, exc.message, exc.field).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # The router's own refusals (404, 405, 413, a websocket route without upgrade)
        # are JSON too (SPEC 10); a 405 keeps its Allow header (RFC 9110).
        refusal = ApiError(exc.status, exc.reason or "request refused").response()
        if "Allow" in exc.headers:
            refusal.headers["Allow"] = exc.headers["Allow"]
        return refusal


def refused(request: web.Request, exc: ApiError) -> None:
    """One line per refused token or role, for whoever watches who knocks: the route and
    the peer, never the token."""
    user = request.get(USER)
    resource = request.match_info.route.resource
    log.warning("request_refused", status=exc.status, method=request.method,
                route=resource.canonical if resource is not None else None, path=request.path,
                peer=request.remote, user=user.name if user is not None else None,
                reason=exc.message)


def authenticate(request: web.Request) -> User:
    """The user of the request's bearer token, or of its session cookie when it has no
    Authorization header (public and worker routes need neither)."""
    header = request.headers.get("Authorization")
    if header is None and SESSION_COOKIE in request.cookies:
        return session_user(request)
    header = header or ""
    if not header.startswith("Bearer "):
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>) or "
                            "session cookie")
    digest = token_hash(header.removeprefix("Bearer ").strip())
    user = request.app[ORCH].users.holder(digest)
    if user is None:
        raise ApiError(401, "invalid or revoked token")
    request[TOKEN_SHA256] = digest
    return user


def session_user(request: web.Request) -> User:
    """The user of the request's session cookie while its session stands. A browser sends
    the cookie with whatever a page of any site makes it send, so a request that changes
    something must come from the server's own origin (the page served here)."""
    orch = request.app[ORCH]
    digest = token_hash(request.cookies[SESSION_COOKIE])
    user, why = orch.sessions.standing(digest, orch.clock.now(), orch.users)
    if user is None:
        raise ApiError(401, why or "no session")
    if request.method in UNSAFE and not same_origin(request):
        raise ApiError(403, "a request that changes something with a session cookie must "
                            f"come from this server's own page (Origin {own_origin(request)})")
    request[TOKEN_SHA256] = orch.sessions.by_digest[digest].token_sha256
    request[SESSION_SHA256] = digest
    return user


def own_origin(request: web.Request) -> str:
    """scheme://host:port as this request reached the server."""
    return f"{request.scheme}://{request.host}"


def same_origin(request: web.Request) -> bool:
    """Does the request's ``Origin`` header name this server as the request reached it?
    Absent, ``null`` or anything unreadable is not."""
    origin = request.headers.get("Origin")
    if not origin:
        return False
    try:
        theirs, ours = URL(origin), URL(own_origin(request))
        return theirs.path in ("", "/") and not theirs.query_string and \
            (theirs.scheme, theirs.host, theirs.port) == (ours.scheme, ours.host, ours.port)
    except (ValueError, TypeError):
        return False
