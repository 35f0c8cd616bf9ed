"""Fuzzing the HTTP API against its own OpenAPI document, as every kind of caller.

Requests come from schemathesis (hypothesis strategies built from ``/api/openapi.json``)
and go to a real server on loopback. Every answer must be documented: its status, its media
type, its body's schema, and each event of an event stream; none may be a 5xx; a refusal
(4xx) must be JSON naming the problem and must record nothing. Every caller fuzzes every
operation: an admin, a lead, a researcher, a viewer (each by a bearer token), a worker (by
its X-Worker-Token) and nobody (no token). A caller that may use an operation sends it
``examples`` valid and ``examples`` invalid requests; one that may not sends a single valid
one, whose documented answer is 401 or 403. Then every path is sent each method it lacks,
which must be a JSON 405 with an Allow header.

No fuzzed command may run on this machine: every submission (single, batch or CSV import) is
sent with ``target: "worker"``, no worker process exists (the fuzzed worker routes only
record what a worker says), and the caller of ``Fuzz.run`` checks afterwards that nothing
was dispatched here. Nor may a fuzzed ``notify_url`` be called: one the server would take
is pointed at a closed port on loopback.

schemathesis speaks blocking HTTP: ``Fuzz.run`` runs in a thread while the server serves on
its loop. Used by tests/test_openapi.py (a bounded run) and tools/fuzz_api.py (any number).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from eventq.callbacks.urls import url_problem
from eventq.events import Level
from eventq.http.openapi import OPERATIONS
from eventq.server import Orchestrator

Schema = Any  # schemathesis' OpenApiSchema

#: A websocket cannot be answered once.
NOT_FUZZED = {"/api/workers/ws"}
#: Streams that stay open until the client leaves: read until a few events or a quiet second.
STREAMS = {"/api/events/stream", "/api/workers/stream", "/api/jobs/{job_id}/logs"}
STREAM_EVENTS = 3
#: Examples of each stream per caller and mode: a quiet one costs a second each.
STREAM_EXAMPLES = 3
STREAM_QUIET_SECONDS = 1.0
#: A bound on a hung request (a failure), not a measure of speed.
REQUEST_SECONDS = 30.0
#: Parameters whose value is a token the server gave, which no schema can describe: a
#: string of the documented characters is well formed, and still not one it gave (the
#: jobs table's cursor). Their refusal is the documented 422 naming them.
OPAQUE = {("/api/jobs", "after")}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]
#: One user per level; the admin is the server's own.
USERS = {"lead": ("lee", Level.LEAD, "alpha"), "researcher": ("rae", Level.RESEARCHER, "alpha"),
         "viewer": ("vic", Level.VIEWER, None)}
#: The user admin routes act on: never a caller, whose token must keep working.
BYSTANDER = ("sam", Level.RESEARCHER, "beta")
METHODS = ("GET", "PUT", "POST", "DELETE", "PATCH")
CALLERS = ("admin", "lead", "researcher", "viewer", "worker", "nobody")


def user_callers(orch: Orchestrator) -> dict[str, dict[str, str]]:
    """The headers of an admin, a lead, a researcher and a viewer; on the server's loop."""
    assert orch.admin_token is not None
    callers = {"admin": {"Authorization": f"Bearer {orch.admin_token}"}}
    for role, (name, level, team) in USERS.items():
        callers[role] = {"Authorization": f"Bearer {orch.add_user(name, level, team)}"}
    orch.add_user(*BYSTANDER)
    return callers


@dataclass
class Tally:
    """What a run did and found."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    #: Answers with a 5xx (or none at all).
    server_errors: list[str] = field(default_factory=list)
    #: Answers the document does not describe, and refusals that recorded something.
    violations: list[str] = field(default_factory=list)
    #: How often each kind of problem was found, by operation: ``POST /path: what``.
    kinds: Counter[str] = field(default_factory=Counter)
    #: The first case of each kind, in full.
    first: dict[str, str] = field(default_factory=dict)

    def found(self, where: str, kind: str, detail: str, server_error: bool = False) -> None:
        (self.server_errors if server_error else self.violations).append(
            f"{where}: {kind}\n{detail}")
        self.kinds[f"{where}: {kind}"] += 1
        self.first.setdefault(f"{where}: {kind}", detail)

    def summary(self) -> str:
        return (f"requests {self.requests}, 5xx {len(self.server_errors)}, "
                f"schema violations {len(self.violations)}; statuses "
                + " ".join(f"{code}:{n}" for code, n in sorted(self.statuses.items())))

    def problems(self, most: int = 5) -> str:
        """Each kind of problem with its count, then the first case of the ``most``
        commonest kinds in full."""
        kinds = self.kinds.most_common()
        return "\n".join(f"{n:6} x {kind}" for kind, n in kinds) + "\n\n" + "\n\n".join(
            f"{kind}\n{self.first[kind]}" for kind, _ in kinds[:most])


def credentials(headers: dict[str, str]) -> type:
    """An auth provider: every generated request carries these headers (the dict is read
    at each request: changing it changes the caller)."""

    class Credentials:
        def get(self, case: Any, context: Any) -> dict[str, str]:
            return headers

        def set(self, case: Any, data: dict[str, str], context: Any) -> None:
            case.headers = {**(case.headers or {}), **data}

    return Credentials


def load(doc: dict[str, Any], headers: dict[str, str]) -> Schema:
    schema = schemathesis.openapi.from_dict(doc)
    schema.auth(refresh_interval=None)(credentials(headers))
    schema.config.max_stream_events = STREAM_EVENTS
    return schema


#: Who may use each operation, as the document's table declares it.
WHO = {(op.method.upper(), op.path): op.who for op in OPERATIONS}
#: The callers each kind of operation is meant for.
MEANT_FOR = {"public": {"admin", "lead", "researcher", "viewer", "worker", "nobody"},
             "user": {"admin", "lead", "researcher", "viewer"},
             "owner": {"admin", "lead", "researcher", "viewer"},
             "lead": {"admin", "lead"}, "admin": {"admin"}, "worker": {"worker"}}


@dataclass
class Fuzz:
    """Sends generated requests from a thread and checks every answer."""

    orch: Orchestrator
    base_url: str
    #: (method, path) of every route the app serves.
    served: set[tuple[str, str]]
    #: Bearer headers by role (``user_callers``).
    users: dict[str, dict[str, str]]
    #: Valid and invalid examples per operation, for each caller that may use it.
    examples: int = 10
    #: None: the same examples every run (derandomized); else a hypothesis seed.
    seed: int | None = None
    #: Also fuzz the event streams (each quiet stream costs STREAM_QUIET_SECONDS).
    streams: bool = True
    tally: Tally = field(default_factory=Tally)
    session: requests.Session = field(default_factory=requests.Session)
    #: Existing names to aim path and query parameters at (set by ``prepare``).
    known: dict[str, list[str]] = field(default_factory=dict)
    known_query: dict[str, list[str]] = field(default_factory=dict)
    #: Principal of every event appended, by seq: what a caller recorded, not the system.
    recorded_by: dict[int, str] = field(default_factory=dict)
    #: The log's head once the seed jobs were recorded.
    seeded: int = 0
    strategies: dict[tuple[str, str, GenerationMode], Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.orch.log.subscribe(lambda r: self.recorded_by.__setitem__(r.seq, r.principal))

    def run(self, at_least: int = 0) -> Tally:
        """Seed, then fuzz every operation as every caller, then the missing methods; with
        a seed, sweep again with the next seed until ``at_least`` requests were made."""
        with contextlib.closing(self.session):
            doc = self.session.get(f"{self.base_url}/api/openapi.json",
                                   timeout=REQUEST_SECONDS).json()
            callers = {**self.users, **self.prepare()}
            # One schema and one strategy per operation for every caller: building them
            # costs more than the requests.
            caller: dict[str, str] = {}
            schema = load(doc, caller)
            while True:
                for role, headers in callers.items():
                    caller.clear()
                    caller.update(headers)
                    self.fuzz_as(role, schema)
                self.wrong_methods(doc)
                if self.seed is None or self.tally.requests >= at_least:
                    return self.tally
                self.seed += 1

    def prepare(self) -> dict[str, dict[str, str]]:
        """Jobs of every user in each state they can act on, two workers (one fuzzes, the
        other is acted on by admins), and the worker's and nobody's headers."""
        admin = self.users["admin"]
        agent, spare = self.new_worker(admin, "agent"), self.new_worker(admin, "spare")
        for headers in self.users.values():
            self.seed_jobs(headers)
        self.known = {"name": [BYSTANDER[0]], "worker_id": [spare["worker_id"]]}
        self.known_query = {"worker_id": [agent["worker_id"], spare["worker_id"]]}
        self.seeded = self.orch.log.head_seq
        return {"worker": {"X-Worker-Token": agent["token"]}, "nobody": {}}

    def new_worker(self, admin: dict[str, str], name: str) -> dict[str, Any]:
        resp = self.session.post(f"{self.base_url}/api/admin/workers", json={"name": name},
                                 headers=admin, timeout=REQUEST_SECONDS)
        assert resp.status_code == 201, resp.text
        made: dict[str, Any] = resp.json()
        return made

    def seed_jobs(self, headers: dict[str, str]) -> None:
        """Waiting, blocked, rejected, held and cancelled jobs of this caller."""
        def submit(**extra: Any) -> str:
            resp = self.session.post(f"{self.base_url}/api/queue/submit", headers=headers,
                                     json={"command": ["true"], "target": "worker", **extra},
                                     timeout=REQUEST_SECONDS)
            assert resp.status_code == 200, resp.text
            job_id: str = resp.json()["job_id"]
            return job_id

        submit()
        submit(requires_approval=True)
        submit(no_wait=True)
        for then in ("hold", "cancel"):
            resp = self.session.post(f"{self.base_url}/api/queue/{submit()}/{then}",
                                     headers=headers, timeout=REQUEST_SECONDS)
            assert resp.status_code == 200, resp.text

    def fuzz_as(self, role: str, schema: Schema) -> None:
        paths = schema.raw_schema["paths"]
        for result in schema.get_all_operations():
            operation = result.ok()
            key = (operation.method.upper(), operation.path)
            if operation.path in NOT_FUZZED or key not in self.served or \
                    (operation.path in STREAMS and not self.streams):
                continue
            op = paths[operation.path][operation.method.lower()]
            allowed = role in MEANT_FOR[WHO[key]]
            count = self.examples if allowed else 1
            if operation.path in STREAMS:
                count = min(count, STREAM_EXAMPLES)
            # Where only query parameters could be wrong: valid ones must be taken.
            only_query = allowed and "requestBody" not in op and "{" not in operation.path
            self.fuzz(operation, GenerationMode.POSITIVE, count, only_query)
            if allowed and {"requestBody", "parameters"} & op.keys():
                self.fuzz(operation, GenerationMode.NEGATIVE, count, False)

    def fuzz(self, operation: Any, mode: GenerationMode, count: int, only_query: bool) -> None:
        key = (operation.method, operation.path, mode)
        if key not in self.strategies:
            self.strategies[key] = operation.as_strategy(generation_mode=mode)

        @hypothesis.settings(max_examples=count, deadline=None, database=None,
                             derandomize=self.seed is None,
                             phases=[hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=self.strategies[key], data=st.data())
        def one(case: Any, data: st.DataObject) -> None:
            self.aim(case, data)
            status, field = self.send(case)
            if only_query and status == 422 and (case.path, field) not in OPAQUE:
                self.tally.found(f"{case.method} {case.path}", "valid parameters refused",
                                 str(case.query))

        if self.seed is not None:
            one = hypothesis.seed(self.seed)(one)
        one()

    def call(self, case: Any) -> int:
        """Send one case; its answer must be documented, and a refusal must record nothing."""
        return self.send(case)[0]

    def send(self, case: Any) -> tuple[int, str | None]:
        """``call``, with the field a refusal names."""
        before = self.orch.log.head_seq
        streams = case.operation.path in STREAMS
        timeout = (REQUEST_SECONDS, STREAM_QUIET_SECONDS) if streams else REQUEST_SECONDS
        self.tally.requests += 1
        where = f"{case.method} {case.operation.path}"
        body = case.body if isinstance(case.body, dict | list | str | int | float) else ""
        sent = f"{case.formatted_path} {case.query or ''} {str(body)[:300]}"
        try:
            response = case.call(base_url=self.base_url, session=self.session, timeout=timeout)
        except requests.RequestException as exc:
            self.tally.found(where, "no answer", f"{sent}\n{exc!r}", server_error=True)
            return 0, None
        status: int = response.status_code
        self.tally.statuses[status] += 1
        for kind, message in self.failures(case, response):
            self.tally.found(where, f"{status} {kind}",
                             f"{sent}\n{message}\n{response.text[:300]}", status >= 500)
        field = None
        if 400 <= status < 500:
            refusal = response.json()
            if "error" not in refusal:
                self.tally.found(where, "a refusal without error", response.text[:300])
            field = refusal.get("field") if isinstance(refusal, dict) else None
            # Jobs started earlier may go on recording their own progress meanwhile.
            if self.recorded_by_callers(before):
                self.tally.found(where, "refused, yet recorded", response.text[:300])
        return status, field

    def failures(self, case: Any, response: Any) -> Iterator[tuple[str, str]]:
        """What the checks found: each failure's title and message."""
        try:
            case.validate_response(response, checks=CHECKS)
        except* AssertionError as group:
            for exc in group.exceptions:
                yield (getattr(exc, "title", type(exc).__name__),
                       getattr(exc, "message", str(exc))[:2000])

    def recorded_by_callers(self, after: int) -> list[int]:
        """Seqs appended after ``after`` on a caller's behalf (a user or a worker)."""
        return [seq for seq, who in list(self.recorded_by.items())
                if seq > after and who != "system"]

    def aim(self, case: Any, data: st.DataObject) -> None:
        """Point parameters at jobs, users and workers that exist, some of the time, and
        keep every submission away from this machine."""
        known = {**self.known, "job_id": list(self.orch.state.jobs)}
        for params, names in ((case.path_parameters, known), (case.query, self.known_query)):
            for name in set(params or {}) & names.keys():
                params[name] = data.draw(st.sampled_from([*names[name], params[name]]))
        path = case.operation.path
        self.aim_stream(case, data)
        if isinstance(case.body, dict) and path in ("/api/queue/submit", "/api/queue/import"):
            keep_here(case.body)
        jobs = case.body.get("jobs") if isinstance(case.body, dict) and \
            path == "/api/queue/batch" else None
        for job in jobs if isinstance(jobs, list) else []:
            if isinstance(job, dict):
                keep_here(job)

    def aim_stream(self, case: Any, data: st.DataObject) -> None:
        """Streams that have events to send: one that waits in silence is read for a whole
        STREAM_QUIET_SECONDS. A followed log of a job that never starts stays silent, so
        logs are read whole (followed logs are checked with real jobs in the tests)."""
        if case.query and case.operation.path == "/api/jobs/{job_id}/logs":
            case.query["follow"] = "false"
        if case.operation.path != "/api/events/stream" or \
                case.meta.generation.mode is not GenerationMode.POSITIVE:
            return
        query, headers = case.query or {}, case.headers or {}
        resume = data.draw(st.sampled_from(["0", "1", str(self.seeded // 2)]))
        if "Last-Event-ID" in headers:
            headers["Last-Event-ID"] = resume
        else:
            query["after"] = resume
        case.query = query

    def wrong_methods(self, doc: dict[str, Any]) -> None:
        """Each path answers a method it lacks with a JSON 405 naming those it has."""
        admin = self.users["admin"]
        for path, ops in doc["paths"].items():
            has = {m.upper() for m in ops}
            url = self.base_url + path.replace("{", "").replace("}", "")
            for method in sorted(set(METHODS) - has):
                self.tally.requests += 1
                resp = self.session.request(method, url, headers=admin, timeout=REQUEST_SECONDS)
                self.tally.statuses[resp.status_code] += 1
                allow = {m.strip() for m in resp.headers.get("Allow", "").split(",")} - {"HEAD"}
                if resp.status_code != 405 or allow != has or "error" not in resp.json():
                    self.tally.found(f"{method} {path}", "not a JSON 405 with Allow",
                                     f"{resp.status_code} Allow {allow}: {resp.text[:300]}",
                                     resp.status_code >= 500)


def keep_here(job: dict[str, Any]) -> None:
    """A fuzzed job never runs here, and a job that ends (cancelled, rejected) notifies no
    host a fuzzed URL names: a URL the server would take is pointed at a closed port here."""
    job["target"] = "worker"
    url = job.get("notify_url")
    if isinstance(url, str) and url_problem(url) is None:
        job["notify_url"] = "http://127.0.0.1:9/fuzzed"
