"""``eventq worker``: run jobs from a remote orchestrator on this machine's GPUs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from eventq.cli.client import CliError, default_data_dir

if TYPE_CHECKING:
    import ssl
    import subprocess

    from eventq.agent.agent import AgentConfig

# The agent's modules (aiohttp, the runner, asyncio) load only when a worker starts.


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    # Not ``common``'s --url/--token: a worker speaks with its own token, never a user's.
    w = sub.add_parser("worker", help="run jobs from a remote orchestrator on this machine")
    w.add_argument("--url", help="the orchestrator, e.g. http://orchestrator:8001 "
                                 "(default: $EVENTQ_URL)")
    w.add_argument("--token", help="this worker's token, from `eventq workers add` "
                                   "(default: $EVENTQ_WORKER_TOKEN)")
    w.add_argument("--ca", metavar="FILE",
                   help="verify an https orchestrator with this CA (PEM; default: "
                        "$EVENTQ_CA, or the system's CAs)")
    w.add_argument("--name", help="shown to the orchestrator (default: $EVENTQ_WORKER_NAME, "
                                  "or the host name)")
    w.add_argument("--persistent", action="store_true",
                   help="keep working after the orchestrator ends this worker's job "
                        "(without it, the worker exits when told to after its job)")
    w.add_argument("--gpus", help="a simulated inventory, e.g. 2xA100-80GB "
                                  "(default: $EVENTQ_WORKER_GPUS, else NVML)")
    w.add_argument("--labels", help="k=v,… merged under the admin's labels "
                                    "(default: $EVENTQ_WORKER_LABELS)")
    w.add_argument("--data-dir", type=Path,
                   help="where attempts run and are kept (default: $EVENTQ_HOME/worker or "
                        "~/.eventq/worker)")
    w.add_argument("--trainer", help="the command that runs config jobs "
                                     "(default: python -m simpletuner.train)")
    w.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping a job")
    w.add_argument("--max-runtime", type=float, metavar="SECONDS",
                   help="the allocation's length (HPC): take only jobs whose estimated_runtime "
                        "(or max_runtime) fits in the time left, and exit once none does")
    w.add_argument("--margin-time", type=float, default=0.0, metavar="SECONDS",
                   help="with --max-runtime: time kept free at the end of the allocation")
    w.add_argument("--slurm", action="store_true",
                   help="run as a Slurm job's task (as `eventq server --slurm-partition` "
                        "starts it): name, labels (slurm_job, slurm_partition, slurm_node), "
                        "data directory, GPUs and --max-runtime from Slurm; an array's "
                        "token (wa_…) gives this task's own")
    w.add_argument("--log-format", choices=["console", "json"], default="console")
    w.set_defaults(run=run_worker)


def parse_labels(text: str | None) -> dict[str, str]:
    """``gpu_type=a100,location=us-west`` as a dict."""
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise CliError(f"label {part!r} must be KEY=VALUE (e.g. gpu_type=a100)")
        labels[key.strip()] = value.strip()
    return labels


def budget_end(max_runtime: float | None, margin: float) -> float | None:
    """Until when this worker takes jobs, from the start of its allocation (now)."""
    if max_runtime is None:
        return None
    if max_runtime <= 0 or margin < 0 or margin >= max_runtime:
        raise CliError("--max-runtime must be positive and larger than --margin-time (>= 0)")
    return time.time() + max_runtime - margin


def _orchestrator(args: argparse.Namespace) -> tuple[str, str]:
    """Its URL and this worker's token, from the flags or the environment."""
    env = os.environ
    url = args.url or env.get("EVENTQ_URL")
    token = args.token or env.get("EVENTQ_WORKER_TOKEN")
    if not url or not url.startswith(("http://", "https://")):
        raise CliError("give the orchestrator's address: --url http://HOST:PORT "
                       "(or set EVENTQ_URL)")
    if not token:
        raise CliError("give this worker's token: --token wt_… (or set EVENTQ_WORKER_TOKEN); "
                       "an admin creates it with `eventq workers add NAME`")
    # Jobs inherit the agent's environment: they must not inherit its credentials.
    env.pop("EVENTQ_WORKER_TOKEN", None)
    return url, token


def _verified(url: str, ca: str | None) -> ssl.SSLContext | None:
    """The context for ``--ca``; a certificate it cannot verify ends the worker now, with
    one line, not in a retry loop."""
    from eventq import tls

    try:
        context = tls.ca_context(ca)
        tls.check_trusted(url, context)
    except tls.TlsError as exc:
        raise CliError(str(exc)) from None
    return context


def _as_slurm_task(args: argparse.Namespace, token: str
                   ) -> tuple[str, tuple[int, ...] | None, subprocess.Popen[str] | None]:
    """Fill in what the Slurm job says (flags given win); this task's token, the GPUs
    Slurm gave it on the node, and Slurm asked for its time left (without --max-runtime)."""
    from eventq.auth import ARRAY_PREFIX, task_token
    from eventq.slurm import SlurmTask, ask_time_left

    task = SlurmTask.from_environ(dict(os.environ))
    if task is None:
        raise CliError("--slurm: this is not a Slurm job (no SLURM_JOB_ID)")
    if token.startswith(ARRAY_PREFIX):
        if task.task is None:
            raise CliError("--slurm: an array's token needs an array task "
                           "(no SLURM_ARRAY_TASK_ID)")
        token = task_token(token, task.task)
    args.name = args.name or f"slurm-{task.label}"
    labels = {"slurm_job": task.label, "slurm_partition": task.partition,
              "slurm_node": task.node}
    args.labels = ",".join(f"{k}={v}" for k, v in labels.items() if v) + \
        (f",{args.labels}" if args.labels else "")
    args.data_dir = args.data_dir or Path(os.environ.get("TMPDIR") or "/tmp") \
        / f"eventq-slurm-{task.job_id}"
    asked = ask_time_left(task.job_id) if args.max_runtime is None else None
    return token, task.gpus, asked


def _without_rich() -> None:
    """Load structlog as if rich were not installed. structlog loads rich (~40 ms of CPU,
    at every worker's start) for the coloured tracebacks of its own console renderer; a
    worker's lines go through ``eventq.serverlog``'s renderers, which never use it. A None
    in ``sys.modules`` makes an import fail as for a missing module (the import system's
    documented way to block one); the entry goes once structlog is loaded."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        return
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]


def run_worker(args: argparse.Namespace) -> int:
    url, token = _orchestrator(args)
    _without_rich()
    allocated, asked = None, None
    if args.slurm:  # Slurm answers while the agent's modules load
        token, allocated, asked = _as_slurm_task(args, token)

    import asyncio

    from eventq import serverlog
    from eventq.agent.agent import Agent, AgentBusy, Refused

    if asked is not None:
        from eventq.slurm import read_time_left

        args.max_runtime = read_time_left(asked)
    config = _config(args, url, token, allocated)
    serverlog.keep_writing()  # lines lost, never the attempts it runs (serverlog.Outlet)
    serverlog.configure(args.log_format)
    try:
        return asyncio.run(Agent(config).run())
    except (Refused, AgentBusy) as exc:
        raise CliError(str(exc)) from None


def _config(args: argparse.Namespace, url: str, token: str,
            allocated: tuple[int, ...] | None) -> AgentConfig:
    """The agent's settings from the flags and the environment; CliError names a bad one."""
    import shlex
    import socket

    from eventq import gpus, runner
    from eventq.agent.agent import AgentConfig

    env = os.environ
    spec = args.gpus or env.get("EVENTQ_WORKER_GPUS") or None
    try:
        if spec:
            gpus.simulated(spec)
    except gpus.InventorySpecError as exc:
        raise CliError(str(exc)) from None
    if args.grace < 0:
        raise CliError("--grace must not be negative")
    trainer = tuple(shlex.split(args.trainer)) if args.trainer else runner.DEFAULT_TRAINER
    if not trainer:
        raise CliError("--trainer must name a command")
    return AgentConfig(
        url=url, token=token, data_dir=(args.data_dir or default_data_dir() / "worker").absolute(),
        name=args.name or env.get("EVENTQ_WORKER_NAME") or socket.gethostname(),
        gpu_spec=spec, labels=parse_labels(args.labels or env.get("EVENTQ_WORKER_LABELS")),
        persistent=args.persistent, trainer=trainer, grace_seconds=args.grace,
        accepts_until=budget_end(args.max_runtime, args.margin_time),
        ssl=_verified(url, args.ca or env.get("EVENTQ_CA")), allocated_gpus=allocated)
