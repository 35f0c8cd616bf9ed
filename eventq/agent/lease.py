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


class Lease:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LEASE_FILE
        #: Seconds granted past each answered send, and the grace of a fence; None: no lease.
        self.seconds: float | None = None
        self.grace = 10.0
        self.deadline = math.inf

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
        tmp = self.path.with_name(f"{LEASE_FILE}.tmp")
        deadline = "inf" if math.isinf(self.deadline) else f"{self.deadline:.3f}"
        tmp.write_text(f"{deadline} {self.grace:.3f}\n")
        os.replace(tmp, self.path)
