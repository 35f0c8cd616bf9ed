"""``eventq jobs …``: submit, status, cancel (and the commands of actions, logs, views)."""

from __future__ import annotations

import os

from eventq.cli import cjson
from eventq.cli.client import Client, CliError, exportable_environ, path_arg, quote

# What prints an answer (eventq.cli.output) loads once the answer is here: a submission's
# request leaves before it, and its job may start while it loads.

# typing is not imported at run time (2.5 ms of every command): annotations are strings.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from pathlib import Path
    from typing import Any

#: Exit status of a submission the server refused (``--no-wait`` and it cannot start now).
REJECTED = 3


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser, action: str | None = None) -> None:
    """The parsers of ``eventq jobs …``; of ``submit`` alone when ``action`` is submit (the
    others' modules and parsers are most of what a submission would start up)."""
    jobs = sub.add_parser("jobs", help="submit and manage jobs").add_subparsers(
        dest="action", required=True)
    _add_submit(jobs, common)
    if action == "submit":
        return
    from eventq.cli import actions, logs, views

    views.add_parsers(jobs, common)
    st = jobs.add_parser("status", parents=[common],
                         help="the queue at a glance: depth, running, limits, local GPUs")
    st.set_defaults(run=queue_status)
    _add_cancel(jobs, common)
    actions.add_parsers(jobs, common)
    logs.add_parser(jobs, common)


def _add_submit(jobs: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    s = jobs.add_parser("submit", parents=[common],
                        help="submit a job: eventq jobs submit [options] -- CMD ARGS…")
    s.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="GPUs it needs, all on one node (default: 1; 0 for a job that needs "
                        "none)")
    s.add_argument("--name")
    s.add_argument("--config-name", help="a config from the server's configs directory")
    s.add_argument("--config", type=path_arg, metavar="FILE",
                   help="a JSON file with the job's config (sent with the job)")
    s.add_argument("--target", choices=["auto", "worker", "local"], default="auto")
    s.add_argument("--no-wait", action="store_true", help="reject it if it cannot start now")
    s.add_argument("--any-gpu", action="store_true")
    s.add_argument("--device-ids", help="preferred GPU indices, e.g. 0,1")
    s.add_argument("--dry-run", action="store_true",
                   help="say where it would run or why it would wait; record nothing")
    s.add_argument("--max-runtime", type=float, help="seconds")
    s.add_argument("--estimated-runtime", type=float, help="seconds")
    s.add_argument("--max-attempts", type=int)
    s.add_argument("--retry-on-failure", action="store_true")
    s.add_argument("--priority", type=int, help="priority override (leads and admins)")
    s.add_argument("--requires-approval", action="store_true",
                   help="hold it until an admin approves it")
    s.add_argument("--estimated-cost", type=float,
                   help="jobs above the server's approval threshold wait for an admin")
    s.add_argument("--team", help="the team it counts against (default: yours)")
    s.add_argument("--worker-labels", metavar="K=GLOB,…",
                   help="labels a worker must match (fnmatch globs), e.g. gpu_type=a100*")
    _add_submit_pipeline(s)


def _add_submit_pipeline(s: argparse.ArgumentParser) -> None:
    """When it may start, what it carries, and what it runs."""
    s.add_argument("--depends-on", action="append", default=[], metavar="JOB",
                   help="run after these jobs complete (ids or unique names; repeat or a,b)")
    s.add_argument("--begin-at", metavar="TIME",
                   help="not before this time (ISO-8601, or epoch seconds)")
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--notify", metavar="URL",
                   help="POST the job's end (status, exit code, times) to this http(s) URL "
                        "as JSON, retried for about 10 minutes")
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a variable the job gets wherever it runs (repeat)")
    s.add_argument("--export-env", action="append", default=[], metavar="NAME,…",
                   help="variables of this shell the job gets wherever it runs, remote "
                        "workers included (repeat or a,b)")
    s.add_argument("--no-export-env", action="store_true",
                   help="send neither this directory nor this shell's whole environment "
                        "(which a job that runs on the server's machine otherwise gets)")
    import argparse  # loaded already: the parser being built is argparse's

    s.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    s.set_defaults(run=submit)


def _add_cancel(jobs: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    cancel = jobs.add_parser("cancel", parents=[common],
                             help="cancel a job, or --all of yours (admins: everyone's)")
    cancel.add_argument("job_id", nargs="?")
    cancel.add_argument("--all", action="store_true", help="every job in --status")
    cancel.add_argument("--status", action="append", metavar="STATUS",
                        help="with --all: pending (every job waiting to start), waiting, "
                             "blocked, held, running… (repeat or comma-separate; default: "
                             "every unfinished state)")
    cancel.add_argument("--user", help="with --all: only this user's jobs (admins)")
    cancel.add_argument("-v", "--verbose", action="store_true",
                        help="with --all: name each job cancelled, not only how many")
    cancel.set_defaults(run=cancel_job)


def client(args: argparse.Namespace) -> Client:
    return Client.find(args.url, args.token, args.data_dir, args.ca)


def submit_body(args: argparse.Namespace) -> dict[str, Any]:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.config_name and args.config is None:
        raise CliError("no command given: eventq jobs submit [options] -- CMD ARGS… "
                       "(or --config-name NAME, or --config FILE)")
    body: dict[str, Any] = {"gpus": args.gpus, "target": args.target,
                            "no_wait": args.no_wait, "any_gpu": args.any_gpu}
    if command:
        body["command"] = command
    optional = {"name": args.name, "max_runtime": args.max_runtime,
                "estimated_runtime": args.estimated_runtime, "max_attempts": args.max_attempts,
                "priority_override": args.priority, "config_name": args.config_name,
                "estimated_cost": args.estimated_cost, "team": args.team,
                "notify_url": args.notify}
    body.update({k: v for k, v in optional.items() if v is not None})
    for flag in ("retry_on_failure", "dry_run", "requires_approval"):
        if getattr(args, flag):
            body[flag] = True
    if args.config is not None:
        body["config"] = _config_file(args.config)
    if args.device_ids:
        try:
            body["device_ids"] = [int(x) for x in args.device_ids.split(",")]
        except ValueError:
            raise CliError(f"--device-ids must be integers, e.g. 0,1 (got {args.device_ids})") \
                from None
    if args.metadata:
        body["metadata"] = dict(_pair(m) for m in args.metadata)
    if args.worker_labels:
        body["worker_labels"] = dict(_pair(p) for p in args.worker_labels.split(",") if p)
    if args.depends_on:
        body["depends_on"] = [d for item in args.depends_on for d in item.split(",") if d]
    if args.begin_at:
        body["begin_at"] = _time_arg(args.begin_at)
    body.update(_environment(args))
    return body


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    """What the job declares (``--env``, ``--export-env``), and what this shell exports to
    a run on the server's machine. The server keeps both out of its log; remote workers
    get only the declared variables."""
    out: dict[str, Any] = {}
    declared = dict(_pair(p) for p in args.env)
    for name in (n for item in args.export_env for n in item.split(",") if n):
        if name not in os.environ:
            raise CliError(f"--export-env: {name} is not set in this shell")
        declared[name] = os.environ[name]
    if declared:
        out["env"] = declared
    if not args.no_export_env and args.target != "worker":
        out["exported_cwd"], out["exported_env"] = os.getcwd(), exportable_environ()
    return out


def _config_file(path: Path) -> dict[str, Any]:
    try:
        loaded = cjson.loads(path.read_text())
    except OSError as exc:
        raise CliError(f"cannot read --config {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise CliError(f"--config {path} is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise CliError(f"--config {path} must hold a JSON object, not {type(loaded).__name__}")
    return loaded


def _time_arg(text: str) -> float | str:
    """Epoch seconds stay a number; anything else goes as ISO-8601 for the server to read."""
    try:
        return float(text)
    except ValueError:
        return text


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CliError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def submit(args: argparse.Namespace) -> int:
    reply = client(args).call("POST", "/api/queue/submit", submit_body(args))
    from eventq.cli.output import cell, emit_json, print_reasons, say

    code = REJECTED if reply["status"] == "rejected" else 0
    if args.format == "json":
        emit_json(reply)
    elif reply.get("dry_run"):
        _print_dry_run(reply)
    else:
        gpus = cell(reply["allocated_gpus"])
        say(f"{reply['job_id']} {reply['status']}  GPUs: {gpus}"
            + (f"  position: {reply['queue_position']}" if reply["queue_position"] else ""))
        print_reasons(reply.get("reasons"))
    return code


def _print_dry_run(reply: dict[str, Any]) -> None:
    from eventq.cli.output import cell, print_estimate, print_reasons, say

    status = reply["status"]
    if status == "running":
        say(f"dry run: would start now on {reply['node']} GPUs "
            f"{cell(reply['allocated_gpus'])}")
    elif status == "rejected":
        say("dry run: would be rejected (--no-wait, and it cannot start now)")
    elif status == "blocked":
        say("dry run: would wait for an admin's approval")
    else:
        say("dry run: would wait in the queue")
    print_reasons(reply.get("reasons"))
    if status in ("queued", "rejected"):
        print_estimate(reply)
    say("nothing was recorded")


def queue_status(args: argparse.Namespace) -> int:
    stats = client(args).call("GET", "/api/queue/stats")
    from eventq.cli import output
    from eventq.cli.output import cell, duration, emit_json

    if args.format == "json":
        emit_json(stats)
        return 0
    from eventq.cli import limits

    local = stats["local"]
    output.console.print(f"[bold]queue[/bold]: {stats['queue_depth']} waiting, {stats['running']} "
                         f"running (average wait {duration(stats['avg_wait_seconds'])})")
    output.console.print(
        f"[bold]local[/bold]: {local['running_jobs']} running, {local['pending_jobs']} waiting; "
        f"GPUs in use {cell(local['allocated_gpus'])}, free {cell(local['available_gpus'])} "
        f"of {local['total_gpus']}" + (" (simulated)" if local.get("simulated") else ""))
    output.console.print(f"[bold]limits[/bold]: {limits.line(stats)}")
    if stats["by_status"]:
        output.console.print("[bold]by status[/bold]: " + ", ".join(
            f"{k} {v}" for k, v in sorted(stats["by_status"].items())))
    if stats["by_user"]:
        output.console.print("[bold]unfinished by user[/bold]: " + ", ".join(
            f"{k} {v}" for k, v in sorted(stats["by_user"].items())))
    return 0


def cancel_job(args: argparse.Namespace) -> int:
    if args.all == (args.job_id is not None):
        raise CliError("give a job id, or --all (with --status to choose which)")
    if not args.all and (args.status or args.user or args.verbose):
        raise CliError("--status, --user and -v go with --all")
    if args.all:
        return _cancel_many(args)
    reply = client(args).call("POST", f"/api/queue/{quote(args.job_id)}/cancel")
    from eventq.cli import output

    if args.format == "json":
        output.emit_json(reply)
    else:
        output.console.print(f"{reply['job_id']} {reply['status']} ({_stopped(reply)})",
                             markup=False, highlight=False)
    return 0


def _stopped(reply: dict[str, Any]) -> str:
    """What the cancel did beyond the job's status."""
    if not reply.get("was_running", True):
        return "it had not started"
    if reply["process_stopped"]:
        return "its process stopped, its GPUs are free"
    return "its process is still stopping; its GPUs are free once it has"


def _cancel_many(args: argparse.Namespace) -> int:
    """A count (thousands of ids help nobody); the ids with -v or --format json."""
    body: dict[str, Any] = {}
    if args.status:
        body["status"] = [s for given in args.status for s in given.split(",") if s]
    if args.user:
        body["user"] = args.user
    reply = client(args).call("POST", "/api/queue/cancel", body)
    from eventq.cli import output

    if args.format == "json":
        output.emit_json(reply)
        return 0
    count = reply["cancelled"]
    output.console.print(f"cancelled {count:,} job{'s' if count != 1 else ''}"
                         if count else "nothing to cancel: no unfinished job matches",
                         markup=False, highlight=False)
    if args.verbose:
        for job_id in reply["job_ids"]:
            print(job_id)
    return 0
