"""One object for what many waiting jobs hold alike: what a queued job costs in memory.

Promise: sharing never changes a value. A spec shared here compares equal to what it was
and encodes to the same bytes; only equal strings become one string, and an empty
container one empty container. Nothing in eventq mutates a spec's containers (a
``JobSpec`` is frozen, and so, by convention, is what it holds); the shared empties rely
on that, and ``test_shared.py`` checks they stay empty.

Why: a sweep of 100,000 jobs repeats its user, team, name and most of its command words
in every job, and msgspec decodes each into new strings, and gives each job its own empty
``metadata``, ``worker_labels``, ``env`` and ``depends_on`` (~250 B of every spec). A
job's environment is not held at all (``eventq/jobenv.py``: the log and memory keep only
its file's digest). Strings are shared through ``sys.intern``: an interned string is
dropped from the table once nothing holds it, so the table grows with what waiting jobs
hold, not with everything ever submitted.
"""

from __future__ import annotations

import sys
from typing import Any

from msgspec.structs import force_setattr

from eventq import events as ev

_intern = sys.intern

#: The empty containers every spec without one shares. Never mutated (module docstring).
EMPTY_DICT: dict[Any, Any] = {}
EMPTY_LIST: list[Any] = []


def share(spec: ev.JobSpec) -> ev.JobSpec:
    """``spec`` itself, its repeated strings and empty containers now shared (in place:
    the values are equal, and a new spec would cost what this saves, once more). Field by
    field, not a loop over names: a start calls it for every job in the log."""
    setattr_ = force_setattr
    setattr_(spec, "user", _intern(spec.user))
    setattr_(spec, "name", _intern(spec.name))
    if spec.team is not None:
        setattr_(spec, "team", _intern(spec.team))
    if spec.config_name is not None:
        setattr_(spec, "config_name", _intern(spec.config_name))
    if spec.cwd is not None:
        setattr_(spec, "cwd", _intern(spec.cwd))
    if not spec.metadata:
        setattr_(spec, "metadata", EMPTY_DICT)
    if not spec.worker_labels:
        setattr_(spec, "worker_labels", EMPTY_DICT)
    if not spec.env:
        setattr_(spec, "env", EMPTY_DICT)
    if not spec.depends_on:
        setattr_(spec, "depends_on", EMPTY_LIST)
    command = spec.command
    if isinstance(command, str):
        setattr_(spec, "command", _intern(command))
    else:
        for at, word in enumerate(command):  # a loop: a third faster than map and a slice
            command[at] = _intern(word)
    return spec


class Reasons:
    """Equal tuples of reasons, shared: a queue of 100,000 jobs waiting for GPUs says
    "needs 1, node local has 0 free" 100,000 times. Bounded: past ``limit`` distinct
    tuples it starts again (what is held stays shared; later ones share anew)."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.known: dict[tuple[ev.Reason, ...], tuple[ev.Reason, ...]] = {}

    def __call__(self, reasons: tuple[ev.Reason, ...]) -> tuple[ev.Reason, ...]:
        if not reasons:
            return ()
        found = self.known.get(reasons)
        if found is not None:
            return found
        if len(self.known) >= self.limit:
            self.known.clear()
        self.known[reasons] = reasons
        return reasons
