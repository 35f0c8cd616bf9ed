"""The web page's session: a browser signs in once and then holds only a cookie.

Each test is a browser's story against a real server on loopback, with a real cookie jar
(aiohttp's): the cookie is set by the server's reply and sent back by the jar, never by
hand, except where a test keeps a copy to show that an ended session's cookie is refused.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq.clock import SimClock
from eventq.http.app import make_app
from eventq.server import Orchestrator
from eventq.sessions import LIFETIME_SECONDS
from tests.serverproc import EVENTQ, clean_env, wait_until
from tests.test_stream import frames_until, next_frame, parked

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MakeOrch = Callable[..., Awaitable[Orchestrator]]
COOKIE = "eventq_session"


class Browser:
    """What the page does: a cookie jar, and the ``Origin`` of the server's own page on
    every request that changes something (as a browser sends it)."""

    def __init__(self, api: TestClient[Any, Any]) -> None:
        self.api = api
        self.origin = str(api.make_url("/")).rstrip("/")
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    def url(self, path: str) -> str:
        return str(self.api.make_url(path))

    async def sign_in(self, **body: str) -> aiohttp.ClientResponse:
        return await self.session.post(self.url("/api/session"), json=body,
                                       headers={"Origin": self.origin})

    async def get(self, path: str) -> aiohttp.ClientResponse:
        return await self.session.get(self.url(path))

    async def send(self, method: str, path: str, origin: str | None = "own",
                   **kw: Any) -> aiohttp.ClientResponse:
        headers = {} if origin is None else {"Origin": self.origin if origin == "own" else origin}
        return await self.session.request(method, self.url(path), headers=headers, **kw)

    def cookie(self) -> str:
        found = {c.key: c.value for c in self.session.cookie_jar}
        return found[COOKIE]


@pytest.fixture
async def server(orch: Orchestrator, aiohttp_client: AiohttpClient) -> TestClient[Any, Any]:
    """The server, and a client that sends no credentials of its own."""
    return await aiohttp_client(make_app(orch))


@pytest.fixture
async def browser(server: TestClient[Any, Any]) -> AsyncIterator[Browser]:
    made = Browser(server)
    try:
        yield made
    finally:
        await made.close()


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def admin_call(server: TestClient[Any, Any], orch: Orchestrator, method: str, path: str,
                     **kw: Any) -> aiohttp.ClientResponse:
    resp = await server.request(method, path, headers=bearer(orch.admin_token), **kw)
    assert resp.status < 300, await resp.text()
    return resp


async def test_a_browser_signs_in_with_a_token_and_then_uses_only_its_cookie(
        orch: Orchestrator, browser: Browser, clock: SimClock) -> None:
    alice = orch.add_user("alice", ev.Level.RESEARCHER)
    signed = await browser.sign_in(token=alice)
    assert signed.status == 200, await signed.text()
    assert await signed.json() == {"user": "alice", "level": "researcher",
                                   "expires_at": clock.now() + LIFETIME_SECONDS}
    set_cookie = signed.headers["Set-Cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in set_cookie, set_cookie
    assert "Secure" not in set_cookie  # plain HTTP on loopback: a Secure cookie never returns

    me = await browser.get("/api/queue/me")
    assert me.status == 200 and (await me.json())["user"] == "alice"
    assert (await (await browser.get("/api/session")).json())["user"] == "alice"
    submitted = await browser.send("POST", "/api/queue/submit", json=parked())
    assert submitted.status == 200 and orch.state.jobs[(await submitted.json())["job_id"]] \
        .spec.user == "alice"

    cookie = browser.cookie()
    opened = [r for r in await orch.log.read() if isinstance(r.event, ev.SessionOpened)]
    assert [r.event.session_sha256 for r in opened] == [  # type: ignore[union-attr]
        hashlib.sha256(cookie.encode()).hexdigest()], "only the cookie's hash is recorded"
    assert opened[0].principal == "user:alice"
    raw = sqlite_bytes(orch)
    assert cookie.encode() not in raw and alice.encode() not in raw


def sqlite_bytes(orch: Orchestrator) -> bytes:
    """Every byte of the log's files, as a thief of the disk would read them."""
    files = [orch.log.path, orch.log.path.with_name(orch.log.path.name + "-wal")]
    return b"".join(f.read_bytes() for f in files if f.exists())


async def test_a_bad_token_or_code_gets_json_refusals_and_records_nothing(
        orch: Orchestrator, browser: Browser) -> None:
    before = orch.log.head_seq
    for body, status, words in (({"token": "eq_not-a-token"}, 401, "invalid or revoked"),
                                ({"code": "nope"}, 401, "sign-in code"),
                                ({}, 422, "either token or code"),
                                ({"token": "a", "code": "b"}, 422, "either token or code")):
        resp = await browser.sign_in(**body)
        assert resp.status == status and words in (await resp.json())["error"], body
        assert COOKIE not in resp.cookies
    assert (await browser.get("/api/session")).status == 401
    no_cookie = await browser.get("/api/queue")
    assert no_cookie.status == 401 and "session cookie" in (await no_cookie.json())["error"]
    assert orch.log.head_seq == before


async def test_with_a_cookie_only_the_servers_own_page_may_change_anything(
        orch: Orchestrator, browser: Browser, server: TestClient[Any, Any]) -> None:
    """A forged request (a form on another site, a script without Origin) is refused; a
    bearer token is unaffected."""
    assert (await browser.sign_in(token=orch.admin_token or "")).status == 200
    before = orch.log.head_seq
    for origin in (None, "http://evil.example", "null", browser.origin.replace("http:", "https:"),
                   browser.origin + "/page"):
        forged = await browser.send("POST", "/api/queue/submit", origin=origin, json=parked())
        assert forged.status == 403, origin
        assert "own page" in (await forged.json())["error"]
        assert (await browser.send("POST", "/api/queue/concurrency", origin=origin,
                                   json={"max_concurrent": 1})).status == 403
    assert orch.log.head_seq == before, "a refused request recorded something"

    assert (await browser.send("GET", "/api/queue", origin=None)).status == 200
    own = await browser.send("POST", "/api/queue/submit", json=parked())
    assert own.status == 200, await own.text()
    tokened = await server.post("/api/queue/submit", json=parked(),
                                headers=bearer(orch.admin_token))
    assert tokened.status == 200


async def test_a_sign_in_from_another_sites_page_is_refused(
        orch: Orchestrator, browser: Browser) -> None:
    alice = orch.add_user("alice", ev.Level.RESEARCHER)
    before = orch.log.head_seq
    forged = await browser.session.post(browser.url("/api/session"), json={"token": alice},
                                        headers={"Origin": "http://evil.example"})
    assert forged.status == 403 and COOKIE not in forged.cookies
    assert orch.log.head_seq == before


async def test_signing_out_ends_the_session_at_once_and_closes_its_stream(
        orch: Orchestrator, browser: Browser) -> None:
    assert (await browser.sign_in(token=orch.admin_token or "")).status == 200
    cookie = browser.cookie()
    stream = await browser.get("/api/events/stream")
    assert stream.status == 200
    await browser.send("POST", "/api/queue/submit", json=parked())
    await frames_until(stream, lambda f: f.event == "job_blocked")

    out = await browser.send("DELETE", "/api/session")
    assert out.status == 204
    last = await frames_until(stream, lambda f: f.event == "revoked")
    assert "signed out" in last[-1].data["reason"] and await next_frame(stream) is None
    assert (await browser.get("/api/session")).status == 401
    replayed = await browser.session.get(browser.url("/api/queue"),
                                         cookies={COOKIE: cookie})  # a copy kept by a thief
    assert replayed.status == 401 and "signed out" in (await replayed.json())["error"]
    ended = [r for r in await orch.log.read() if isinstance(r.event, ev.SessionEnded)]
    assert [r.principal for r in ended] == ["user:admin"]


async def test_a_forged_sign_out_is_refused(orch: Orchestrator, browser: Browser) -> None:
    assert (await browser.sign_in(token=orch.admin_token or "")).status == 200
    assert (await browser.send("DELETE", "/api/session", origin=None)).status == 403
    assert (await browser.get("/api/session")).status == 200


async def test_a_revoked_users_cookie_stream_closes_and_the_cookie_opens_nothing(
        orch: Orchestrator, browser: Browser, server: TestClient[Any, Any]) -> None:
    alice = orch.add_user("alice", ev.Level.RESEARCHER)
    assert (await browser.sign_in(token=alice)).status == 200
    stream = await browser.get("/api/events/stream")
    mine = await (await browser.send("POST", "/api/queue/submit", json=parked())).json()
    await frames_until(stream, lambda f: f.event == "job_blocked")

    await admin_call(server, orch, "DELETE", "/api/admin/users/alice/tokens")
    await admin_call(server, orch, "POST", f"/api/queue/{mine['job_id']}/approve")
    last = await frames_until(stream, lambda f: f.event in ("revoked", "job_approved"))
    assert [f.event for f in last] == ["revoked"], "nothing after the revocation but why"
    assert "revoked" in last[0].data["reason"] and await next_frame(stream) is None
    refused = await browser.get("/api/queue/me")
    assert refused.status == 401 and "revoked" in (await refused.json())["error"]


async def test_a_deleted_users_session_and_stream_end_and_the_deletion_outlives_a_restart(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    orch = await make_orch(data_dir=tmp_path / "data")
    server = await aiohttp_client(make_app(orch))
    alice = orch.add_user("alice", ev.Level.RESEARCHER)
    browser = Browser(server)
    try:
        assert (await browser.sign_in(token=alice)).status == 200
        stream = await browser.get("/api/events/stream")
        mine = await (await browser.send("POST", "/api/queue/submit", json=parked())).json()
        await frames_until(stream, lambda f: f.event == "job_blocked")

        busy = await server.delete("/api/admin/users/alice", headers=bearer(orch.admin_token))
        assert busy.status == 409 and "1 unfinished job" in (await busy.json())["error"]
        assert (await browser.get("/api/session")).status == 200, "a refusal changes nothing"
        await admin_call(server, orch, "POST",
                         f"/api/queue/{mine['job_id']}/reject?reason=not+this+week")
        await admin_call(server, orch, "DELETE", "/api/admin/users/alice")

        last = await frames_until(stream, lambda f: f.event == "revoked")
        assert "revoked" in last[-1].data["reason"] and await next_frame(stream) is None
        assert (await browser.get("/api/queue/me")).status == 401
        assert (await server.get("/api/queue/me", headers=bearer(alice))).status == 401
        users = await (await admin_call(server, orch, "GET", "/api/admin/users")).json()
        assert "alice" not in [u["name"] for u in users["users"]]
        cookie = browser.cookie()
    finally:
        await browser.close()
    await orch.stop()
    again = await make_orch(data_dir=tmp_path / "data")
    after = await aiohttp_client(make_app(again))
    assert (await after.get("/api/session", cookies={COOKIE: cookie})).status == 401
    assert (await after.get("/api/queue/me", headers=bearer(alice))).status == 401
    job = await (await after.get(f"/api/jobs/{mine['job_id']}",
                                 headers=bearer(again.admin_token))).json()
    assert job["user"] == "alice", "her finished jobs stay in the history"


async def test_deleting_oneself_or_no_one_is_refused(
        orch: Orchestrator, server: TestClient[Any, Any]) -> None:
    gone = await server.delete("/api/admin/users/nobody", headers=bearer(orch.admin_token))
    assert gone.status == 404 and "no user nobody" in (await gone.json())["error"]
    me = await server.delete("/api/admin/users/admin", headers=bearer(orch.admin_token))
    assert me.status == 409 and "yourself" in (await me.json())["error"]
    assert (await server.get("/api/queue", headers=bearer(orch.admin_token))).status == 200


async def test_a_demoted_users_session_ends_and_a_promoted_ones_goes_on(
        orch: Orchestrator, browser: Browser, server: TestClient[Any, Any]) -> None:
    """A page that shows admin controls must not outlive its user's admin rights."""
    orch.add_user("bob", ev.Level.RESEARCHER)
    carol = orch.add_user("carol", ev.Level.ADMIN)
    bob = (await (await admin_call(server, orch, "POST", "/api/admin/users/bob/tokens")).json())
    promoted = Browser(server)
    try:
        assert (await promoted.sign_in(token=bob["token"])).status == 200
        assert (await browser.sign_in(token=carol)).status == 200
        stream = await browser.get("/api/events/stream")

        await admin_call(server, orch, "PATCH", "/api/admin/users/bob", json={"level": "lead"})
        await admin_call(server, orch, "PATCH", "/api/admin/users/carol",
                         json={"level": "lead"})
        last = await frames_until(stream, lambda f: f.event == "revoked")
        assert "no longer admin" in last[-1].data["reason"]
        assert (await browser.get("/api/session")).status == 401
        assert (await (await promoted.get("/api/session")).json())["level"] == "lead"
    finally:
        await promoted.close()


async def test_a_session_lasts_twelve_hours_from_sign_in_however_it_is_used(
        orch: Orchestrator, browser: Browser, clock: SimClock) -> None:
    assert (await browser.sign_in(token=orch.admin_token or "")).status == 200
    stream = await browser.get("/api/events/stream")
    clock.advance(LIFETIME_SECONDS - 60)
    assert (await browser.get("/api/queue")).status == 200  # use does not extend it
    clock.advance(60)
    last = await frames_until(stream, lambda f: f.event == "revoked")
    assert "expired" in last[-1].data["reason"] and await next_frame(stream) is None
    expired = await browser.get("/api/queue")
    assert expired.status == 401 and "expired" in (await expired.json())["error"]


async def test_a_session_survives_a_restart_of_the_server(
        make_orch: MakeOrch, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    first = await make_orch(data_dir=tmp_path / "data")
    before = Browser(await aiohttp_client(make_app(first)))
    try:
        assert (await before.sign_in(token=first.admin_token or "")).status == 200
        cookie = before.cookie()
    finally:
        await before.close()
    await first.stop()
    second = await make_orch(data_dir=tmp_path / "data")
    after = await aiohttp_client(make_app(second))
    resp = await after.get("/api/session", cookies={COOKIE: cookie})
    assert resp.status == 200 and (await resp.json())["user"] == "admin"


async def test_a_sign_in_code_works_once_within_five_minutes(
        orch: Orchestrator, browser: Browser, server: TestClient[Any, Any],
        clock: SimClock) -> None:
    made = await admin_call(server, orch, "POST", "/api/session/code")
    code = await made.json()
    assert made.status == 201 and code["link"] == f"/#signin={code['code']}"
    assert code["user"] == "admin" and code["expires_at"] == clock.now() + 300

    signed = await browser.sign_in(code=code["code"])
    assert signed.status == 200 and (await signed.json())["user"] == "admin"
    again = await browser.sign_in(code=code["code"])
    assert again.status == 401, "a code signs in once"

    late = await (await admin_call(server, orch, "POST", "/api/session/code")).json()
    clock.advance(300)
    assert (await browser.sign_in(code=late["code"])).status == 401
    opened = [r.event for r in await orch.log.read() if isinstance(r.event, ev.SessionOpened)]
    assert [e.via for e in opened] == ["code"]


async def test_a_session_from_a_code_ends_when_the_makers_token_is_revoked(
        orch: Orchestrator, browser: Browser, server: TestClient[Any, Any]) -> None:
    alice = orch.add_user("alice", ev.Level.RESEARCHER)
    made = await server.post("/api/session/code", headers=bearer(alice))
    assert (await browser.sign_in(code=(await made.json())["code"])).status == 200
    assert (await browser.get("/api/queue/me")).status == 200
    await admin_call(server, orch, "DELETE", "/api/admin/users/alice/tokens")
    assert (await browser.get("/api/queue/me")).status == 401


@pytest.mark.slow
def test_eventq_ui_prints_and_opens_a_link_that_signs_the_local_admin_in_once(
        tmp_path: Path) -> None:
    """The real command against a real server process; --open hands the link to the
    browser named by $BROWSER (here a script that writes it down)."""
    data = tmp_path / "data"
    opened = tmp_path / "opened"
    browser = tmp_path / "browser"
    browser.write_text(f"#!/bin/sh\nprintf '%s' \"$1\" > {opened}\n")
    browser.chmod(browser.stat().st_mode | stat.S_IXUSR)
    server = subprocess.Popen([EVENTQ, "server", "--data-dir", str(data), "--port", "0",
                               "--gpus", "1xA100-80GB"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=clean_env())
    try:
        env = {**clean_env(), "BROWSER": f"{browser} %s"}
        ui = run_until_up([EVENTQ, "ui", "--open", "--data-dir", str(data)], env, data)
        assert ui.returncode == 0, ui.stderr
        link = ui.stdout.strip()
        url = json.loads((data / "server.json").read_text())["url"]
        assert link.startswith(f"{url}/#signin=") and opened.read_text() == link
        code = link.split("#signin=")[1]
        assert sign_in(url, code) == (200, "admin")
        assert sign_in(url, code)[0] == 401
    finally:
        server.terminate()
        server.wait(15)


def run_until_up(argv: list[str], env: dict[str, str],
                 data: Path) -> subprocess.CompletedProcess[str]:
    """``argv`` once the server has written its address."""
    wait_until(lambda: (data / "server.json").exists(), "the server wrote server.json")
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env,
                          check=False)


def sign_in(url: str, code: str) -> tuple[int, str | None]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url}/api/session", method="POST",
                                 data=json.dumps({"code": code}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())["user"]
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, None


@pytest.mark.slow
def test_over_tls_the_cookie_is_secure_and_the_https_origin_is_the_servers_own(
        tmp_path: Path) -> None:
    """A real server process with a certificate: a standard-library cookie jar holds the
    Secure cookie, and the page's https origin may change things with it."""
    import http.cookiejar
    import ssl
    import urllib.request

    from tests.test_tls import Certs, TlsServer

    certs = Certs(tmp_path)
    server = TlsServer(tmp_path / "data", "--tls-cert", str(certs.cert),
                       "--tls-key", str(certs.key))
    try:
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(certs.ca))),
            urllib.request.HTTPCookieProcessor(jar))

        def send(path: str, body: dict[str, Any]) -> Any:
            req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                         method="POST", headers={
                                             "Content-Type": "application/json",
                                             "Origin": server.url})
            with opener.open(req, timeout=30) as resp:
                return resp.headers, json.loads(resp.read())

        headers, signed = send("/api/session", {"token": server.token})
        assert signed["user"] == "admin" and "Secure" in headers["Set-Cookie"]
        assert [c.secure for c in jar if c.name == COOKIE] == [True]
        _, job = send("/api/queue/submit", {"command": ["true"], "gpus": 0,
                                            "requires_approval": True})
        assert job["status"] == "blocked"
    finally:
        server.stop()
