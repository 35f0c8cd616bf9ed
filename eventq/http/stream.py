"""``GET /api/events/stream``: the log's durable events, live, as server-sent events.

Each subscriber has its own bounded queue, fed by ``EventLog.on_durable`` with the
records of each commit, so a slow client can only fall behind, never slow the log or
the other clients; one that falls ``queue`` commits behind is sent ``event: dropped``
with the last seq it was given, and closed. It can resume from there: ``Last-Event-ID``
(or ``?after=SEQ``) first replays the log after that seq, then goes live. The
subscription is made before the log is read, and live records the replay already sent
are skipped, so nothing is lost or sent twice at the seam. When the token the stream
was opened with stops being valid, it ends with ``event: revoked`` (eventq/http/access.py);
a stream that goes on shows from then on what its user's level may see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from eventq import events as ev
from eventq.auth import User
from eventq.http import access as accesses
from eventq.http.access import Access
from eventq.http.app import ORCH
from eventq.http.jobs import record_dict
from eventq.http.queue import parse_int
from eventq.log import Record
from eventq.server import Orchestrator

routes = web.RouteTableDef()

#: Set when the server shuts down: every open stream (events and log follows) ends.
SHUTTING_DOWN = web.AppKey("streams_shutting_down", asyncio.Event)
#: How many commits a subscriber may fall behind before it is dropped.
QUEUE_COMMITS = web.AppKey("event_stream_queue_commits", int)
DEFAULT_QUEUE_COMMITS = 1024
#: A comment line is sent when nothing else was for this long (SSE proxies time out idle
#: connections, and a write is how a vanished client is noticed).
KEEPALIVE_SECONDS = 10.0
#: How long a dropped subscriber gets to take its final event before its connection goes.
DROP_FLUSH_SECONDS = 60.0
CATCH_UP_PAGE = 500
#: The largest seq a client may name: 18 digits (SQLite holds up to 2**63 - 1, and a
#: header's pattern cannot say that bound).
LAST_SEQ = 10**18 - 1

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def setup(app: web.Application) -> None:
    """Add the route and end every open stream when the server shuts down."""
    app.add_routes(routes)
    accesses.setup(app)
    app[SHUTTING_DOWN] = asyncio.Event()
    app[SUBSCRIPTIONS] = set()
    app.on_shutdown.append(_shut_down)


async def open_sse(request: web.Request) -> web.StreamResponse:
    """Start an SSE response and send its headers at once (with a first comment)."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    await resp.write(b": eventq\n\n")
    return resp


def sse_frame(event: str, data: Any, id_: str | None = None) -> bytes:
    head = f"id: {id_}\n" if id_ is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + msgspec.json.encode(data) + b"\n\n"


def public_body(record: Record) -> dict[str, Any]:
    """The event as the stream shows it: secrets (a job's env, token hashes) removed."""
    out = record_dict(record)
    body = out["body"]
    if isinstance(record.event, ev.JobSubmitted):
        body["job"].pop("env", None)
    body.pop("token_sha256", None)
    body.pop("session_sha256", None)
    return out


@dataclass(eq=False)
class Subscription:
    """One client of the stream: its queue, what it was last given, why it ends."""

    orch: Orchestrator
    access: Access
    queue: asyncio.Queue[Sequence[Record]]
    #: The last seq handed to the client (or skipped as not theirs).
    sent: int = 0
    #: The first seq offered live (where a live-only subscriber began).
    first_offered: int | None = None
    dropped: bool = False
    closing: bool = False
    pump: asyncio.Task[None] | None = None
    owners: dict[str, str] = field(default_factory=dict)

    def offer(self, records: Sequence[Record]) -> None:
        """Called by the log after each commit; never waits."""
        if self.dropped or self.closing or not records:
            return
        if self.first_offered is None:
            self.first_offered = records[0].seq
        try:
            self.queue.put_nowait(records)
        except asyncio.QueueFull:
            self.dropped = True
            self._stop_pump()

    def close(self) -> None:
        self.closing = True
        self._stop_pump()

    @property
    def user(self) -> User:
        """Its user as they are now (a new level applies to what is sent from then on)."""
        return self.access.user

    @property
    def last_seq(self) -> int:
        """The seq to resume after: everything up to it was given (or was not theirs)."""
        if self.sent >= 0:
            return self.sent
        return self.first_offered - 1 if self.first_offered is not None else 0

    def _stop_pump(self) -> None:
        if self.pump is not None:
            self.pump.cancel()

    async def run(self, resp: web.StreamResponse, after: int | None) -> None:
        """Replay the log after ``after`` (if given), then send live records."""
        if after is not None:
            self.sent = after
            while page := await self.orch.log.read(from_seq=self.sent + 1, limit=CATCH_UP_PAGE):
                await self._send(resp, page)
                if len(page) < CATCH_UP_PAGE:
                    break
        else:
            self.sent = -1  # live only: the first record offered is the first one sent
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE_SECONDS):
                    batch = await self.queue.get()
            except TimeoutError:
                await resp.write(b": keepalive\n\n")
                continue
            await self._send(resp, [r for r in batch if r.seq > self.sent])

    async def _send(self, resp: web.StreamResponse, records: Sequence[Record]) -> None:
        if not records:
            return
        frames = [frame for r in records if (frame := await self._frame(r))]
        self.sent = records[-1].seq
        if frames:
            await resp.write(b"".join(frames))

    async def _frame(self, record: Record) -> bytes | None:
        out = public_body(record)
        if self.user.level != ev.Level.ADMIN and not await self._shown(record, out["body"]):
            return None
        return sse_frame(record.type, out, str(record.seq))

    async def _shown(self, record: Record, body: dict[str, Any]) -> bool:
        """A non-admin sees events of their own jobs and events that belong to no job
        (of sign-ins and sign-outs, their own)."""
        e = record.event
        if isinstance(e, ev.JobsPurged):
            body["job_ids"] = [j for j in e.job_ids if await self._owner(j) == self.user.name]
            return bool(body["job_ids"])
        if isinstance(e, ev.JobSubmitted):
            return e.job.user == self.user.name
        if isinstance(e, ev.SessionOpened | ev.SessionEnded):  # who signs in when: theirs only
            return record.principal == self.user.principal
        job_id = ev.event_job_id(e)
        return job_id is None or await self._owner(job_id) == self.user.name

    async def _owner(self, job_id: str) -> str | None:
        job = self.orch.state.jobs.get(job_id)
        if job is not None:
            return job.spec.user
        if job_id not in self.owners:  # purged from the read models: its first event says
            first = await self.orch.log.read(job_id=job_id, limit=1)
            e = first[0].event if first else None
            self.owners[job_id] = e.job.user if isinstance(e, ev.JobSubmitted) else ""
        return self.owners[job_id]


SUBSCRIPTIONS: web.AppKey[set[Subscription]] = web.AppKey("event_stream_subscriptions")


async def _shut_down(app: web.Application) -> None:
    app[SHUTTING_DOWN].set()
    subscriptions: set[Subscription] = app[SUBSCRIPTIONS]
    for sub in list(subscriptions):
        sub.close()


def resume_point(request: web.Request) -> int | None:
    """The seq to resume after: ``Last-Event-ID`` (what EventSource sends), else ``?after=``;
    each is checked whenever it is sent, the one not taken too."""
    found = [parse_int(raw, name, 0, LAST_SEQ)
             for name, raw in (("Last-Event-ID", request.headers.get("Last-Event-ID")),
                               ("after", request.query.get("after"))) if raw]
    return found[0] if found else None


@routes.get("/api/events/stream")
async def event_stream(request: web.Request) -> web.StreamResponse:
    orch, after = request.app[ORCH], resume_point(request)
    size = request.app.get(QUEUE_COMMITS, DEFAULT_QUEUE_COMMITS)
    access = accesses.opened_with(request)
    sub = Subscription(orch, access, asyncio.Queue(maxsize=max(1, size)))
    access.on_end = sub.close
    accesses.watch(request, access)
    subscriptions = request.app[SUBSCRIPTIONS]
    orch.log.on_durable(sub.offer)  # before the replay reads the log: nothing falls between
    subscriptions.add(sub)
    try:
        resp = await open_sse(request)
        pump = sub.pump = asyncio.get_running_loop().create_task(sub.run(resp, after))
        if sub.closing:  # ended (revoked, shut down) before its pump was there to stop
            pump.cancel()
        try:
            await asyncio.wait({pump})
        finally:
            pump.cancel()
    finally:
        accesses.unwatch(request, access)
        subscriptions.discard(sub)
        orch.log.off_durable(sub.offer)
    await _last_words(request, resp, sub)
    if not pump.cancelled() and (exc := pump.exception()) is not None and \
            not isinstance(exc, ConnectionError):
        raise exc
    return resp


async def _last_words(request: web.Request, resp: web.StreamResponse,
                      sub: Subscription) -> None:
    """Why the stream ends, if the server ends it for a reason the client can act on."""
    if sub.dropped:
        await send_last(request, resp, sse_frame("dropped", {
            "reason": f"fell more than {sub.queue.maxsize} commits behind the live event "
                      "stream", "last_seq": sub.last_seq}))
    elif sub.access.ended is not None:
        await send_last(request, resp, sse_frame(
            "revoked", accesses.revoked_body(sub.access, last_seq=sub.last_seq)))


async def send_last(request: web.Request, resp: web.StreamResponse, frame: bytes) -> None:
    """The last event of a stream the server ends; then its connection goes."""
    try:
        async with asyncio.timeout(DROP_FLUSH_SECONDS):
            await resp.write_eof(frame)
    except (TimeoutError, ConnectionError):
        if request.transport is not None:
            request.transport.abort()
