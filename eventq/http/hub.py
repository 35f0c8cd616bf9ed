"""The worker hub: the open connection of each worker, and what is sent down it.

It acts only on durable events (write-ahead effects): a job is sent to a worker
once its ``AttemptDispatched`` is on disk, a cancel once ``AttemptStopRequested``
is. A message for a worker that is not connected right now is not lost: when the
worker comes back, reconciliation sends again every dispatch it never started.
Each connection has its own bounded outbox, so a slow worker never slows others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import structlog

from eventq import events as ev
from eventq import jobenv
from eventq.actors.registry import Registry
from eventq.actors.scheduler_state import SchedulerState
from eventq.actors.workers_state import Workers
from eventq.log import Record
from eventq.runner import attempt_dir

log = structlog.get_logger()
OUTBOX_LIMIT = 1000


@dataclass(eq=False)
class Outbox:
    """The outgoing side of one worker connection (websocket or SSE stream)."""

    transport: str
    token_sha256: str
    queue: asyncio.Queue[dict[str, Any] | None] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_LIMIT))
    closed: str | None = None
    #: Messages kept back while the worker cannot take them (see ``held``).
    kept: list[dict[str, Any]] = field(default_factory=list)
    holds: int = 0

    def send(self, message: dict[str, Any]) -> None:
        if self.closed is not None:
            return
        if self.holds:
            self.kept.append(message)
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.close("the worker does not read its messages")

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep messages back, in order, until the block ends; then send them.

        SimpleTuner's stock worker forgets its job only once its terminal status report
        has returned, and ignores a ``job_submit`` that arrives before: its next job is
        kept back until then, instead of waiting for its next idle heartbeat."""
        self.holds += 1
        try:
            yield
        finally:
            self.holds -= 1
            if not self.holds:
                kept, self.kept = self.kept, []
                for message in kept:
                    self.send(message)

    def close(self, reason: str, tell: bool = True) -> None:
        """End the connection; with ``tell``, first send ``shutdown`` saying why.

        Without it the worker only sees the connection end and reconnects: what an
        orchestrator restart must look like, since a stock worker stops its trainer on
        ``shutdown``."""
        if self.closed is not None:
            return
        self.closed = reason
        while self.queue.qsize() >= OUTBOX_LIMIT - 1:
            self.queue.get_nowait()
        if tell:
            self.queue.put_nowait({"type": "shutdown", "reason": reason})
        self.queue.put_nowait(None)


@dataclass
class WorkerHub:
    DURABLE_READS: ClassVar[frozenset[type]] = frozenset({
        ev.AttemptDispatched, ev.AttemptStopRequested, ev.WorkerDraining,
        ev.WorkerTokenRotated, ev.WorkerRemoved, ev.AttemptEnded, ev.WorkerLost})
    data_dir: Path
    state: SchedulerState
    workers: Workers
    registry: Registry
    connections: dict[str, Outbox] = field(default_factory=dict)

    def attach(self, worker_id: str, outbox: Outbox) -> None:
        old = self.connections.get(worker_id)
        if old is not None:
            old.close("replaced by a newer connection of the same worker")
        self.connections[worker_id] = outbox

    def detach(self, worker_id: str, outbox: Outbox) -> None:
        if self.connections.get(worker_id) is outbox:
            del self.connections[worker_id]

    def send(self, worker_id: str, message: dict[str, Any]) -> None:
        outbox = self.connections.get(worker_id)
        if outbox is not None:
            outbox.send(message)

    def run_message(self, job_id: str, attempt: int, transport: str) -> dict[str, Any]:
        """``job_submit`` as SimpleTuner's stock worker reads it, plus eventq's fields.

        Only what the job declared travels (``eventq/jobenv.py``): never the submitter's
        ``PATH`` or a directory of the orchestrator's machine."""
        job = self.state.jobs[job_id]
        spec = job.spec
        try:
            env, cwd = jobenv.for_worker(self.data_dir, spec)
        except jobenv.EnvUnreadable as exc:
            log.error("environment_unreadable", job_id=job_id, attempt=attempt, why=str(exc))
            env, cwd = {}, spec.cwd
        return {
            "type": "job_submit" if transport == "sse" else "run",
            "job_id": job_id, "attempt": attempt, "config": spec.config or {},
            "config_name": spec.config_name, "dataloader": None,
            "upload_endpoint": f"/api/workers/upload/{job_id}", "upload_token": "",
            "provider": "eventq", "command": spec.command, "gpus": list(job.gpus),
            "env": env, "cwd": cwd, "max_runtime": spec.max_runtime,
        }

    def on_durable(self, records: Sequence[Record]) -> None:
        for record in records:
            e = record.event
            if isinstance(e, ev.AttemptDispatched) and e.node in self.connections:
                outbox = self.connections[e.node]
                outbox.send(self.run_message(e.job_id, e.attempt, outbox.transport))
            elif isinstance(e, ev.AttemptStopRequested):
                job = self.state.jobs.get(e.job_id)
                if job is not None and job.node in self.connections:
                    self.send(job.node, {"type": "job_cancel", "job_id": e.job_id,
                                         "attempt": e.attempt, "reason": e.reason})
            else:
                self._on_worker_event(e)

    def _on_worker_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.WorkerDraining):
            self.send(e.worker_id, {"type": "drain", "reason": "drained by an admin"})
        elif isinstance(e, ev.WorkerTokenRotated):
            outbox = self.connections.get(e.worker_id)
            if outbox is None or outbox.token_sha256 == e.token_sha256:
                return
            if e.keep_running and outbox.transport == "ws":
                outbox.token_sha256 = e.token_sha256  # the admin's handler sends it the token
            else:
                outbox.close("the worker's token was rotated; reconnect with the new token")
        elif isinstance(e, ev.WorkerLost):
            # Given up: it must say hello again to learn what is still its own. No shutdown
            # message: an agent that is still alive reconnects at once.
            outbox = self.connections.pop(e.worker_id, None)
            if outbox is not None:
                outbox.close(f"the worker was given up: {e.reason}", tell=False)
        elif isinstance(e, ev.WorkerRemoved):
            outbox = self.connections.pop(e.worker_id, None)
            if outbox is not None:
                outbox.close("the worker was removed")
        elif isinstance(e, ev.AttemptEnded):
            job = self.state.jobs.get(e.job_id)
            worker = self.workers.by_id.get(job.node or "") if job else None
            outbox = self.connections.get(worker.worker_id) if worker else None
            if worker is not None and worker.one_job and outbox is not None:
                outbox.close("an ephemeral worker runs one job")

    def hand_token(self, worker_id: str, token: str) -> bool:
        """Give the worker's live agent its rotated token; False if it has no live websocket
        that the rotation kept (``keep_running``)."""
        outbox = self.connections.get(worker_id)
        worker = self.workers.by_id.get(worker_id)
        if outbox is None or worker is None or outbox.closed is not None \
                or outbox.transport != "ws" or outbox.token_sha256 != worker.token_sha256:
            return False
        outbox.send({"type": "token", "token": token})
        return True

    def append_log(self, worker_id: str, job_id: str, attempt: int, stream: str,
                   data: str) -> bool:
        """Keep a remote attempt's output where local output lives; False if not its own."""
        job = self.state.jobs.get(job_id)
        if job is None or job.node != worker_id or job.attempt != attempt \
                or stream not in ("stdout", "stderr"):
            return False
        directory = attempt_dir(self.data_dir, job_id, attempt)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"{stream}.log", "a", encoding="utf-8") as out:
            out.write(data)
        return True

    async def close_all(self, reason: str, tell: bool = True) -> None:
        for outbox in self.connections.values():
            outbox.close(reason, tell)
        self.connections.clear()
        await asyncio.sleep(0)
