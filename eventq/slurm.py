"""The Slurm provider (SPEC 12): ``sbatch --array`` of ``eventq worker --slurm`` tasks,
``squeue`` to see them, ``scancel`` to end them; and what a worker reads of its Slurm job.

The array's secret (``wa_…``, from which each task derives its worker token) reaches the
tasks only through the environment of ``sbatch`` (``--export=ALL``), never its arguments
(which every user sees in ``ps``) nor a file: Slurm keeps a job's environment for its owner,
root and the Slurm user alone, and in the job it lives in the worker's own process
environment, readable by its user and root only. The batch script, which the job's owner can
read back (``scontrol write batch_script``), holds no secret.

Every request carries its name (``--job-name PREFIX-REQUEST``), so ``squeue`` finds it even
when a crash lost the id ``sbatch`` answered, and several servers share one cluster without
ever looking at each other's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from eventq.provider import Observed, Offer, ProviderError, Sighting, Submission

log = structlog.get_logger()

#: Seconds any Slurm command may take before the call is given up.
COMMAND_TIMEOUT = 30.0
#: Slurm shows a running job's INFINITE time limit as a year.
YEAR = 365 * 86400.0
#: The squeue columns read: name, array job id, task id, state, reason, node list.
SQUEUE_FORMAT = "%j|%F|%K|%T|%r|%N"
PENDING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
ENDED = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"})
#: Where the output of failed tasks is kept, and how many of the latest stay there.
FAILED_DIR = "failed"
KEEP_FAILED = 20
#: scancel's words for a task that has ended already: nothing left to cancel.
GONE = ("already completing or completed", "Invalid job id")
_GRES = re.compile(r"^gpu(?::([A-Za-z][\w.-]*))?(?::(\d+))?$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class SlurmSettingsError(ValueError):
    """A ``--slurm-*`` flag Slurm would not accept; the message names it."""


@dataclass(frozen=True)
class SlurmSettings:
    """``eventq server --slurm-partition P`` and its companions."""

    partition: str
    max_workers: int = 4
    gres: str = "gpu:1"
    #: Each task's time limit (``--time``); None: the partition's default.
    time: str | None = None
    account: str | None = None
    #: More ``sbatch`` options, as given (``--slurm-extra "--qos=high --mem=32G"``).
    extra: tuple[str, ...] = ()
    #: Seconds a worker may stay idle before its task is cancelled.
    idle_timeout: float = 60.0
    #: Seconds of each task's time kept free at its end (the worker's ``--margin-time``).
    margin: float = 60.0
    #: A simulated inventory for the workers (``--gpus``), for fake GRES GPUs and tests.
    worker_gpus: str | None = None
    #: Prefix of every job name: tells this server's requests from anyone else's.
    job_name: str = "eventq"

    def check(self) -> None:
        """Raise SlurmSettingsError naming the first flag that cannot work."""
        if not self.partition.strip():
            raise SlurmSettingsError("--slurm-partition must name a partition")
        if self.max_workers < 1:
            raise SlurmSettingsError("--slurm-max-workers must be at least 1")
        parse_gres(self.gres)
        limit = None if self.time is None else parse_time(self.time)
        if self.time is not None and limit is None:
            raise SlurmSettingsError(f"--slurm-time {self.time!r} is no time limit")
        if limit is not None and limit <= self.margin:
            raise SlurmSettingsError(f"--slurm-time {self.time} leaves nothing past "
                                     f"--slurm-margin-time {self.margin:g}s")
        if self.idle_timeout <= 0 or self.margin < 0:
            raise SlurmSettingsError("--slurm-idle-timeout must be positive and "
                                     "--slurm-margin-time not negative")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", self.job_name):
            raise SlurmSettingsError("--slurm-job-name must be 1-40 of A-Z a-z 0-9 _ . -")


def parse_gres(text: str) -> tuple[str | None, int]:
    """``gpu:2`` → (None, 2); ``gpu:a100:2`` → ("a100", 2); ``gpu`` → (None, 1)."""
    match = _GRES.match(text.strip())
    if match is None:
        raise SlurmSettingsError(f"--slurm-gres {text!r} must read gpu[:TYPE][:COUNT], "
                                 "e.g. gpu:2 or gpu:a100:2")
    count = int(match[2] or 1)
    if count < 1:
        raise SlurmSettingsError("--slurm-gres must ask for at least one GPU")
    return match[1], count


def parse_time(text: str) -> float | None:
    """A Slurm time (``30``, ``4:00:00``, ``2-12``, ``1-00:30:00``) in seconds; None for
    an unlimited, unset or unreadable one."""
    text = text.strip()
    match = _TIME.match(text)
    if match is None:
        return None
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is None:  # MM, MM:SS, HH:MM:SS
        parts = [p for p in (first, second, third) if p is not None]
        if len(parts) == 3:
            seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
        else:
            seconds = parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)
    else:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = days * 86400 + (first or 0) * 3600 + (second or 0) * 60 + (third or 0)
    return float(seconds) if 0 < seconds < YEAR else None


def sightings(text: str, prefix: str) -> dict[str, Sighting]:
    """Read ``squeue --array --format SQUEUE_FORMAT`` lines, keyed by request id.

    A line whose task is ``N/A`` is the array's own record: it holds the tasks that never
    got one of their own (cancelled before they started, say), which take its state."""
    found: dict[str, tuple[str, dict[int, Observed], Observed | None]] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 6 or not fields[0].startswith(f"{prefix}-"):
            continue
        name, batch, task, state, reason, nodes = fields
        request_id = name[len(prefix) + 1:]
        seen = observed(state, reason, nodes)
        tasks = found.setdefault(request_id, (batch, {}, None))[1]
        if task.isdigit():
            tasks[int(task)] = seen
        else:
            found[request_id] = (batch, tasks, seen)
    return {r: Sighting(batch, tasks, others) for r, (batch, tasks, others) in found.items()}


def observed(state: str, reason: str, nodes: str) -> Observed:
    """One squeue line as eventq reads it."""
    node = nodes if nodes and nodes not in ("(null)", "None") else None
    if state in PENDING:
        return Observed("pending", reason if reason and reason != "None" else state.lower())
    if state in ENDED:
        return Observed("ended", state, node)
    return Observed("running", "" if state == "RUNNING" else state.lower(), node)


def partition_limit(text: str) -> float | None:
    """A task's time limit from ``scontrol show partition --oneliner``: its DefaultTime,
    else its MaxTime; None when unlimited."""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    for key in ("DefaultTime", "MaxTime"):
        limit = parse_time(fields.get(key, ""))
        if limit is not None:
            return limit
    return None


class SlurmProvider:
    """Starts eventq workers as the tasks of ``sbatch --array`` jobs."""

    def __init__(self, settings: SlurmSettings, data_dir: Path) -> None:
        self.settings = settings
        #: Where Slurm writes each task's output (``%A_%a.out``), and the tasks' directory.
        self.output_dir = data_dir / "slurm"
        gpu_type, count = parse_gres(settings.gres)
        labels = {"slurm_partition": settings.partition}
        if gpu_type:
            labels["gpu_type"] = gpu_type
        self.limit = parse_time(settings.time) if settings.time else None
        self.offer = self._offer(labels, count)

    def _offer(self, labels: dict[str, str], gpus: int) -> Offer:
        s = self.settings
        budget = None if self.limit is None else max(0.0, self.limit - s.margin)
        where = f"--slurm-time {s.time}" if s.time else f"partition {s.partition}'s time limit"
        time = s.time or "the partition's time limit"
        return Offer("slurm", labels, gpus, budget, s.max_workers,
                     gpus_source=f"--slurm-gres {s.gres}",
                     budget_source=f"{where} less --slurm-margin-time {s.margin:.0f}s",
                     max_source=f"--slurm-max-workers {s.max_workers}",
                     asks=f"partition {s.partition}, --gres {s.gres}, {time}"
                          + (f", account {s.account}" if s.account else ""))

    async def check(self) -> None:
        """Is the partition there? Without ``--slurm-time``, its limit is each task's."""
        text = await run(["scontrol", "show", "partition", self.settings.partition,
                          "--oneliner"])
        if self.settings.time is None:
            self.limit = partition_limit(text)
            self.offer = self._offer(dict(self.offer.labels), self.offer.gpus)

    def job_name(self, request_id: str) -> str:
        return f"{self.settings.job_name}-{request_id}"

    def sbatch_argv(self, submission: Submission) -> list[str]:
        s = self.settings
        argv = ["sbatch", "--parsable", f"--job-name={self.job_name(submission.request_id)}",
                f"--array=0-{submission.tasks - 1}", f"--partition={s.partition}",
                f"--gres={s.gres}", f"--output={self.output_dir}/%A_%a.out",
                f"--chdir={self.output_dir}", "--export=ALL"]
        if s.time:
            argv.append(f"--time={s.time}")
        if s.account:
            argv.append(f"--account={s.account}")
        return argv + list(s.extra)

    def script(self, submission: Submission) -> str:
        """The batch script: one worker per task, its directory removed when it ends. The
        TERM trap only lets the script outlive the worker for that: a trap, unlike an
        ignored signal, is not passed on to the processes the script starts."""
        s = self.settings
        worker = [sys.executable, "-m", "eventq.cli.main", "worker", "--slurm",
                  "--url", submission.url, "--margin-time", f"{s.margin:g}"]
        if s.worker_gpus:
            worker += ["--gpus", s.worker_gpus]
        return "\n".join([
            "#!/bin/sh",
            f"# eventq worker of request {submission.request_id} (eventq server "
            f"--slurm-partition {s.partition}); its token comes in the environment",
            "trap 'true' TERM",
            'dir="${TMPDIR:-/tmp}/eventq-slurm-$SLURM_JOB_ID"',
            shlex.join(worker) + ' --data-dir "$dir"',
            "code=$?",
            'rm -rf "$dir"',
            "exit $code", ""])

    async def submit(self, submission: Submission) -> str:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQ_")}
        env["EVENTQ_WORKER_TOKEN"] = submission.secret
        if submission.ca:
            env["EVENTQ_CA"] = submission.ca
        out = await run(self.sbatch_argv(submission), self.script(submission), env)
        batch_id = out.strip().split(";")[0]
        if not batch_id.isdigit():
            raise ProviderError(f"sbatch answered {out.strip()!r}, not a job id")
        return batch_id

    async def observe(self, request_ids: list[str]) -> dict[str, Sighting]:
        names = ",".join(self.job_name(r) for r in request_ids)
        out = await run(["squeue", "--noheader", "--array", "--states=all", f"--name={names}",
                         f"--format={SQUEUE_FORMAT}"])
        return sightings(out, self.settings.job_name)

    async def cancel(self, batch_id: str, tasks: list[int]) -> None:
        try:
            await run(["scancel", *(f"{batch_id}_{t}" for t in tasks)])
        except ProviderError as exc:
            if not any(word in str(exc) for word in GONE):
                raise


    def discard_output(self, batch_id: str, task: int, failed: bool) -> None:
        """A task's ``%A_%a.out`` goes once its worker has left; a failed task's moves to
        ``failed/``, where the latest KEEP_FAILED stay."""
        path = self.output_dir / f"{batch_id}_{task}.out"
        try:
            if not failed:
                path.unlink(missing_ok=True)
                return
            kept = self.output_dir / FAILED_DIR
            kept.mkdir(exist_ok=True)
            path.replace(kept / path.name)
            for old in sorted(kept.glob("*.out"), key=lambda f: f.stat().st_mtime,
                              reverse=True)[KEEP_FAILED:]:
                old.unlink(missing_ok=True)
        except OSError as exc:  # a file someone removed by hand: nothing to tidy
            log.info("slurm_output_not_tidied", file=str(path), why=str(exc))


async def run(argv: list[str], stdin: str | None = None,
              env: dict[str, str] | None = None) -> str:
    """Run a Slurm command; its output, or ProviderError with what it said."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as exc:
        raise ProviderError(f"{argv[0]} cannot run: {exc.strerror or exc}") from None
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(None if stdin is None else stdin.encode()), COMMAND_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.communicate()
        raise ProviderError(f"{argv[0]} did not answer within {COMMAND_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        said = (err or out).decode(errors="replace").strip().replace("\n", "; ")
        raise ProviderError(f"{argv[0]} failed (exit {proc.returncode}): {said[:500]}")
    return out.decode(errors="replace")


# --- the worker's side: what a task reads of its Slurm job ----------------------------


@dataclass(frozen=True)
class SlurmTask:
    """The Slurm job an ``eventq worker --slurm`` runs in, from its environment."""

    job_id: str
    #: ``123_4`` for a task of an array, else the job id.
    label: str
    task: int | None
    partition: str
    #: The node it runs on, as Slurm names it.
    node: str
    #: GPU indices Slurm gave the job on this node (``SLURM_JOB_GPUS``).
    gpus: tuple[int, ...] | None

    @classmethod
    def from_environ(cls, env: dict[str, str]) -> SlurmTask | None:
        job_id = env.get("SLURM_JOB_ID")
        if not job_id:
            return None
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        gpus = env.get("SLURM_JOB_GPUS")
        return cls(job_id, f"{array}_{task}" if array and task else job_id,
                   int(task) if task and task.isdigit() else None,
                   env.get("SLURM_JOB_PARTITION", ""), env.get("SLURMD_NODENAME", ""),
                   tuple(int(g) for g in gpus.split(",") if g.isdigit()) if gpus else None)


def ask_time_left(job_id: str) -> subprocess.Popen[str] | None:
    """Ask Slurm (``squeue``) without waiting for its answer: a worker starting under Slurm
    loads its modules meanwhile (``read_time_left`` takes the answer). None: cannot ask."""
    try:
        return subprocess.Popen(["squeue", "--noheader", f"--jobs={job_id}", "--format=%l|%L"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    except OSError:
        return None


def read_time_left(asked: subprocess.Popen[str] | None) -> float | None:
    """``ask_time_left``'s answer: seconds left; None if unlimited or unknown."""
    if asked is None:
        return None
    try:
        out, _ = asked.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        asked.kill()
        asked.communicate()
        return None
    if asked.returncode != 0:
        return None
    limit, _, left = out.strip().partition("|")
    # An unlimited job shows a limit of a year, and a year less what it ran as time left.
    return parse_time(left) if parse_time(limit) is not None else None
