"""``eventq workers add|list|drain|token|rm``: remote GPU workers and their tokens (admins)."""

from __future__ import annotations

import argparse
from typing import Any

from eventq.cli import output
from eventq.cli.client import Client, CliError, quote
from eventq.cli.output import emit_json, table
from eventq.cli.worker import parse_labels

LIST_FIELDS = ["worker_id", "name", "worker_type", "status", "transport", "gpus", "labels",
               "current_jobs"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    workers = sub.add_parser("workers", help="remote GPU workers and their tokens (admins)") \
        .add_subparsers(dest="action", required=True)
    a = workers.add_parser("add", parents=[common],
                           help="create a worker; prints its token once and how to connect it")
    a.add_argument("name")
    kind = a.add_mutually_exclusive_group()
    kind.add_argument("--persistent", dest="worker_type", action="store_const",
                      const="persistent", help="runs job after job (the default)")
    kind.add_argument("--ephemeral", dest="worker_type", action="store_const",
                      const="ephemeral", help="runs one job, then is told to stop")
    a.add_argument("--labels", help="k=v,… that jobs' worker_labels match")
    a.set_defaults(run=add, worker_type="persistent")
    ls = workers.add_parser("list", parents=[common], help="every worker and what it does")
    ls.set_defaults(run=list_workers)
    d = workers.add_parser("drain", parents=[common],
                           help="let a worker finish its jobs and take no new one")
    d.add_argument("worker", help="worker id or name")
    d.set_defaults(run=drain)
    t = workers.add_parser("token", parents=[common],
                           help="rotate a worker's token: the old one stops working at once")
    t.add_argument("worker", help="worker id or name")
    t.add_argument("--keep-running", action="store_true",
                   help="hand the new token to the worker's connected agent, whose jobs go on "
                        "(without it the agent is disconnected, stops its jobs and exits; they "
                        "are requeued once its lease has lapsed)")
    t.set_defaults(run=rotate)
    r = workers.add_parser("rm", parents=[common], help="remove an offline worker")
    r.add_argument("worker", help="worker id or name")
    r.add_argument("--force", action="store_true",
                   help="remove it even if online; its running jobs fail and are requeued")
    r.set_defaults(run=remove)


def _client(args: argparse.Namespace) -> Client:
    return Client.find(args.url, args.token, args.data_dir, args.ca)


def _resolve(client: Client, ident: str) -> str:
    """A worker id from an id or a name."""
    workers = client.call("GET", "/api/admin/workers")["workers"]
    for w in workers:
        if ident in (w["worker_id"], w["name"]):
            return str(w["worker_id"])
    raise CliError(f"no worker {ident} (see `eventq workers list`)")


def add(args: argparse.Namespace) -> int:
    body = {"name": args.name, "worker_type": args.worker_type,
            "labels": parse_labels(args.labels)}
    reply = _client(args).call("POST", "/api/admin/workers", body)
    if args.format == "json":
        emit_json(reply)
        return 0
    output.console.print(f"added worker {reply['name']} ({args.worker_type})", markup=False)
    print(f"worker_id: {reply['worker_id']}")
    output.console.print("token (shown only this once; give it to the worker as "
                         "EVENTQ_WORKER_TOKEN):", markup=False)
    print(reply["token"])
    _print_connection(reply, "run" if reply.get("note") else "on the GPU machine, run")
    return 0


def _print_connection(reply: dict[str, Any], lead: str) -> None:
    """The commands that start the worker: eventq's agent, or SimpleTuner's stock one. A
    server no other machine can reach says so first (``note``), before any command."""
    say = output.console.print
    if reply.get("note"):
        say(f"warning: {reply['note']}", markup=False)
        lead += " on this machine only"
    say(f"{lead}:", markup=False)
    print(f"  {reply['connection_command']}")
    say("or, with SimpleTuner's worker:", markup=False)
    print(f"  {reply['stock_worker_command']}")
    if reply["url"].startswith("https:"):
        say("if the server's certificate is not from a CA that machine trusts, copy the CA "
            "there and add --ca FILE (SimpleTuner's worker: SSL_CERT_FILE=FILE)", markup=False)


def _row(worker: dict[str, Any]) -> dict[str, Any]:
    gpus = worker.get("gpus") or []
    names = sorted({g["name"] for g in gpus})
    text = f"{len(gpus)}x{'/'.join(names)}" if gpus else "-"
    return {**worker, "gpus": text + (" (simulated)" if gpus and worker.get("simulated")
                                      else ""),
            "labels": ",".join(f"{k}={v}" for k, v in sorted(worker["labels"].items()))
            or None}


def list_workers(args: argparse.Namespace) -> int:
    workers = _client(args).call("GET", "/api/admin/workers")["workers"]
    if args.format == "json":
        emit_json(workers)
        return 0
    if not workers:
        output.console.print("no workers (add one with `eventq workers add NAME`)", markup=False)
        return 0
    table([_row(w) for w in workers], LIST_FIELDS)
    return 0


def drain(args: argparse.Namespace) -> int:
    client = _client(args)
    worker_id = _resolve(client, args.worker)
    reply = client.call("POST", f"/api/admin/workers/{quote(worker_id)}/drain")
    if args.format == "json":
        emit_json(reply)
        return 0
    jobs = reply.get("current_jobs") or []
    running = f"finishing {len(jobs)} job(s): {', '.join(jobs)}" if jobs else "running nothing"
    output.console.print(f"draining {reply['name']} ({worker_id}): takes no new job; {running}",
                         markup=False)
    return 0


def rotate(args: argparse.Namespace) -> int:
    client = _client(args)
    worker_id = _resolve(client, args.worker)
    keep = "?keep_running=true" if args.keep_running else ""
    reply = client.call("POST", f"/api/admin/workers/{quote(worker_id)}/token{keep}")
    if args.format == "json":
        emit_json(reply)
        return 0
    if reply.get("handed_to_live_agent"):
        said = "its connected agent has it and goes on; give it to the worker's configuration"
    elif args.keep_running:
        said = "no agent of it was connected over a websocket to hand it to"
    else:
        said = "an agent connected with the old one is disconnected and stops its jobs"
    output.console.print(f"a new token for {worker_id}; the old one no longer works ({said}). "
                         "New token (shown only this once):", markup=False)
    print(reply["token"])
    _print_connection(reply, "start the worker with it")
    return 0


def remove(args: argparse.Namespace) -> int:
    client = _client(args)
    worker_id = _resolve(client, args.worker)
    force = "?force=true" if args.force else ""
    reply = client.call("DELETE", f"/api/admin/workers/{quote(worker_id)}{force}")
    if args.format == "json":
        emit_json(reply)
        return 0
    output.console.print(f"removed worker {worker_id}", markup=False)
    return 0
