"""Every event eventq records. A reader learns the whole domain here.

Events are immutable facts named in the past tense. Each has a pinned ``tag`` so
that renaming a class never changes what is stored. An event type is never
changed incompatibly: a new shape is a new type or an optional field, and old
stored shapes are turned into current ones by the upcasters at the bottom.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Literal

import msgspec

#: Version written with every new event; rows stored with an older version are
#: upcast on read.
SCHEMA_VERSION = 1


class Level(enum.StrEnum):
    """A user's level; it gives the default priority of their jobs."""

    ADMIN = "admin"  #: Urgent (30)
    LEAD = "lead"  #: High (20)
    RESEARCHER = "researcher"  #: Normal (10)
    VIEWER = "viewer"  #: Low (0)


LEVEL_PRIORITY: dict[Level, int] = {
    Level.ADMIN: 30,
    Level.LEAD: 20,
    Level.RESEARCHER: 10,
    Level.VIEWER: 0,
}

Target = Literal["auto", "worker", "local"]


class GpuInfo(msgspec.Struct, frozen=True, gc=False):
    """One GPU of a node's inventory."""

    index: int
    name: str
    memory_gb: float
    #: Percent of memory used by processes eventq did not start; above the busy
    #: threshold the GPU is not allocatable.
    foreign_memory_percent: float = 0.0


class Reason(msgspec.Struct, frozen=True, gc=False):
    """One check that holds a waiting job, e.g. ``user_limit``: ``alice runs 2 of 2``."""

    code: str
    detail: str


class Limits(msgspec.Struct, frozen=True, gc=False):
    """Concurrency and fairness settings (SPEC 4); changed only by LimitsChanged.

    The defaults are what a new log records at its first start. Every field is encoded,
    defaults too (no ``omit_defaults``), so a stored LimitsChanged means the same whatever
    the defaults of the code that reads it; a log that never recorded limits runs under
    ``UNRECORDED_LIMITS``.
    """

    max_concurrent: int = 5
    user_max_concurrent: int = 2
    team_max_concurrent: int = 10
    enable_fair_share: bool = False
    #: Local jobs at once; None: no count of its own, the local GPUs are the bound.
    local_job_max_concurrent: int | None = None
    #: Local GPUs in use at once; None: all of them.
    local_gpu_max_concurrent: int | None = None
    starvation_threshold_minutes: float = 60.0
    aging_boost: int = 10
    gpu_busy_memory_percent: float = 20.0


#: The limits of a log that has recorded none: those it ran under before a new log recorded
#: its server's limits (SimpleTuner's one local job at a time). Old logs mean these values,
#: so they never change.
UNRECORDED_LIMITS = Limits(
    max_concurrent=5, user_max_concurrent=2, team_max_concurrent=10, enable_fair_share=False,
    local_job_max_concurrent=1, local_gpu_max_concurrent=None,
    starvation_threshold_minutes=60.0, aging_boost=10, gpu_busy_memory_percent=20.0)


class JobSpec(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """Everything a submitter asked for, after validation and defaults."""

    job_id: str
    user: str
    priority: int
    command: list[str] | str
    name: str = ""
    team: str | None = None
    priority_override: int | None = None
    gpus: int = 1
    device_ids: list[int] | None = None
    any_gpu: bool = False
    target: Target = "auto"
    worker_labels: dict[str, str] = {}
    max_attempts: int = 3
    max_runtime: float | None = None
    estimated_runtime: float | None = None
    retry_on_failure: bool = False
    env: dict[str, str] = {}
    cwd: str | None = None
    metadata: dict[str, Any] = {}
    config: dict[str, Any] | None = None
    config_name: str | None = None
    requires_approval: bool = False
    estimated_cost: float = 0.0
    #: Job ids this job runs after (all must complete first).
    depends_on: list[str] = []
    #: Not before this time (epoch seconds).
    begin_at: float | None = None
    #: SHA-256 of the job's environment file (``DATA/env/<it>``, ``eventq/jobenv.py``): its
    #: variables and the submitter's directory, kept out of the log. Jobs recorded before it
    #: existed carry their env here, in ``env``.
    env_sha256: str | None = None
    #: Where a JSON POST goes when the job ends (``eventq jobs submit --notify URL``).
    notify_url: str | None = None

    @property
    def effective_base(self) -> int:
        """Priority before aging: the override if set, else the level's."""
        return self.priority if self.priority_override is None else self.priority_override


class Event(msgspec.Struct, frozen=True, tag_field="type", kw_only=True, gc=False):
    """Base of every event; the tag is stored as the row's type.

    Not tracked by the cyclic collector (``gc=False``, as specs and reasons): an event is
    frozen data and holds no cycle, and a start decodes every one in the log (tracking
    them made decoding take twice as long)."""


# --- the orchestrator and its nodes ---------------------------------------------------


class ServerStarted(Event, frozen=True, tag="server_started"):
    pid: int
    version: str


class NodeInventoryReported(Event, frozen=True, tag="node_inventory_reported"):
    """A node's GPUs; recorded at start and whenever allocatable GPUs change."""

    node: str
    gpus: list[GpuInfo]
    simulated: bool
    nvml_error: str | None = None


class UserCreated(Event, frozen=True, tag="user_created"):
    name: str
    level: Level
    team: str | None
    token_sha256: str


class TokenIssued(Event, frozen=True, tag="token_issued"):
    """A further token for an existing user (shown once; only its hash is kept)."""

    name: str
    token_sha256: str


class TokenRevoked(Event, frozen=True, tag="token_revoked"):
    """Revokes one token of a user, or every token when ``token_sha256`` is None."""

    name: str
    token_sha256: str | None = None


class UserUpdated(Event, frozen=True, tag="user_updated"):
    name: str
    level: Level
    team: str | None


class UserDeleted(Event, frozen=True, tag="user_deleted"):
    """A user is gone: every token of theirs, and every session and stream opened with
    one, ends with them. Their finished jobs stay in the history under their name, and the
    name may be given to a new user."""

    name: str


class SessionOpened(Event, frozen=True, tag="session_opened"):
    """A browser signed in (the web page), with a token or a one-time code made with one.

    Only the SHA-256 of the session's cookie is kept. The session lasts until
    ``expires_at`` (fixed at sign-in, never extended), its sign-out, the revocation of the
    token it was opened with (``token_sha256``: that token's, or the code maker's), or
    its user's demotion below ``level``; whichever comes first."""

    session_sha256: str
    name: str
    level: Level
    token_sha256: str
    expires_at: float
    via: Literal["token", "code"]


class SessionEnded(Event, frozen=True, tag="session_ended"):
    """A session ended before its time: signed out (its other ends need no event: the
    revocation or demotion that ends it is one already, and expiry is a time)."""

    session_sha256: str
    reason: str


class LimitsChanged(Event, frozen=True, tag="limits_changed"):
    limits: Limits


class SettingsChanged(Event, frozen=True, tag="settings_changed"):
    """Orchestrator settings other than limits, e.g. the approval cost threshold."""

    approval_cost_threshold: float | None


# --- remote workers (SPEC 6) ----------------------------------------------------------


class WorkerCreated(Event, frozen=True, tag="worker_created"):
    worker_id: str
    name: str
    worker_type: Literal["ephemeral", "persistent"]
    labels: dict[str, str]
    token_sha256: str
    #: Made by a provider (``slurm``) for one task of a request (``WorkersRequested``): it
    #: lives as long as that allocation, taking jobs until it idles out or its time is spent,
    #: where an ephemeral worker an admin made runs one job.
    provider: str | None = None


class WorkerTokenRotated(Event, frozen=True, tag="worker_token_rotated"):
    """The old token stops working at once; streams opened with it are closed, unless
    ``keep_running``: then the worker's live agent is handed the new token and goes on."""

    worker_id: str
    token_sha256: str
    keep_running: bool = False


class WorkerConnected(Event, frozen=True, tag="worker_connected"):
    """A worker (re)registered; its GPUs come as a NodeInventoryReported for its node."""

    worker_id: str
    transport: Literal["ws", "sse"]
    #: Labels the worker reported; merged under the admin's, never erasing them.
    labels: dict[str, str] = {}
    #: Jobs it runs at once (SimpleTuner's stock worker: 1); None: as its GPUs allow.
    max_jobs: int | None = None
    #: A worker on a time-limited allocation takes only jobs known to end before this.
    accepts_until: float | None = None


class WorkerDraining(Event, frozen=True, tag="worker_draining"):
    worker_id: str


class WorkerLost(Event, frozen=True, tag="worker_lost"):
    """Offline: heartbeat timeout, disconnect without resumption, or a clean goodbye."""

    worker_id: str
    reason: str


class WorkerRemoved(Event, frozen=True, tag="worker_removed"):
    worker_id: str


# --- workers a batch system starts on demand (SPEC 12) -------------------------------


class WorkersRequested(Event, frozen=True, tag="workers_requested"):
    """Workers asked of a batch system (``provider``: ``slurm``), one per task of one array
    job. Recorded, with each task's worker already created (``WorkerCreated``), before the
    request leaves: a crash in between is settled at the next start by the name it carries."""

    request_id: str
    provider: str
    #: The worker each task starts as: task i is ``workers[i]``.
    workers: list[str]
    #: The waiting jobs it was made for.
    for_jobs: list[str]
    #: What each task asks for, in the provider's words (partition, GRES, time limit).
    asks: str = ""


class WorkersRequestSubmitted(Event, frozen=True, tag="workers_request_submitted"):
    """The batch system took the request, under its own id (Slurm's array job id)."""

    request_id: str
    batch_id: str


class WorkersRequestFailed(Event, frozen=True, tag="workers_request_failed"):
    """The batch system did not take the request (``sbatch`` failed, or a restart found no
    trace of it); none of its workers will come."""

    request_id: str
    error: str


class RequestedWorkerChanged(Event, frozen=True, tag="requested_worker_changed"):
    """What the batch system says of one task changed: waiting (with its own reason), started
    on a node, or ended (with its end state). Only changes are recorded."""

    request_id: str
    task: int
    state: Literal["pending", "running", "ended"]
    #: Slurm's reason while pending (``Resources``, ``Priority``), its state otherwise.
    detail: str = ""
    node: str | None = None


class RequestedWorkersCancelled(Event, frozen=True, tag="requested_workers_cancelled"):
    """eventq cancels these tasks of a request (``scancel``): no longer needed, or idle."""

    request_id: str
    tasks: list[int]
    reason: str


# --- a job's life ---------------------------------------------------------------------


class JobSubmitted(Event, frozen=True, tag="job_submitted", omit_defaults=True):
    """A job was accepted. A job that queues at once and must wait carries its first
    reasons here, in the one event of its submission; a later change of them is a
    ``JobReasonsChanged``. None (not stored, as in every log before it existed): what the
    submission implies (``submitted_reasons``)."""

    job: JobSpec
    reasons: list[Reason] | None = None


class JobReady(Event, frozen=True, tag="job_ready"):
    """Its dependencies completed and its begin time passed: it joins the queue."""

    job_id: str


class JobRejected(Event, frozen=True, tag="job_rejected"):
    """Refused: at submission (``no_wait`` and it could not start now), or by an admin."""

    job_id: str
    reasons: list[Reason]


class JobBlocked(Event, frozen=True, tag="job_blocked"):
    """Waits for an admin's approval before it may queue."""

    job_id: str
    reason: str


class JobApproved(Event, frozen=True, tag="job_approved"):
    job_id: str


class JobHeld(Event, frozen=True, tag="job_held"):
    """Kept out of scheduling by its owner or an admin until released (Slurm's hold)."""

    job_id: str


class JobReleased(Event, frozen=True, tag="job_released"):
    job_id: str


class PriorityChanged(Event, frozen=True, tag="priority_changed"):
    job_id: str
    priority_override: int | None


class JobsPurged(Event, frozen=True, tag="jobs_purged"):
    """Terminal jobs removed from the read models (their events stay in the log)."""

    job_ids: list[str]
    older_than_days: int


class JobReasonsChanged(Event, frozen=True, tag="job_reasons_changed"):
    """The set of checks holding a waiting job changed (only changes are recorded)."""

    job_id: str
    reasons: list[Reason]


class GpusAllocated(Event, frozen=True, tag="gpus_allocated"):
    job_id: str
    attempt: int
    node: str
    gpus: list[int]


#: A job's first dispatch is its attempt 1; each one after it takes the next number.
FIRST_ATTEMPT = 1


class AttemptDispatched(Event, frozen=True, tag="attempt_dispatched"):
    job_id: str
    attempt: int
    node: str
    gpus: list[int]


class AttemptStarted(Event, frozen=True, tag="attempt_started"):
    """The attempt's process exists; ``adopted`` after a restart found it alive."""

    job_id: str
    attempt: int
    pid: int
    adopted: bool = False


class AttemptStopRequested(Event, frozen=True, tag="attempt_stop_requested"):
    job_id: str
    attempt: int
    reason: Literal["cancelled", "timeout"]


Outcome = Literal["exited", "timeout", "cancelled", "lost", "start_failed"]


class AttemptEnded(Event, frozen=True, tag="attempt_ended"):
    """The attempt's process is gone; ``exit_code`` is None when it is unknown."""

    job_id: str
    attempt: int
    outcome: Outcome
    exit_code: int | None = None
    detail: str = ""


class GpusReleased(Event, frozen=True, tag="gpus_released"):
    job_id: str
    attempt: int
    node: str
    gpus: list[int]
    reason: Literal["ended", "orphaned"]


class JobRequeued(Event, frozen=True, tag="job_requeued"):
    job_id: str
    next_attempt: int
    reason: str


class JobCompleted(Event, frozen=True, tag="job_completed"):
    job_id: str


class JobFailed(Event, frozen=True, tag="job_failed"):
    job_id: str
    reason: str


class JobCancelled(Event, frozen=True, tag="job_cancelled"):
    job_id: str


class StaleReportIgnored(Event, frozen=True, tag="stale_report_ignored"):
    """A report about an attempt that is no longer current (fencing)."""

    job_id: str
    attempt: int
    current_attempt: int
    report: str


# --- completion callbacks (eventq/callbacks) --------------------------------------------

#: Whose URL a notification goes to: the job's own (``notify_url``), or the server's
#: (``eventq server --notify-url``).
NotifyTarget = Literal["job", "server"]


class ServerNotifyUrlSet(Event, frozen=True, tag="server_notify_url_set"):
    """The server-wide URL every job that ends from now on is notified at (None: none);
    recorded at a start whose ``--notify-url`` differs from the log's."""

    url: str | None


class NotificationDelivered(Event, frozen=True, tag="notification_delivered"):
    """The receiver took a job's end (a 2xx answer): nothing is owed to it any more."""

    job_id: str
    #: The seq of the event that ended the job (a retried job can end again).
    ending: int
    target: NotifyTarget
    #: Tries made, this one included.
    tries: int
    status: int


class NotificationFailed(Event, frozen=True, tag="notification_failed"):
    """A try that failed; the next one is due at ``retry_at``, or, when it is None, none is
    (the notification is given up)."""

    job_id: str
    ending: int
    target: NotifyTarget
    tries: int
    error: str
    #: The receiver's HTTP status, when it answered.
    status: int | None = None
    retry_at: float | None = None


HookOutcome = Literal["exited", "timeout", "start_failed", "stopped"]


class HookRan(Event, frozen=True, tag="hook_ran"):
    """``eventq server --on-finish`` ran for a job's end, and what became of it."""

    job_id: str
    ending: int
    outcome: HookOutcome
    exit_code: int | None = None
    detail: str = ""


AnyEvent = (
    ServerStarted
    | NodeInventoryReported
    | UserCreated
    | UserUpdated
    | UserDeleted
    | TokenIssued
    | TokenRevoked
    | SessionOpened
    | SessionEnded
    | LimitsChanged
    | SettingsChanged
    | WorkerCreated
    | WorkerTokenRotated
    | WorkerConnected
    | WorkerDraining
    | WorkerLost
    | WorkerRemoved
    | WorkersRequested
    | WorkersRequestSubmitted
    | WorkersRequestFailed
    | RequestedWorkerChanged
    | RequestedWorkersCancelled
    | JobSubmitted
    | JobReady
    | JobRejected
    | JobBlocked
    | JobApproved
    | JobHeld
    | JobReleased
    | PriorityChanged
    | JobsPurged
    | JobReasonsChanged
    | GpusAllocated
    | AttemptDispatched
    | AttemptStarted
    | AttemptStopRequested
    | AttemptEnded
    | GpusReleased
    | JobRequeued
    | JobCompleted
    | JobFailed
    | JobCancelled
    | StaleReportIgnored
    | ServerNotifyUrlSet
    | NotificationDelivered
    | NotificationFailed
    | HookRan
)

EVENT_TYPES: dict[str, type[Event]] = {
    t.__struct_config__.tag: t for t in AnyEvent.__args__
}
#: The stored type name of each event type.
EVENT_TAGS: dict[type[Event], str] = {t: tag for tag, t in EVENT_TYPES.items()}


def event_type(event: Event) -> str:
    """The stored type name (the pinned tag) of an event."""
    tag = event.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def event_worker_id(event: Event) -> str | None:
    worker_id = getattr(event, "worker_id", None)
    return worker_id if isinstance(worker_id, str) else None


def event_job_id(event: Event) -> str | None:
    """The job an event is about, for the log's by-job index."""
    if isinstance(event, JobSubmitted):
        return event.job.job_id
    job_id = getattr(event, "job_id", None)
    return job_id if isinstance(job_id, str) else None


# --- encoding and upcasting -----------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[AnyEvent] = msgspec.msgpack.Decoder(AnyEvent)
#: Bodies of the current version, for a loop that decodes a million (``decode`` otherwise).
DECODER = _decoder
_raw_decoder = msgspec.msgpack.Decoder(dict[str, Any])

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _v0_job_submitted(body: dict[str, Any]) -> dict[str, Any]:
    """v0 stored SimpleTuner's ``num_processes`` where v1 stores ``gpus``."""
    job = dict(body["job"])
    if "num_processes" in job:
        job["gpus"] = job.pop("num_processes")
    return {**body, "job": job}


#: (type, stored version) -> step to version + 1.
UPCASTERS: dict[tuple[str, int], Upcaster] = {
    ("job_submitted", 0): _v0_job_submitted,
}


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def unstorable_field(spec: JobSpec) -> str | None:
    """The field of a job the log cannot encode (msgpack has no integers beyond 64 bits)."""
    for name in ("metadata", "config"):
        try:
            _encoder.encode(getattr(spec, name))
        except (OverflowError, msgspec.EncodeError):
            return name
    return None


def decode(body: bytes, version: int = SCHEMA_VERSION) -> AnyEvent:
    """Decode a stored body, upcasting it first if it was stored by an older version."""
    if version == SCHEMA_VERSION:
        return _decoder.decode(body)
    raw = _raw_decoder.decode(body)
    for step in range(version, SCHEMA_VERSION):
        upcast = UPCASTERS.get((raw["type"], step))
        if upcast is not None:
            raw = upcast(raw)
    event: AnyEvent = msgspec.convert(raw, AnyEvent)
    return event
