"""What the HTTP API answers, as msgspec types: the OpenAPI document is generated from them.

Each type mirrors one handler's reply field by field (seed 000 shapes). Every type forbids
unknown fields, so its schema says ``additionalProperties: false``: a handler that starts
answering a field nobody documented fails the schema tests. A field that is sometimes left
out has the default ``UNSET`` (not required); ``None`` is a JSON null that is always sent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType, field

from eventq import events as ev

#: A job's status as the scheduler knows it: ``pending`` is in the queue, ``waiting`` waits
#: for its dependencies or begin time before it joins the queue.
JobStatus = Literal["waiting", "pending", "dispatched", "running", "blocked", "held",
                    "completed", "failed", "cancelled", "rejected"]
#: The word seed 000 answers a submission with (``queued`` is waiting, ``running`` placed).
SubmitStatus = Literal["queued", "running", "blocked", "rejected",
                       "completed", "failed", "cancelled"]
EventType = Annotated[str, Meta(extra_json_schema={"enum": sorted(ev.EVENT_TYPES)})]
GpuIndices = list[int]


class Reply(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every reply type: unknown fields are a schema violation."""


class ApiErrorBody(Reply):
    """Every 4xx answer: what is wrong, the field it is about, and details when known."""

    error: str
    field: str | UnsetType = UNSET
    detail: Any | UnsetType = UNSET


class WaitReason(Reply):
    """One check that holds a job, e.g. ``user_limit``: ``alice runs 2 of 2``."""

    code: str
    detail: str


# --- the queue ------------------------------------------------------------------------


class SubmitReply(Reply):
    """A recorded submission; ``reasons`` when it waits, was refused or needs approval."""

    success: bool
    job_id: str
    status: SubmitStatus
    allocated_gpus: GpuIndices
    queue_position: int | None
    reasons: list[WaitReason] | UnsetType = UNSET


class DryRunReply(Reply):
    """What a submission would do now; nothing was recorded."""

    success: bool
    dry_run: bool
    job_id: None
    status: Literal["running", "queued", "blocked", "rejected"]
    node: str | None
    allocated_gpus: GpuIndices
    reasons: list[WaitReason]
    estimated_start: float | None
    estimate_note: str | UnsetType = UNSET


class JobCore(Reply):
    """What every listing of a job says of it, now or as it was at an event."""

    job_id: str
    name: str
    user: str
    team: str | None
    status: JobStatus
    #: Before aging: the override if set, else the level's.
    priority: int
    #: With aging (as it was then, in a replayed state).
    effective_priority: int
    gpus: int
    allocated_gpus: GpuIndices
    node: str | None
    target: ev.Target
    attempt: int
    max_attempts: int
    queued_at: float
    started_at: float | None
    completed_at: float | None
    exit_code: int | None
    error: str | None


class EstimateBasis(Reply):
    """What a waiting job's estimated start rests on.

    ``job_ends``: the end of job ``job_id`` frees the last GPU it needs (``frees: gpus``;
    the job runs, or is itself expected to start first) or a slot of the limit that holds
    it (``frees: slot``). ``end`` is that end, by the job's time limit or else its estimated
    runtime (``by``); null when it has neither (``by`` null) or ran past it: then the
    estimate is unknown too. ``gpus_free``: the GPUs it needs are free now. ``begin_at``: it
    waits only for its begin time, the earliest it can start."""

    kind: Literal["job_ends", "gpus_free", "begin_at"]
    job_id: str | UnsetType = UNSET
    name: str | UnsetType = UNSET
    status: JobStatus | UnsetType = UNSET
    end: float | UnsetType | None = UNSET
    by: Literal["time_limit", "estimated_runtime"] | UnsetType | None = UNSET
    frees: Literal["gpus", "slot"] | UnsetType = UNSET


class JobSummary(JobCore):
    """A job as the queue lists it."""

    metadata: dict[str, Any]
    #: The ids of the jobs it waits for (when it has any).
    depends_on: list[str] | UnsetType = UNSET
    #: Not before this time, epoch seconds (when it has one).
    begin_at: float | UnsetType = UNSET
    #: Queued, waiting, blocked and held jobs: what holds them.
    reasons: list[WaitReason] | UnsetType = UNSET
    #: Waiting jobs only (and ``estimated_start`` for one that waits only for its begin time).
    position: int | UnsetType | None = UNSET
    estimated_start: float | UnsetType | None = UNSET
    estimate_note: str | UnsetType = UNSET
    estimate_basis: EstimateBasis | UnsetType = UNSET


class JobDetail(JobSummary, kw_only=True):
    """One job in full (``GET /api/jobs/{job_id}``)."""

    command: list[str] | str
    max_runtime: float | None
    estimated_runtime: float | None
    #: The reasons last recorded in the log (the live ones are in ``reasons``).
    recorded_reasons: list[WaitReason]
    #: The variables it declared (``--env``, ``--export-env``), secret-looking values
    #: redacted; null when its environment file cannot be read (``env_error`` says why).
    env: dict[str, str] | None
    #: Its working directory (declared, or the submitter's), null for its attempt's own.
    cwd: str | None
    #: How many variables of the submitter's environment a run on the server's machine
    #: gets (jobs submitted since environments are kept out of the log).
    exported_env: int | UnsetType = UNSET
    env_error: str | UnsetType = UNSET


class BatchReply(Reply):
    """Every job of a batch was recorded, in one commit."""

    success: bool
    count: int
    job_ids: list[str]


class ImportedJob(Reply):
    """One row of an imported CSV and the job it became."""

    line: int
    name: str
    job_id: str


class ImportReply(Reply):
    """Every row of the CSV was recorded as a job, in one commit."""

    success: bool
    count: int
    job_ids: list[str]
    jobs: list[ImportedJob]


class QueueList(Reply):
    jobs: list[JobSummary]
    #: How many are in ``jobs``.
    count: int
    #: How many match the query in all, past ``limit`` and ``offset``.
    total: int


class JobsPage(Reply):
    """One page of the jobs table (``GET /api/jobs``)."""

    jobs: list[JobSummary]
    #: How many jobs match the filters, on every page.
    total: int
    #: Pass as ``after`` for the next page; null on the last one.
    next: str | None
    #: The last event of the log this page reflects: later ones change it.
    seq: int


class LocalBlock(Reply):
    """The local node in seed 000's stats."""

    running_jobs: int
    pending_jobs: int
    allocated_gpus: GpuIndices
    available_gpus: GpuIndices
    total_gpus: int
    simulated: bool
    max_concurrent_gpus: int | None
    #: null: no count of its own; the local GPUs are the bound.
    max_concurrent_jobs: int | None


class QueueStats(Reply):
    queue_depth: int
    running: int
    max_concurrent: int
    user_max_concurrent: int
    team_max_concurrent: int
    enable_fair_share: bool
    local_gpu_max_concurrent: int | None
    local_job_max_concurrent: int | None
    avg_wait_seconds: float
    #: Job count per status (statuses with no job are left out).
    by_status: dict[str, int]
    #: Jobs not yet finished, per user.
    by_user: dict[str, int]
    local: LocalBlock


class MyJobs(Reply):
    """``GET /api/queue/me``: who the caller is, and their queued, running and blocked jobs."""

    user: str
    level: ev.Level
    team: str | None
    pending_count: int
    running_count: int
    blocked_count: int
    best_position: int | None
    pending_jobs: list[JobSummary]
    running_jobs: list[JobSummary]


class PositionReply(Reply):
    queue_depth: int
    job_id: str
    status: JobStatus
    position: int | None
    reasons: list[WaitReason] | None
    estimated_start: float | None
    estimate_note: str | UnsetType = UNSET
    estimate_basis: EstimateBasis | UnsetType = UNSET


class LimitsReply(Reply):
    """The concurrency and fairness settings (SPEC 4)."""

    max_concurrent: int
    user_max_concurrent: int
    team_max_concurrent: int
    enable_fair_share: bool
    #: null: no count of its own; the local GPUs are the bound (the default).
    local_job_max_concurrent: int | None
    #: null: all the local GPUs.
    local_gpu_max_concurrent: int | None
    starvation_threshold_minutes: float
    aging_boost: int
    gpu_busy_memory_percent: float
    approval_cost_threshold: float | None


class StartedAttempt(Reply):
    """An attempt a change set off: dispatched to ``node`` on ``gpus``."""

    job_id: str
    attempt: int
    node: str
    gpus: GpuIndices


class LimitsSetReply(LimitsReply, kw_only=True):
    success: bool
    #: The jobs the change started (the scheduling pass it caused dispatched them).
    started: list[StartedAttempt]


class CancelReply(Reply):
    success: bool
    job_id: str
    status: JobStatus
    #: False when the attempt's process had not ended within the grace period.
    process_stopped: bool
    #: Whether an attempt was running (or dispatched) when it was cancelled: false for a
    #: job that never started, which had no process to stop.
    was_running: bool


class CancelManyReply(Reply):
    success: bool
    cancelled: int
    job_ids: list[str]


class ActionReply(Reply):
    """Approve, reject, priority, hold, release, retry: the job's status afterwards."""

    success: bool
    job_id: str
    status: JobStatus


class ProcessReply(Reply):
    success: bool
    dispatched: int
    queue_depth: int


class CleanupReply(Reply):
    success: bool
    deleted: int
    days: int


# --- system ---------------------------------------------------------------------------


class Gpu(Reply):
    index: int
    name: str
    memory_gb: float


class GpuInventory(Reply):
    backend: Literal["simulated", "cuda", "none"]
    count: int
    simulated: bool
    nvml_error: str | None
    capabilities: dict[str, Any]


class GpuDevice(Reply):
    index: int
    name: str
    memory_gb: float
    allocated: bool
    job_id: str | None
    #: False when another program fills its memory (it is busy with foreign work).
    allocatable: bool
    simulated: bool


class GpuAllocation(Reply):
    allocated_gpus: GpuIndices
    available_gpus: GpuIndices
    running_local_jobs: int
    devices: list[GpuDevice]


class SystemStatus(Reply):
    timestamp: float
    load_avg_5min: float
    memory_percent: float | None
    gpus: list[Gpu]
    gpu_inventory: GpuInventory
    #: With ``include_allocation=true`` only.
    gpu_allocation: GpuAllocation | UnsetType = UNSET


# --- jobs and events ------------------------------------------------------------------


class EventRecord(Reply):
    """One logged event: its envelope, and its fields (without ``type``) as ``body``."""

    seq: int
    time: float
    principal: str
    type: EventType
    body: dict[str, Any]


class JobEvents(Reply):
    job_id: str
    events: list[EventRecord]


class LogChunk(Reply):
    """``event: log`` of a followed log; the SSE ``id`` is ``<stream>:<byte offset>``."""

    stream: Literal["stdout", "stderr"]
    text: str


class LogEnd(Reply):
    """``event: end``: the attempt has ended and everything was sent."""

    job_id: str
    attempt: int
    status: str
    exit_code: int | None


class StreamDropped(Reply):
    """``event: dropped``: the subscriber fell behind and is closed; resume after ``last_seq``."""

    reason: str
    last_seq: int


class StreamRevoked(Reply, kw_only=True):
    """``event: revoked``: the token the stream was opened with is no longer valid, or its
    user may no longer see what it shows; the stream is closed. The event stream adds the
    seq to resume after (with a valid token)."""

    reason: str
    last_seq: int | None = None


# --- admin ----------------------------------------------------------------------------


class UserReply(Reply):
    name: str
    level: ev.Level
    team: str | None
    #: How many live tokens the user has.
    tokens: int


class UserList(Reply):
    users: list[UserReply]


class NewUserReply(UserReply, kw_only=True):
    #: Shown once; only its SHA-256 is kept.
    token: str


class TokenReply(Reply):
    name: str
    #: Shown once; only its SHA-256 is kept.
    token: str


class UserDeleted(Reply):
    success: bool
    name: str
    deleted: bool


class TokensRevoked(Reply):
    success: bool
    name: str
    tokens: int



# --- the web page's session -------------------------------------------------------------


class SessionReply(Reply):
    """A signed-in browser: who, at what level, and until when (fixed at sign-in)."""

    user: str
    level: ev.Level
    expires_at: float


class SignInCode(Reply):
    """A one-time sign-in code for the caller: good once, for five minutes."""

    code: str
    expires_at: float
    user: str
    #: The page's sign-in link, to follow from the server's URL (a fragment: it never
    #: reaches an access log).
    link: str


# --- the past ---------------------------------------------------------------------------


class ReplayJob(JobCore):
    """A job as ``GET /api/queue`` lists it, as it was at that event."""

    #: The reasons recorded for it by then (a waiting, blocked, held or rejected job).
    reasons: list[WaitReason]
    #: Its place in the queue then (jobs in the queue only).
    position: int | UnsetType = UNSET


class ReplayGpu(Reply):
    """A GPU of a node as it was: who held it (null: free)."""

    node: str
    index: int
    job_id: str | None
    attempt: int | None


class ReplayWorker(Reply):
    worker_id: str
    name: str
    status: Literal["connecting", "idle", "busy", "draining", "offline"]


class ReplayState(Reply):
    """The state right after event ``seq`` (0: before the first)."""

    seq: int
    #: The time of that event; null for seq 0.
    time: float | None
    #: The log's last seq now.
    head_seq: int
    #: Running jobs, waiting jobs in queue order, jobs waiting for dependencies or a begin
    #: time, blocked and held ones; then up to ``finished`` jobs that had ended, latest first.
    jobs: list[ReplayJob]
    #: Every GPU of every node known then.
    gpus: list[ReplayGpu]
    workers: list[ReplayWorker]


class GpuLane(Reply):
    node: str
    gpu: int


class GpuBar(Reply):
    """One attempt's hold on a node's GPUs, from allocation to release."""

    job_id: str
    attempt: int
    user: str
    #: The job's priority before aging (its override, else its user's level's).
    priority: int
    node: str
    gpus: GpuIndices
    start: float
    #: Null while it still holds them.
    end: float | None
    #: ``running`` while it holds them, else what became of the attempt.
    status: Literal["running", "completed", "failed", "timeout", "cancelled", "lost",
                    "start_failed", "orphaned"]


class GpuTimeline(Reply):
    now: float
    since: float
    until: float
    lanes: list[GpuLane]
    bars: list[GpuBar]
    #: More bars overlapped the window than ``limit``: the latest were kept.
    truncated: bool


class ReasonSpan(Reply):
    """One set of reasons a job waited on, from the event that set it to the one that
    changed it."""

    codes: list[str]
    detail: str
    reasons: list[WaitReason]
    from_: float = field(name="from")
    #: Null while it still holds.
    until: float | None
    seq: int
    event: EventType
    until_seq: int | None
    until_event: EventType | None


class ReasonHistory(Reply):
    job_id: str
    history: list[ReasonSpan]


# --- workers --------------------------------------------------------------------------


class WorkerReply(Reply):
    """A remote worker as admins see it."""

    worker_id: str
    name: str
    worker_type: Literal["ephemeral", "persistent"]
    status: Literal["connecting", "idle", "busy", "draining", "offline"]
    labels: dict[str, str]
    transport: Literal["ws", "sse"] | None
    current_jobs: list[str]
    gpus: list[Gpu]
    simulated: bool
    connected: bool
    offline_reason: str | None
    #: When the server last heard from it (epoch seconds; null: not since the server
    #: started). Liveness is kept in memory, never in the log.
    last_seen: float | None


class WorkerList(Reply):
    workers: list[WorkerReply]


class WorkerConnection(Reply):
    """How to start a worker on its machine."""

    #: The server's URL for other machines (``eventq server --advertise-url``, else its
    #: host's name); its own loopback address when it listens only there.
    url: str
    #: The command that starts eventq's agent for this worker.
    connection_command: str
    #: The same for SimpleTuner's stock worker (``SIMPLETUNER_ORCHESTRATOR_URL`` …).
    stock_worker_command: str
    #: Set when the server listens on loopback only: no other machine can reach it.
    note: str | UnsetType = UNSET


class NewWorkerReply(WorkerConnection, kw_only=True):
    worker_id: str
    #: Shown once; only its SHA-256 is kept.
    token: str
    name: str


class WorkerTokenReply(WorkerConnection, kw_only=True):
    worker_id: str
    #: Shown once; the previous token stops working.
    token: str
    #: With keep_running: the worker's connected agent was handed the token and goes on.
    handed_to_live_agent: bool


class WorkerRemoved(Reply):
    success: bool
    worker_id: str


class ResumeJob(Reply):
    """The job a re-registering stock worker may go on with."""

    job_id: str
    config_name: str | None
    status: JobStatus


class RegisterReply(Reply):
    worker_id: str
    #: Where the stock worker opens its SSE stream.
    sse_url: str
    resume_job: ResumeJob | None
    #: The job it reported as current, which it must abandon (given to another worker).
    abandon_job: str | None


class Done(Reply):
    success: bool


class HasJobs(Reply):
    has_jobs: bool


# --- what a stock worker's stream carries -----------------------------------------------


class WorkerJobSubmit(Reply):
    """``job_submit``: run this attempt. The stock worker reads ``job_id`` to ``provider``;
    eventq's own fields follow."""

    type: Literal["job_submit"]
    job_id: str
    attempt: int
    config: dict[str, Any]
    config_name: str | None
    dataloader: None
    upload_endpoint: str
    #: Always a string, never null (the stock worker sends it as a header).
    upload_token: str
    provider: str
    command: list[str] | str
    gpus: GpuIndices
    env: dict[str, str]
    cwd: str | None
    max_runtime: float | None


class WorkerJobCancel(Reply):
    """``job_cancel``: stop this attempt."""

    type: Literal["job_cancel"]
    job_id: str
    attempt: int
    reason: str


class WorkerNotice(Reply):
    """``drain`` (finish what runs, take nothing new) or ``shutdown`` (the stream ends)."""

    type: Literal["drain", "shutdown"]
    reason: str


class WorkerPing(Reply):
    """``ping``, at least every 15 s: the stream is alive."""

    type: Literal["ping"]

