"""What eventq needs of a batch system (Slurm, PBS, UGE) to start workers on demand.

A provider submits one array job per request, each task running ``eventq worker`` with the
environment it is given; says what became of each task (waiting and why, started on a node,
ended); and cancels tasks. That is all: the decisions (how many workers, which to cancel,
when a worker has idled long enough) are eventq's own, in ``eventq.provisioning`` (pure) and
``eventq.actors.provisioner`` (which records them before it acts). Slurm's is
``eventq.slurm``; PBS's would use ``qsub -J``, ``qstat -x -f -F json`` and ``qdel``; UGE's
``qsub -t``, ``qstat -xml`` and ``qdel`` (docs/architecture.md, "Workers on demand").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol


class ProviderError(Exception):
    """The batch system refused or could not be asked; the message says what it said."""


@dataclass(frozen=True)
class Offer:
    """What each worker a provider starts brings to the queue."""

    #: The provider's name (``slurm``): it names the provider in waiting jobs' reasons.
    name: str
    #: Labels its workers carry (``slurm_partition``, ``gpu_type``), for matching jobs.
    labels: dict[str, str]
    gpus: int
    #: Seconds a worker may give to jobs (its time limit less the margin); None: no limit.
    budget: float | None
    max_workers: int
    #: How the offer reads in a reason: ``--slurm-gres gpu:2``, ``--slurm-time 4:00:00``.
    gpus_source: str = ""
    budget_source: str = ""
    max_source: str = ""
    #: What each task asks the batch system for, as the log records it.
    asks: str = ""


@dataclass(frozen=True)
class Submission:
    """One request: an array of ``tasks`` workers, each told how to reach eventq."""

    request_id: str
    tasks: int
    #: Where the workers connect.
    url: str
    #: The array's secret (``wa_…``): each task derives its own worker token from it
    #: (``eventq.auth.task_token``). Only ever passed in an environment.
    secret: str
    #: The CA file that verifies an https server, for the workers (``--ca``).
    ca: str | None = None


@dataclass(frozen=True)
class Observed:
    """One task as the batch system sees it."""

    state: Literal["pending", "running", "ended"]
    detail: str = ""
    node: str | None = None


@dataclass(frozen=True)
class Sighting:
    """What the batch system says of one request: its own id, and each task it still lists
    (a task it no longer lists has ended)."""

    batch_id: str
    tasks: dict[int, Observed] = field(default_factory=dict)
    #: The state of every task it does not list by itself (Slurm keeps the tasks that never
    #: started in the array's own record); None: those have ended.
    others: Observed | None = None


class Provider(Protocol):
    """A batch system that starts ``eventq worker`` tasks on demand."""

    offer: Offer

    async def submit(self, submission: Submission) -> str:
        """Submit the array; the batch system's id for it. Raises ProviderError."""
        ...

    async def observe(self, request_ids: list[str]) -> dict[str, Sighting]:
        """What the batch system says of these requests (found by the name each carries,
        so a request whose id a crash lost is found too). Raises ProviderError."""
        ...

    async def cancel(self, batch_id: str, tasks: list[int]) -> None:
        """Cancel these tasks of an array. Raises ProviderError."""
        ...

    def discard_output(self, batch_id: str, task: int, failed: bool) -> None:
        """A task has ended and its worker left: remove what the batch system wrote for it,
        or, if it failed, keep it (a bounded number of the latest) for whoever debugs it."""
        ...
