"""Assembles one orchestrator: lock, log, actors, projections, local node, recovery.

A start acts on nothing (no recovery, no dispatch, no process, no listener) until the whole
log has been verified and folded; a start that cannot do that ends with one line saying why
(``CannotStart``) and leaves nothing behind: no thread, no lock.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog

from eventq import __version__, gpus, lockfile
from eventq import events as ev
from eventq.actionlog import ActionLog
from eventq.actors.allocator import Allocator, GpuTable, ReportInventory
from eventq.actors.provisioner import Provisioner
from eventq.actors.registry import AddUser, Registry, decide_user
from eventq.actors.requests_state import Requests
from eventq.actors.scheduler import CheckReady, Process, ReleaseOrphans, Scheduler, SetLimits
from eventq.actors.scheduler_state import SchedulerState
from eventq.actors.workers_state import Workers
from eventq.auth import TOKEN_FILE, Users, new_token, token_hash, write_secret
from eventq.callbacks.notifier import CallbackSettings, Notifier
from eventq.callbacks.owed import Notifications
from eventq.clock import Clock, RealClock
from eventq.gpus import Inventory
from eventq.http.hub import WorkerHub
from eventq.jobenv import EnvFiles
from eventq.log import EventLog, HeadTrust, KeyFileInvalid, LogCorrupt
from eventq.logfiles import DEFAULT_CAP, AttemptLogs
from eventq.node import LocalNode
from eventq.paths import LOG_FILE, SERVER_FILE
from eventq.projections.history import History
from eventq.projections.queue import QueueView
from eventq.provider import ProviderError
from eventq.slurm import SlurmProvider, SlurmSettings

log = structlog.get_logger()

LOCK_FILE = "server.lock"
INVENTORY_REFRESH_SECONDS = 15.0


class CannotStart(RuntimeError):
    """The server will not start; the message is one line: why, and what to do."""


class AlreadyRunning(CannotStart):
    pass


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or repr(exc)


def default_data_dir() -> Path:
    return Path(os.environ.get("EVENTQ_HOME") or Path.home() / ".eventq")


def take_lock(data_dir: Path) -> IO[str]:
    """One server per data directory, so two schedulers can never run the same job."""
    try:
        return lockfile.take(data_dir / LOCK_FILE)
    except lockfile.Held as held:
        raise AlreadyRunning(
            f"another eventq server (pid {held.holder}) is running on {data_dir}; "
            "stop it first, or use another --data-dir") from None
    except OSError as exc:
        raise CannotStart(f"cannot write in the data directory {data_dir} ({_why(exc)}); "
                          "give the server a writable --data-dir") from None


def _refusal(exc: BaseException, path: Path, data_dir: Path) -> CannotStart | None:
    """What a failed replay means to whoever started the server."""
    check = f"`eventq replay verify --data-dir {data_dir}`"
    if isinstance(exc, LogCorrupt):
        where = f"at seq {exc.seq}" if exc.first else f"at or before seq {exc.seq}"
        return CannotStart(f"refusing to start: the event log {path} was changed {where} "
                           f"({exc.why}); nothing was run. {check} names what differs; "
                           "restore the data directory from a backup")
    if isinstance(exc, sqlite3.DatabaseError):
        return CannotStart(f"refusing to start: the event log {path} cannot be read ({exc}); "
                           f"nothing was run. See {check}")
    return None


@dataclass
class Orchestrator:
    data_dir: Path
    inventory: Inventory
    clock: Clock = field(default_factory=RealClock)
    grace_seconds: float = 10.0
    limits: ev.Limits | None = None
    #: Seconds of silence after which a worker is offline (SPEC 6: 120).
    heartbeat_timeout: float = field(default_factory=lambda: float(
        os.environ.get("EVENTQ_HEARTBEAT_TIMEOUT", "120")))
    #: Where ``config_name`` is resolved (default: DATA/configs).
    configs_dir: Path = Path()
    #: Bytes of an attempt's stdout (and of its stderr) kept; older output is dropped.
    log_cap_bytes: int = DEFAULT_CAP
    #: The process is this server's for its whole life (``eventq server``): the state a
    #: replay or a batch builds is moved out of the cyclic collector's view (gc.freeze)
    #: instead of being scanned again. Off where many orchestrators come and go (tests).
    long_lived: bool = False
    #: The URL workers on other machines reach this server at (``eventq server
    #: --advertise-url``, else this host's name when it listens beyond loopback); None when
    #: it listens on loopback only.
    advertise_url: str | None = None
    #: Completion callbacks: the server-wide notify URL, the on-finish hook, their timing.
    callbacks: CallbackSettings = field(default_factory=CallbackSettings)
    #: Write one line per action once the log holds it (``eventq.actionlog``), as ``eventq
    #: server`` does; off where nobody reads them (tests, tools).
    log_actions: bool = False
    #: Start workers through Slurm when jobs need them (``eventq server --slurm-partition``).
    slurm: SlurmSettings | None = None

    def __post_init__(self) -> None:
        # One spelling for the life of the data: attempts record it (their wrapper's argv,
        # the paths it writes after cd), and recovery recognises them by it.
        self.data_dir = Path(self.data_dir).resolve()
        if self.configs_dir == Path():
            self.configs_dir = self.data_dir / "configs"

    running: bool = False
    _refresh: asyncio.Task[None] | None = None
    provider: SlurmProvider | None = None
    provisioner: Provisioner | None = None

    async def start(self) -> None:
        self.provider = await self._provider()
        self._lock = take_lock(self.data_dir)
        try:
            replayed = await self._open_log()
        except BaseException:
            self._lock.close()
            raise
        self.running = True
        self._remove_purged_directories()
        #: What a previous server left running here: the only attempts recovery may judge.
        self._left_active = [(job.spec.job_id, job.attempt) for job in self.state.jobs.values()
                             if job.active and job.node == "local"]
        self._subscribe_effects()
        self.log.start()
        self.attempt_logs.start()
        self.allocator.start()
        self.scheduler.start()
        self.registry.start()
        self.log.append("system", [ev.ServerStarted(pid=os.getpid(), version=__version__)])
        self.notifier.start()
        self.admin_token = self._bootstrap_admin()
        await self.allocator.ask(ReportInventory("local", self.inventory.gpus,
                                                 self.inventory.simulated,
                                                 self.inventory.nvml_error))
        limits = self.limits if self.limits is not None else self._first_limits()
        if limits is not None and limits != self.state.limits:
            await self.scheduler.ask(SetLimits(limits, "system"))
        await self.recover(replayed)
        self.registry.watch_known_workers(
            {node for node, active in self.state.node_active.items()
             if active and node != "local" and node not in self.workers.by_id})
        if self.inventory.reads_nvml:
            self._refresh = asyncio.get_running_loop().create_task(self._refresh_inventory())

    def _subscribe_effects(self) -> None:
        """The parts that act on what the log holds, each once it is durable, in this order."""
        self.env_files = EnvFiles(self.data_dir, self.state, self.log.on_fatal)
        self.env_files.sweep()
        self.log.on_durable(self.env_files.on_durable, EnvFiles.DURABLE_READS)
        self.node = LocalNode(self.data_dir, self.scheduler, self.state, self.grace_seconds)
        self.log.on_durable(self.node.on_durable, LocalNode.DURABLE_READS)
        self.hub = WorkerHub(self.data_dir, self.state, self.workers, self.registry)
        self.log.on_durable(self.hub.on_durable, WorkerHub.DURABLE_READS)
        self.attempt_logs = AttemptLogs(self.data_dir, self.state, lambda: self.log_cap_bytes)
        self.log.on_durable(self.attempt_logs.on_durable, AttemptLogs.DURABLE_READS)
        self.notifier = Notifier(self.log, self.notifications, self.clock, self.callbacks)
        self.log.on_durable(self.notifier.on_durable, Notifier.DURABLE_READS)
        if self.log_actions:  # after the node: a commit's lines never delay its processes
            actions = ActionLog(self.state, self.workers)
            self.log.on_durable(actions.on_durable, actions.reads)

    def _first_limits(self) -> ev.Limits | None:
        """Today's defaults, for a log that has recorded no limits and run no job yet. A log
        whose jobs ran under the unrecorded limits keeps them (an admin changes them)."""
        if self.state.limits_recorded or self.state.jobs:
            return None
        return ev.Limits()

    async def _provider(self) -> SlurmProvider | None:
        """The batch system that starts workers, checked before anything else happens: a
        partition Slurm does not know, or no Slurm command at all, ends the start."""
        if self.slurm is None:
            return None
        provider = SlurmProvider(self.slurm, self.data_dir)
        try:
            await provider.check()
        except ProviderError as exc:
            if "cannot run" in str(exc) or "not found" in str(exc):
                raise CannotStart(f"--slurm-partition {self.slurm.partition}: {exc}") from None
            log.warning("slurm_unchecked", why=str(exc),
                        note="the partition's time limit is unknown until a restart")
        return provider

    def start_provisioning(self, url: str, ca: str | None = None) -> None:
        """Once the server listens at ``url``: ask the provider for workers on demand."""
        if self.provider is None:
            if self.requests.by_id:
                log.warning("requests_left_alone", requests=len(self.requests.by_id),
                            note="requests for workers are open, but this server was started "
                                 "without --slurm-partition: they are neither watched nor "
                                 "cancelled")
            return
        self.provisioner = Provisioner(
            self.log, self.requests, self.scheduler, self.registry, self.workers,
            self.provider, self.clock, self.provider.settings.idle_timeout, url, ca)
        self.scheduler.provider_note = self.provisioner.note
        self.provisioner.start()

    async def _open_log(self) -> int:
        """Open the log and fold it, verified whole, into new actors; returns the number of
        events. Nothing acts on them yet: the actors are not started."""
        path = self.data_dir / LOG_FILE
        try:
            self.log = await EventLog.open(path, self.clock.now)
        except (OSError, sqlite3.Error, KeyFileInvalid) as exc:
            raise CannotStart(f"cannot open the event log {path} ({_why(exc)})") from None
        try:
            self._assemble()
            with self.state.replaying():
                replayed = self.log.replay(keep=self.long_lived)
        except BaseException as exc:
            await self.log.close()  # writes nothing: a log writes only once started
            refusal = _refusal(exc, path, self.data_dir)
            if refusal is None:
                raise
            raise refusal from exc
        if self.log.trust is HeadTrust.UNKEYED and replayed:
            log.warning("log_not_anchored", events=replayed, detail=(
                "no keyed anchor: the chain was verified whole from seq 1, but a cut tail or "
                "a chain recomputed after an edit would not show; anchored from now on"))
        return replayed

    def _assemble(self) -> None:
        """The actors and read models, subscribed to the log (not started)."""
        self.state, self.gpu_table, self.users = SchedulerState(), GpuTable(), Users()
        self.allocator = Allocator(self.log, self.gpu_table)
        self.scheduler = Scheduler(self.log, self.state, self.allocator, self.gpu_table,
                                   self.clock)
        self.workers = Workers()
        self.scheduler.workers = self.workers
        self.registry = Registry(self.log, self.users, self.workers, self.scheduler,
                                 self.allocator, self.clock, self.heartbeat_timeout)
        self.queue = QueueView(self.state, self.gpu_table, self.scheduler)
        self.sessions = self.registry.sessions
        #: The past, for replay and the GPUs over time (``projections/history.py``).
        self.history = History(self.state, self.gpu_table, self.workers)
        self.notifications = Notifications(self.state)  # reads the state folded before it
        self.requests = Requests()
        self.log.fold_into(self.state, self.gpu_table, self.users, self.workers, self.queue,
                           self.sessions, self.history, self.notifications, self.requests)

    def _remove_purged_directories(self) -> None:
        """A purge is durable before its directories go: finish one a crash interrupted."""
        jobs = self.data_dir / "jobs"
        if not jobs.is_dir():
            return
        for directory in jobs.iterdir():
            if directory.name not in self.state.jobs and directory.is_dir():
                shutil.rmtree(directory, ignore_errors=True)

    async def _refresh_inventory(self) -> None:
        """Re-read NVML now and then: a GPU another program fills up stops being allocatable."""
        while True:
            await asyncio.sleep(INVENTORY_REFRESH_SECONDS)
            inv = await asyncio.to_thread(gpus.from_nvml)
            self.allocator.tell(ReportInventory("local", inv.gpus, inv.simulated, inv.nvml_error))
            self.scheduler.tell(Process())

    async def recover(self, replayed: int) -> None:
        """Release orphans, reconcile attempts with their processes, dispatch at once; the
        workers the log shows online get one timeout to come back."""
        await self.scheduler.ask(ReleaseOrphans())
        found = await self.node.recover(self._left_active)
        self.node.stand_by()
        for job in self.state.jobs.values():
            if job.active and job.spec.max_runtime is not None:
                self.scheduler.arm_timeout(job)
        for job in self.state.with_status("waiting"):
            self.scheduler.tell(CheckReady(job.spec.job_id))  # begin times passed while down
        await self.scheduler.ask(Process())
        await self.log.flush()
        log.info("recovered", events=replayed, **found, waiting=self.state.waiting_count())
        self.registry.watch_known_workers(
            {node for node, active in self.state.node_active.items()
             if active and node != "local" and node not in self.workers.by_id})

    def _bootstrap_admin(self) -> str | None:
        """First start: create the admin and write its token to a 0600 file."""
        token_path = self.data_dir / TOKEN_FILE
        if any(u.level == ev.Level.ADMIN for u in self.users.by_name.values()):
            return token_path.read_text().strip() if token_path.exists() else None
        token = new_token()
        self.log.append("system", [ev.UserCreated(name="admin", level=ev.Level.ADMIN, team=None,
                                                  token_sha256=token_hash(token))])
        write_secret(token_path, token)
        return token

    def add_user(self, name: str, level: ev.Level, team: str | None = None) -> str:
        """Create a user and return their token (shown once; only its hash is kept).

        The registry's own decision, taken synchronously: for set-up code and tests that
        have no event loop turn to spare (the API goes through the registry's mailbox)."""
        token = new_token()
        events = decide_user(self.users, AddUser("system", name, level, team), token_hash(token))
        self.log.append("system", events)
        return token

    def write_server_file(self, url: str, **more: str | None) -> None:
        """Atomically: a CLI started at the same moment reads all of it or none."""
        tmp = self.data_dir / f"{SERVER_FILE}.tmp"
        extra = {k: v for k, v in more.items() if v is not None}
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), **extra}))
        os.replace(tmp, self.data_dir / SERVER_FILE)

    async def stop(self) -> None:
        """Stop accepting work; running attempts keep running and are adopted on restart."""
        if not self.running:
            return
        self.running = False
        if self._refresh is not None:
            self._refresh.cancel()
        await self.notifier.stop()
        running = self.state.counts.total
        if self.provisioner is not None:
            await self.provisioner.stop()
        await self.scheduler.stop()
        await self.allocator.stop()
        await self.registry.stop()
        await self.node.shutdown()
        await self.hub.close_all("the orchestrator is restarting", tell=False)
        await self.attempt_logs.stop()
        await self.env_files.stop()
        await self.log.close()
        (self.data_dir / SERVER_FILE).unlink(missing_ok=True)
        self._lock.close()
        log.info("shutdown", running_attempts_left_running=running,
                 waiting=self.state.waiting_count(), last_seq=self.log.head_seq)
