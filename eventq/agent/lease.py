"""The agent's side of its lease: renewed by the orchestrator's answers, kept in a file.

The file (``DATA/lease``: ``deadline grace``, the deadline on CLOCK_BOOTTIME) is what each
attempt's watchdog reads (``eventq.agent.watchdog``), so the lease binds the attempts even
when the agent is killed or frozen. The deadline only moves forward while the orchestrator
answers; ``lapse`` brings it to now, when the orchestrator refuses this agent.

Until a welcome grants terms (an orchestrator that grants none), there is no deadline.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from eventq.agent.watchdog import now

LEASE_FILE = "lease"
#: The deadline's width in the file, so that every record has one length.
RECORD_WIDTH = 20


class Lease:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LEASE_FILE
        #: Seconds granted past each answered send, and the grace of a fence; None: no lease.
        self.seconds: float | None = None
        self.grace = 10.0
        self.deadline = math.inf
        self._fd: int | None = None

    def grant(self, seconds: float | None, grace: float, sent_at: float) -> None:
        """A welcome's terms, counted from when the hello was sent."""
        self.seconds, self.grace = seconds, grace
        self.deadline = math.inf if seconds is None else sent_at + seconds
        self._write()

    def renew(self, sent_at: float) -> None:
        """The orchestrator answered what was sent at ``sent_at``."""
        if self.seconds is not None and sent_at + self.seconds > self.deadline:
            self.deadline = sent_at + self.seconds
            self._write()

    def lapse(self) -> None:
        """Refused by the orchestrator: nothing may run on from here."""
        self.deadline = min(self.deadline, now())
        self._write()

    @property
    def left(self) -> float:
        return self.deadline - now()

    @property
    def lapsed(self) -> bool:
        return self.left <= 0

    def _write(self) -> None:
        """Over the file's own bytes, at the same length each time: a renewal needs no new
        block of the disk. It was a new file renamed over the old, so a worker whose disk
        had filled (a job's checkpoints, a dataset cache) failed every renewal and its
        watchdogs stopped its healthy attempts. A reader may catch a write half done;
        ``watchdog.read_lease`` reads until two reads agree."""
        deadline = "inf" if math.isinf(self.deadline) else f"{self.deadline:.3f}"
        record = f"{deadline:>{RECORD_WIDTH}} {self.grace:.3f}\n".encode()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.pwrite(self._fd, record, 0)
        os.ftruncate(self._fd, len(record))  # what the file held before may be longer

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
