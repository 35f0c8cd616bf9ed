"""Every route against every kind of caller gives the status SPEC 8 says."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from eventq import events as ev
from eventq.http.app import make_app
from eventq.server import Orchestrator

AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]
CALLERS = ["none", "viewer", "researcher", "lead", "admin", "worker", "revoked"]
ANY_USER = {"viewer", "researcher", "lead", "admin"}
OWNER = {"researcher", "admin"}  # the job below belongs to the researcher
ADMIN = {"admin"}
LEADS = {"lead", "admin"}

# (method, path, body, needed job state, who may)
ROUTES: list[tuple[str, str, Any, str | None, set[str]]] = [
    ("GET", "/api/queue", None, None, ANY_USER),
    ("GET", "/api/queue/stats", None, None, ANY_USER),
    ("GET", "/api/queue/me", None, None, ANY_USER),
    ("GET", "/api/queue/position/{job}", None, "pending", ANY_USER),
    ("GET", "/api/queue/concurrency", None, None, ANY_USER),
    ("GET", "/api/system/status", None, None, ANY_USER),
    ("POST", "/api/queue/submit", {"command": ["true"], "gpus": 0, "target": "worker"}, None,
     ANY_USER),
    ("POST", "/api/queue/import", {"csv": "task\na\n", "command": ["true"], "gpus": 0,
                                   "target": "worker"}, None, ANY_USER),
    ("GET", "/api/jobs/{job}", None, "pending", OWNER),
    ("GET", "/api/jobs/{job}/events", None, "pending", OWNER),
    ("POST", "/api/queue/{job}/cancel", None, "pending", OWNER),
    ("POST", "/api/queue/{job}/hold", None, "pending", OWNER),
    ("POST", "/api/queue/{job}/release", None, "held", OWNER),
    ("POST", "/api/queue/{job}/retry", None, "cancelled", OWNER),
    ("POST", "/api/queue/{job}/priority", {"priority": 25}, "pending", LEADS),
    ("POST", "/api/queue/{job}/approve", None, "blocked", ADMIN),
    ("POST", "/api/queue/{job}/reject?reason=no", None, "blocked", ADMIN),
    ("POST", "/api/queue/concurrency", {"max_concurrent": 7}, None, ADMIN),
    ("POST", "/api/queue/process", None, None, ADMIN),
    ("POST", "/api/queue/cleanup?days=30", None, None, ADMIN),
    ("GET", "/api/admin/users", None, None, ADMIN),
    ("POST", "/api/admin/users", {"name": "newcomer"}, None, ADMIN),
    ("POST", "/api/admin/users/researcher/tokens", None, None, ADMIN),
]


class World:
    """A server with one user per level, a revoked token and a worker-looking token."""

    def __init__(self, orch: Orchestrator, client: TestClient[Any, Any]) -> None:
        self.orch, self.client = orch, client
        self.tokens: dict[str, str | None] = {"none": None, "admin": orch.admin_token,
                                              "worker": "wt_not-a-user-token"}
        for level in ("viewer", "researcher", "lead"):
            self.tokens[level] = orch.add_user(level, ev.Level(level))
        self.tokens["revoked"] = orch.add_user("leaver", ev.Level.RESEARCHER)
        orch.log.append("system", [ev.TokenRevoked(name="leaver")])

    def headers(self, caller: str) -> dict[str, str]:
        token = self.tokens[caller]
        return {} if token is None else {"Authorization": f"Bearer {token}"}

    async def job_in(self, state: str) -> str:
        """A job of the researcher's, in ``state``."""
        body = {"command": ["true"], "gpus": 0, "target": "worker",
                "requires_approval": state == "blocked"}
        resp = await self.client.post("/api/queue/submit", json=body,
                                      headers=self.headers("researcher"))
        job_id: str = (await resp.json())["job_id"]
        admin = self.headers("admin")
        if state == "held":
            await self.client.post(f"/api/queue/{job_id}/hold", headers=admin)
        if state == "cancelled":
            await self.client.post(f"/api/queue/{job_id}/cancel", headers=admin)
        assert self.orch.state.jobs[job_id].status == state
        return job_id


@pytest.fixture
async def world(orch: Orchestrator, aiohttp_client: AiohttpClient) -> World:
    return World(orch, await aiohttp_client(make_app(orch)))


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p, *_ in ROUTES])
async def test_each_route_answers_each_caller_as_the_roles_say(
        world: World, route: tuple[str, str, Any, str | None, set[str]]) -> None:
    method, path, body, state, allowed = route
    for caller in CALLERS:
        job = await world.job_in(state) if state else ""
        if caller == "admin" and path.startswith("/api/admin/users") and method == "POST" \
                and body is not None:
            body = {"name": f"newcomer-{len(world.orch.users.by_name)}"}
        seq = world.orch.log.head_seq
        resp = await world.client.request(method, path.format(job=job), json=body,
                                          headers=world.headers(caller))
        reply = await resp.json()
        if caller in allowed:
            assert resp.status in (200, 201), (caller, path, reply)
        else:
            expected = 401 if caller in ("none", "worker", "revoked") else 403
            assert resp.status == expected, (caller, path, reply)
            assert reply["error"], "the refusal names the problem"
            assert world.orch.log.head_seq == seq, "a refused request records nothing"


async def test_a_researcher_cannot_cancel_another_users_job(world: World) -> None:
    job = await world.job_in("pending")
    other = world.orch.add_user("other", ev.Level.RESEARCHER)
    resp = await world.client.post(f"/api/queue/{job}/cancel",
                                   headers={"Authorization": f"Bearer {other}"})
    assert resp.status == 403
    assert world.orch.state.jobs[job].status == "pending"


async def test_a_revoked_token_stops_working_at_once_and_others_keep_working(
        world: World) -> None:
    admin = world.headers("admin")
    made = await (await world.client.post("/api/admin/users", json={"name": "dana"},
                                          headers=admin)).json()
    second = await (await world.client.post("/api/admin/users/dana/tokens",
                                            headers=admin)).json()
    for token in (made["token"], second["token"]):
        resp = await world.client.get("/api/queue/me",
                                      headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200
    assert (await world.client.delete("/api/admin/users/dana/tokens", headers=admin)).status == 200
    for token in (made["token"], second["token"]):
        resp = await world.client.get("/api/queue/me",
                                      headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401
    assert (await world.client.get("/api/queue/me", headers=admin)).status == 200
    stored = {r.type for r in await world.orch.log.read()}
    assert {"user_created", "token_issued", "token_revoked"} <= stored


def test_each_of_many_tokens_finds_its_user_until_revoked() -> None:
    """Tokens are found by their hash, not by a walk of all of them: 600 tokens, each
    finds its own user; a revoked one (or all of a user's) finds no one."""
    from eventq.auth import Users, new_token, token_hash
    from eventq.log import Record

    users, tokens = Users(), {}
    events: list[ev.Event] = []
    for i in range(300):
        first, second = new_token(), new_token()
        tokens[first], tokens[second] = f"u{i}", f"u{i}"
        events += [ev.UserCreated(name=f"u{i}", level=ev.Level.RESEARCHER, team=None,
                                  token_sha256=token_hash(first)),
                   ev.TokenIssued(name=f"u{i}", token_sha256=token_hash(second))]
    revoked_one = next(t for t, n in tokens.items() if n == "u7")
    events += [ev.TokenRevoked(name="u7", token_sha256=token_hash(revoked_one)),
               ev.TokenRevoked(name="u9")]
    for seq, e in enumerate(events, start=1):
        users.evolve(Record(seq, 0.0, "admin", e, b""))  # type: ignore[arg-type]
    for token, name in tokens.items():
        found = users.authenticate(token)
        if token == revoked_one or name == "u9":
            assert found is None, f"{name}'s revoked token still works"
        else:
            assert found is not None and found.name == name
    assert users.authenticate(new_token()) is None


def test_a_hash_that_shares_only_its_first_64_bits_with_a_token_is_not_that_token() -> None:
    """Candidates are found by the first 64 bits of the hash; the user is the one whose
    whole hash matches, never merely the first candidate."""
    from eventq.auth import Users, new_token, token_hash
    from eventq.log import Record

    alice = new_token()
    digest = token_hash(alice)
    twin = digest[:Users.PREFIX] + "".join("0" if c != "0" else "1"
                                           for c in digest[Users.PREFIX:])
    users = Users()
    for seq, e in enumerate([
            ev.UserCreated(name="mallory", level=ev.Level.ADMIN, team=None, token_sha256=twin),
            ev.UserCreated(name="alice", level=ev.Level.RESEARCHER, team=None,
                           token_sha256=digest)], start=1):
        users.evolve(Record(seq, 0.0, "admin", e, b""))  # type: ignore[arg-type]
    found = users.authenticate(alice)
    assert found is not None and found.name == "alice"
    users.evolve(Record(3, 0.0, "admin", ev.TokenRevoked(name="alice"), b""))  # type: ignore[arg-type]
    assert users.authenticate(alice) is None, "revoked: not the admin who shares 64 bits"
