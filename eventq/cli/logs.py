"""``eventq jobs logs ID [-f] [--attempt N] [--stdout|--stderr]``: a job's output.

Both streams by default, so that a failed job's error shows where its output does. A job's
process writes stdout and stderr to two files of its own (eventq/runner.py), and nothing
records the order between them: read at once, the output is stdout and then stderr, each
under a ``==> stdout <==`` line when both have some; followed (``-f``), the chunks come in
the order the server finds them, which it looks for ten times a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from eventq.cli.client import Client, CliError, quote

#: A job in one of these has no attempt running: a follow waits for the next one.
NOT_STARTED = ("pending", "waiting", "blocked", "held")


def add_parser(jobs: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    lg = jobs.add_parser(
        "logs", parents=[common], help="a job's output: stdout and stderr",
        description="A job's output, stdout and stderr. Without -f: stdout, then stderr, "
                    "each under a '==> stdout <==' line when both have output (the job "
                    "writes them to two files, so the order between them is not kept). "
                    "With -f: as it comes, in the order the server finds it (it looks ten "
                    "times a second); a job that has not started is followed once it does.")
    lg.add_argument("job_id")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="keep printing as it is written, until the attempt ends")
    lg.add_argument("--attempt", type=int, help="default: the latest")
    which = lg.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_const", const="stdout", dest="stream",
                       help="only the standard output")
    which.add_argument("--stderr", action="store_const", const="stderr", dest="stream",
                       help="only the error stream")
    which.add_argument("--all", action="store_const", const="all", dest="stream",
                       help="both (the default)")
    lg.set_defaults(run=show_logs, stream="all")


def logs_path(job_id: str, stream: str, attempt: int | None, follow: bool = False) -> str:
    query = f"?stream={stream}"
    if attempt is not None:
        query += f"&attempt={attempt}"
    if follow:
        query += "&follow=true"
    return f"/api/jobs/{quote(job_id)}/logs{query}"


def show_logs(args: argparse.Namespace) -> int:
    """Exit 0 once the log is printed; a followed log ends with the job's end on stderr."""
    if args.attempt is not None and args.attempt < 1:
        raise CliError(f"--attempt counts from 1 (got {args.attempt})")
    api = Client.find(args.url, args.token, args.data_dir, args.ca)
    job = api.call("GET", f"/api/jobs/{quote(args.job_id)}")
    if args.follow:
        return follow(api, args, job)
    return read_once(api, args, job)


def waits_text(job: dict[str, Any]) -> str:
    """``job X has not started (waiting): begin_time: …`` — or waits for its next attempt."""
    what = "has not started" if job["attempt"] == 0 else \
        f"waits to start attempt {job['attempt'] + 1}"
    reasons = "; ".join(f"{r['code']}: {r['detail']}" for r in job.get("reasons") or [])
    return f"job {job['job_id']} {what} ({job['status']})" + (f": {reasons}" if reasons else "")


def read_once(api: Client, args: argparse.Namespace, job: dict[str, Any]) -> int:
    attempt = args.attempt or job["attempt"]
    if attempt == 0:
        if args.format == "json":
            print(json.dumps({"job_id": job["job_id"], "attempt": None,
                              "status": job["status"], "stream": args.stream, "text": ""}))
        print(f"eventq: {waits_text(job)}; no output yet (-f follows it once it starts)",
              file=sys.stderr)
        return 0
    streams = ("stdout", "stderr") if args.stream == "all" else (args.stream,)
    texts = {s: api.text(logs_path(job["job_id"], s, attempt)) for s in streams}
    if args.format == "json":
        print(json.dumps({"job_id": job["job_id"], "attempt": attempt, "status": job["status"],
                          "stream": args.stream,
                          **{s: t.decode("utf-8", "replace") for s, t in texts.items()},
                          "text": b"".join(texts.values()).decode("utf-8", "replace")}))
        return 0
    if not _print_streams(texts):
        running = job["attempt"] == attempt and job["status"] in ("dispatched", "running")
        print(f"eventq: job {job['job_id']} attempt {attempt} ({job['status']}) "
              + ("has written no output yet" if running else "wrote no output"),
              file=sys.stderr)
    return 0


def _print_streams(texts: dict[str, bytes]) -> bool:
    """Each stream that has output, under its name when more than one has; whether any."""
    written = [(s, t) for s, t in texts.items() if t]
    for stream, text in written:
        if len(written) > 1:
            sys.stdout.buffer.write(f"==> {stream} <==\n".encode())
            text += b"" if text.endswith(b"\n") else b"\n"
        sys.stdout.buffer.write(text)
    sys.stdout.flush()
    return bool(written)


def follow(api: Client, args: argparse.Namespace, job: dict[str, Any]) -> int:
    if args.attempt is None and job["status"] in NOT_STARTED:
        if args.format == "json":
            print(json.dumps({"event": "waiting", "job_id": job["job_id"],
                              "status": job["status"], "reasons": job.get("reasons") or []}),
                  flush=True)
        else:
            print(f"eventq: {waits_text(job)}; following it once it starts", file=sys.stderr,
                  flush=True)
    printed = False
    for message in api.stream(logs_path(job["job_id"], args.stream, args.attempt, True)):
        body = json.loads(message.data)
        if args.format == "json":
            print(json.dumps({"event": message.event, **body}), flush=True)
        elif message.event == "log" and body["text"]:
            sys.stdout.write(body["text"])
            sys.stdout.flush()
            printed = True
        if message.event == "revoked":
            raise CliError(f"the server closed the log of {args.job_id}: {body.get('reason')}")
        if message.event == "end":
            if args.format != "json":
                print(end_line(body) + ("" if printed else "; it wrote no output"),
                      file=sys.stderr, flush=True)
            return 0
    raise CliError(f"the server closed the log of {args.job_id} before the attempt ended")


def end_line(end: dict[str, object]) -> str:
    exit_code = end.get("exit_code")
    text = f"eventq: job {end.get('job_id')} attempt {end.get('attempt')} {end.get('status')}"
    return text + ("" if exit_code is None else f" (exit code {exit_code})")
