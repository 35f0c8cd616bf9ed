"""``eventq jobs …``: submit, list, show, cancel."""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Any

from eventq.cli.client import Client, CliError
from eventq.cli.output import cell, console, emit_json, pick, table

LIST_FIELDS = ["job_id", "name", "user", "status", "gpus", "allocated_gpus", "position", "reasons"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser("jobs", help="submit and manage jobs").add_subparsers(
        dest="action", required=True)
    s = jobs.add_parser("submit", parents=[common], help="submit a job: eventq jobs submit -- CMD")
    s.add_argument("--gpus", type=int, default=1)
    s.add_argument("--name")
    s.add_argument("--target", choices=["auto", "worker", "local"], default="auto")
    s.add_argument("--no-wait", action="store_true", help="reject it if it cannot start now")
    s.add_argument("--any-gpu", action="store_true")
    s.add_argument("--device-ids", help="preferred GPU indices, e.g. 0,1")
    s.add_argument("--max-runtime", type=float, help="seconds")
    s.add_argument("--estimated-runtime", type=float, help="seconds")
    s.add_argument("--max-attempts", type=int)
    s.add_argument("--retry-on-failure", action="store_true")
    s.add_argument("--priority", type=int, help="priority override (leads and admins)")
    s.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--no-export-env", action="store_true",
                   help="send neither the working directory nor the environment")
    s.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    s.set_defaults(run=submit)
    ls = jobs.add_parser("list", parents=[common], help="list jobs")
    ls.add_argument("--status")
    ls.add_argument("-l", "--limit", type=int, default=50)
    ls.add_argument("-a", "--all", action="store_true", help="include finished jobs")
    ls.add_argument("-o", "--fields", help="comma-separated fields, dot paths allowed")
    ls.set_defaults(run=list_jobs)
    show = jobs.add_parser("show", parents=[common], help="a job and its event history")
    show.add_argument("job_id")
    show.set_defaults(run=show_job)
    cancel = jobs.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=cancel_job)


def _client(args: argparse.Namespace) -> Client:
    return Client.find(args.url, args.token, args.data_dir)


def submit_body(args: argparse.Namespace) -> dict[str, Any]:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("no command given: eventq jobs submit [options] -- CMD ARGS…")
    body: dict[str, Any] = {"command": command, "gpus": args.gpus, "target": args.target,
                            "no_wait": args.no_wait, "any_gpu": args.any_gpu}
    optional = {"name": args.name, "max_runtime": args.max_runtime,
                "estimated_runtime": args.estimated_runtime, "max_attempts": args.max_attempts,
                "priority_override": args.priority}
    body.update({k: v for k, v in optional.items() if v is not None})
    if args.retry_on_failure:
        body["retry_on_failure"] = True
    if args.device_ids:
        try:
            body["device_ids"] = [int(x) for x in args.device_ids.split(",")]
        except ValueError:
            raise CliError(f"--device-ids must be integers, e.g. 0,1 (got {args.device_ids})") \
                from None
    if args.metadata:
        body["metadata"] = dict(_pair(m) for m in args.metadata)
    if not args.no_export_env:
        body["cwd"], body["env"] = os.getcwd(), dict(os.environ)
    return body


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CliError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def submit(args: argparse.Namespace) -> int:
    reply = _client(args).call("POST", "/api/queue/submit", submit_body(args))
    if args.format == "json":
        emit_json(reply)
        return 0 if reply["status"] != "rejected" else 3
    gpus = cell(reply["allocated_gpus"])
    console.print(f"{reply['job_id']} {reply['status']}  GPUs: {gpus}"
                  + (f"  position: {reply['queue_position']}" if reply["queue_position"] else ""))
    for reason in reply.get("reasons", []):
        console.print(f"  waits on {reason['code']}: {reason['detail']}")
    return 0 if reply["status"] != "rejected" else 3


def _reasons_text(job: dict[str, Any]) -> str:
    return "; ".join(f"{r['code']}: {r['detail']}" for r in job.get("reasons") or [])


def list_jobs(args: argparse.Namespace) -> int:
    query = f"?limit={args.limit}" + ("&include_completed=true" if args.all else "")
    if args.status:
        query += f"&status={args.status}"
    jobs = _client(args).call("GET", "/api/queue" + query)["jobs"]
    fields = args.fields.split(",") if args.fields else LIST_FIELDS
    if args.format == "json":
        emit_json([{f: pick(j, f) for f in fields} for j in jobs] if args.fields else jobs)
        return 0
    for job in jobs:
        job["reasons"] = _reasons_text(job) or None
    table(jobs, fields)
    return 0


def show_job(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.call("GET", f"/api/jobs/{args.job_id}")
    history = client.call("GET", f"/api/jobs/{args.job_id}/events")["events"]
    if args.format == "json":
        emit_json({"job": job, "events": history})
        return 0
    for key in ("job_id", "name", "user", "status", "gpus", "allocated_gpus", "node", "attempt",
                "position", "exit_code", "error", "command"):
        if job.get(key) is not None:
            console.print(f"[bold]{key}[/bold]: {cell(job[key])}")
    if job.get("reasons"):
        console.print(f"[bold]waits on[/bold]: {_reasons_text(job)}")
    rows = [{"seq": e["seq"], "time": _when(e["time"]), "by": e["principal"], "event": e["type"],
             "detail": _short(e["body"])} for e in history]
    table(rows, ["seq", "time", "by", "event", "detail"], title="history")
    return 0


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _short(body: dict[str, Any]) -> str:
    body = {k: v for k, v in body.items() if k not in ("job_id", "job")}
    return ", ".join(f"{k}={cell(v)}" for k, v in body.items())


def cancel_job(args: argparse.Namespace) -> int:
    reply = _client(args).call("POST", f"/api/queue/{args.job_id}/cancel")
    if args.format == "json":
        emit_json(reply)
    else:
        stopped = "process stopped, GPUs freed" if reply["process_stopped"] else \
            "process still stopping"
        console.print(f"{reply['job_id']} {reply['status']} ({stopped})")
    return 0
