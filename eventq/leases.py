"""Worker leases: why an attempt and its successor never run at the same time.

A remote attempt may run only while its worker holds a lease. The orchestrator grants
the lease afresh each time it hears from the worker (the welcome, and an answer to each
heartbeat); the agent counts it from the moment it SENT what was answered, which is
before the orchestrator heard it. So, with T the offline timeout:

- the orchestrator's last sign of life ``seen`` comes at or after the agent's ``sent``;
- the agent (or, if the agent is dead or frozen, the attempt's own watchdog) sends
  SIGTERM at ``sent + lease`` at the latest and SIGKILL ``grace`` later;
- the orchestrator declares the worker lost, and only then requeues its attempts, at
  ``seen + T >= sent + lease + grace + margin``.

The margin absorbs the watchdog's wake-up, the kernel's delivery of SIGKILL, and the two
machines' clocks running at slightly different rates (durations only are compared, never
clock readings across machines). The terms are the orchestrator's, sent in its welcome:
an agent's own ``--grace`` is shortened when T leaves no room for it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Heartbeats per offline timeout: a worker may miss three before it is given up.
BEATS_PER_TIMEOUT = 4
#: The margin: this share of the offline timeout, and never less than MIN_MARGIN seconds.
MARGIN_SHARE = 0.1
MIN_MARGIN = 0.5


@dataclass(frozen=True)
class LeaseTerms:
    """What an orchestrator with offline timeout ``offline`` grants one agent."""

    offline: float
    heartbeat: float
    #: Seconds an attempt may run past the last heartbeat the orchestrator answered.
    lease: float
    #: Seconds between SIGTERM and SIGKILL when a lapsed lease stops an attempt.
    grace: float
    margin: float


def lease_terms(offline: float, agent_grace: float) -> LeaseTerms:
    """The longest lease that keeps ``lease + grace + margin <= offline``, with room for
    at least two heartbeats, and the agent's grace where it fits."""
    heartbeat = offline / BEATS_PER_TIMEOUT
    margin = max(MIN_MARGIN, MARGIN_SHARE * offline)
    lease = max(2 * heartbeat, offline - max(agent_grace, 0.0) - margin)
    lease = min(lease, offline - margin)  # only a timeout under 1 s leaves less than 2 beats
    grace = max(0.0, offline - lease - margin)
    return LeaseTerms(offline, heartbeat, lease, grace, margin)
