"""``GET /api/jobs/{id}/logs``: an attempt's output, read at once or followed live (SSE).

The job's process writes its files directly, so a follow tails them by offset: it polls
their size with a short sleep, only while someone follows (this is not the dispatch path),
and ends with ``event: end`` once the attempt has ended and its files are drained, or with
``event: revoked`` once the token it was opened with is no longer valid or its user may no
longer read the job's logs (eventq/http/access.py): nothing is sent after that.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from eventq import events as ev
from eventq import logfiles
from eventq.actors.scheduler_state import PARKED, TERMINAL, JobState
from eventq.auth import User, may_act_for
from eventq.http import access as accesses
from eventq.http.access import Access
from eventq.http.common import ORCH, ApiError, only_owner, require_owner
from eventq.http.queue import flag, int_param
from eventq.http.stream import KEEPALIVE_SECONDS, SHUTTING_DOWN, open_sse, sse_frame
from eventq.server import Orchestrator

routes = web.RouteTableDef()

POLL_SECONDS = 0.1
#: Bytes read (and sent as one event) at a time while following.
FOLLOW_CHUNK = 64 * 1024
STREAMS = {"stdout": ("stdout",), "stderr": ("stderr",), "all": ("stdout", "stderr")}


def _job(request: web.Request) -> JobState:
    job_id = request.match_info["job_id"]
    job = request.app[ORCH].state.jobs.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}")
    require_owner(request, job.spec.user, "read its logs")
    return job


def _attempt(request: web.Request, job: JobState, follow: bool) -> int:
    """The latest attempt by default; a follow may also wait for the next one of a job
    that waits to be retried."""
    latest = max(job.attempt, 1)
    waiting_retry = job.attempt >= 1 and (job.status == "pending" or job.status in PARKED)
    return int_param(request, "attempt", latest, 1,
                     latest + 1 if follow and waiting_retry else latest)


def _streams(request: web.Request) -> tuple[str, ...]:
    name = request.query.get("stream", "stdout")
    if name not in STREAMS:
        raise ApiError(422, f"stream must be one of {sorted(STREAMS)}", "stream")
    return STREAMS[name]


@routes.get("/api/jobs/{job_id}/logs")
async def job_logs(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    follow = flag(request, "follow")
    attempt, streams = _attempt(request, job, follow), _streams(request)
    orch = request.app[ORCH]
    paths = [logfiles.log_path(orch.data_dir, job.spec.job_id, attempt, s) for s in streams]
    if not follow:
        cap = orch.log_cap_bytes
        parts = [await asyncio.to_thread(logfiles.read_capped, p, cap) for p in paths]
        return web.Response(body=b"".join(parts), content_type="text/plain", charset="utf-8")
    access = accesses.opened_with(request, may_read_logs(job.spec.user))
    accesses.watch(request, access)
    try:
        resp = await open_sse(request)
        follower = Follower(request, resp, orch, job.spec.job_id, attempt,
                            [Tail(s, p) for s, p in zip(streams, paths, strict=True)], access)
        with contextlib.suppress(ConnectionError):  # the client went away
            await follower.run()
    finally:
        accesses.unwatch(request, access)
    return resp


def may_read_logs(owner: str) -> accesses.Allows:
    def allows(user: User) -> str | None:
        return None if may_act_for(user, owner) else only_owner("read its logs")
    return allows


@dataclass
class Tail:
    """One followed file and how far it has been sent."""

    stream: str
    path: Path
    offset: int = 0

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


@dataclass
class Follower:
    request: web.Request
    resp: web.StreamResponse
    orch: Orchestrator
    job_id: str
    attempt: int
    tails: list[Tail]
    access: Access

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        shutting_down = self.request.app[SHUTTING_DOWN]
        quiet_since = loop.time()
        while not self._client_gone() and not shutting_down.is_set():
            over = self._over()  # judged before reading: what follows an end is all there is
            if self._started() and await self._send_new(final=over):
                quiet_since = loop.time()
            if over or self.access.ended is not None:
                await self._last_event(over)
                return
            if loop.time() - quiet_since >= KEEPALIVE_SECONDS:
                await self.resp.write(b": keepalive\n\n")
                quiet_since = loop.time()
            await asyncio.sleep(POLL_SECONDS)

    async def _last_event(self, over: bool) -> None:
        """``end``, or ``revoked`` if the access ended meanwhile: nothing goes after that."""
        end = await self._end() if over and self.access.ended is None else None
        if self.access.ended is not None:
            await self.resp.write(sse_frame("revoked", accesses.revoked_body(self.access)))
        else:
            await self.resp.write(sse_frame("end", end))

    def _client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def _job(self) -> JobState | None:
        return self.orch.state.jobs.get(self.job_id)

    def _started(self) -> bool:
        job = self._job()
        return job is None or job.attempt >= self.attempt

    def _over(self) -> bool:
        """The attempt has ended, or will never run."""
        job = self._job()
        if job is None or job.attempt > self.attempt:
            return True
        if job.attempt == self.attempt:
            return not job.active
        return job.status in TERMINAL

    async def _send_new(self, final: bool) -> bool:
        """Send what the files gained (everything, when ``final``); whether anything was."""
        sent = False
        for tail in self.tails:
            if not final and tail.size() == tail.offset:
                continue  # nothing new (the usual case between two lines): no thread hop
            while True:
                chunk = await asyncio.to_thread(logfiles.read_from, tail.path, tail.offset,
                                                self.orch.log_cap_bytes, FOLLOW_CHUNK)
                data = chunk.data if final else chunk.data[:utf8_boundary(chunk.data)]
                if (not data and not chunk.dropped) or self.access.ended is not None:
                    break  # (the access may have ended while the file was read)
                tail.offset = chunk.end - (len(chunk.data) - len(data))
                text = (logfiles.marker(chunk.dropped) if chunk.dropped else b"") + data
                await self.resp.write(sse_frame(
                    "log", {"stream": tail.stream, "text": text.decode(errors="replace")},
                    f"{tail.stream}:{tail.offset}"))
                sent = True
                if len(chunk.data) < FOLLOW_CHUNK:
                    break
        return sent

    async def _end(self) -> dict[str, Any]:
        job = self._job()
        exit_code = None
        if job is not None and job.attempt == self.attempt:
            exit_code = job.exit_code
        else:
            await self.orch.log.flush()
            for record in await self.orch.log.read(job_id=self.job_id):
                e = record.event
                if isinstance(e, ev.AttemptEnded) and e.attempt == self.attempt:
                    exit_code = e.exit_code
        return {"job_id": self.job_id, "attempt": self.attempt,
                "status": job.status if job is not None else "purged", "exit_code": exit_code}


def utf8_boundary(data: bytes) -> int:
    """The length of ``data`` without a UTF-8 sequence cut off at its end (the rest is
    sent once the process has written it whole)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the lead
            continue
        if byte < 0xC0:
            return len(data)
        needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return len(data) - back if back < needed else len(data)
    return len(data)
