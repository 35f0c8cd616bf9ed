"""What the orchestrator sends an agent over ``/api/workers/ws``, read strictly.

A message that does not read as one of these is logged and skipped: one bad frame
never ends the agent, nor the connection. Fields the agent does not use are ignored.
"""

from __future__ import annotations

from typing import Any

import msgspec

from eventq.events import JobSpec


class Welcome(msgspec.Struct, tag="welcome", tag_field="type"):
    worker_id: str
    heartbeat_seconds: float = 30.0
    #: Attempts the agent listed that are still its own, and those given away.
    keep: list[tuple[str, int]] = []
    stop: list[tuple[str, int]] = []
    #: The lease (``eventq.leases``): seconds an attempt may run past the last answered
    #: send, and the grace of a stop when it lapses. None: this orchestrator grants none.
    lease_seconds: float | None = None
    fence_grace_seconds: float = 10.0


class LeaseRenewed(msgspec.Struct, tag="lease", tag_field="type"):
    """The orchestrator heard heartbeat number ``beat`` while it held this worker online."""

    beat: int


class TokenRotated(msgspec.Struct, tag="token", tag_field="type"):
    """An admin rotated this worker's token and kept it running: use this one from now."""

    token: str


class Run(msgspec.Struct, tag="run", tag_field="type"):
    job_id: str
    attempt: int
    command: list[str] | str = []
    gpus: list[int] = []
    env: dict[str, str] = {}
    cwd: str | None = None
    config: dict[str, Any] | None = None
    max_runtime: float | None = None

    def spec(self) -> JobSpec:
        # The orchestrator sends ``config: {}`` with plain commands; a config job has none.
        config = self.config or None
        if not self.command and config is None:
            config = {}
        return JobSpec(job_id=self.job_id, user="", priority=0, command=self.command,
                       env=self.env, cwd=self.cwd, config=config, max_runtime=self.max_runtime)


class JobCancel(msgspec.Struct, tag="job_cancel", tag_field="type"):
    job_id: str
    attempt: int
    reason: str = "cancelled"


class Drain(msgspec.Struct, tag="drain", tag_field="type"):
    reason: str = ""


class Shutdown(msgspec.Struct, tag="shutdown", tag_field="type"):
    reason: str = "no reason given"


class Error(msgspec.Struct, tag="error", tag_field="type"):
    error: str = ""


ServerMessage = (Welcome | Run | JobCancel | Drain | Shutdown | Error | LeaseRenewed
                 | TokenRotated)
_decoder: msgspec.json.Decoder[ServerMessage] = msgspec.json.Decoder(ServerMessage)


class Unreadable(ValueError):
    pass


def decode(raw: str | bytes) -> ServerMessage:
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise Unreadable(str(exc)) from None
