"""``eventq jobs logs ID [-f] [--attempt N] [--stderr]``: a job's output, read or followed."""

from __future__ import annotations

import argparse
import json
import sys

from eventq.cli.client import Client, CliError, quote


def add_parser(jobs: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    lg = jobs.add_parser("logs", parents=[common], help="a job's output (stdout by default)")
    lg.add_argument("job_id")
    lg.add_argument("-f", "--follow", action="store_true",
                    help="keep printing as it is written, until the attempt ends")
    lg.add_argument("--attempt", type=int, help="default: the latest")
    which = lg.add_mutually_exclusive_group()
    which.add_argument("--stderr", action="store_const", const="stderr", dest="stream",
                       help="the error stream instead of stdout")
    which.add_argument("--all", action="store_const", const="all", dest="stream",
                       help="stdout, then stderr (followed: as each arrives)")
    lg.set_defaults(run=show_logs, stream="stdout")


def logs_path(args: argparse.Namespace) -> str:
    if args.attempt is not None and args.attempt < 1:
        raise CliError(f"--attempt counts from 1 (got {args.attempt})")
    query = f"?stream={args.stream}"
    if args.attempt is not None:
        query += f"&attempt={args.attempt}"
    if args.follow:
        query += "&follow=true"
    return f"/api/jobs/{quote(args.job_id)}/logs{query}"


def show_logs(args: argparse.Namespace) -> int:
    """Exit 0 once the log is printed; a followed log ends with the job's end on stderr."""
    api = Client.find(args.url, args.token, args.data_dir, args.ca)
    if not args.follow:
        data = api.text(logs_path(args))
        if args.format == "json":
            print(json.dumps({"job_id": args.job_id, "stream": args.stream,
                              "text": data.decode("utf-8", "replace")}))
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        return 0
    ended = False
    for message in api.stream(logs_path(args)):
        body = json.loads(message.data)
        if args.format == "json":
            print(json.dumps({"event": message.event, **body}), flush=True)
        elif message.event == "log":
            out = sys.stderr if body.get("stream") == "stderr" and args.stream == "all" \
                else sys.stdout
            out.write(body["text"])
            out.flush()
        if message.event == "revoked":
            raise CliError(f"the server closed the log of {args.job_id}: {body.get('reason')}")
        if message.event == "end":
            ended = True
            if args.format != "json":
                print(end_line(body), file=sys.stderr, flush=True)
            break
    if not ended:
        raise CliError(f"the server closed the log of {args.job_id} before the attempt ended")
    return 0


def end_line(end: dict[str, object]) -> str:
    exit_code = end.get("exit_code")
    text = f"eventq: job {end.get('job_id')} attempt {end.get('attempt')} {end.get('status')}"
    return text + ("" if exit_code is None else f" (exit code {exit_code})")
