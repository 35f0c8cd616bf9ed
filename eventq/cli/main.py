"""``eventq``: the entry point of every command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eventq import __version__
from eventq.cli import bulk, jobs, replay, serve, users, worker, workers
from eventq.cli.client import CliError

# Each command's module is imported here for its parser only: what a command needs beyond
# the standard library (rich, msgspec, urllib, the server's modules) loads in its handler.


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="default: $EVENTQ_HOME or ~/.eventq")
    common.add_argument("--url", help="server address (default: $EVENTQ_URL, or the local one)")
    common.add_argument("--token", help="API token (default: $EVENTQ_TOKEN, or the local admin's)")
    common.add_argument("--format", choices=["table", "json"], default="table")
    top = argparse.ArgumentParser(prog="eventq", description="GPU job queue and orchestrator")
    top.add_argument("--version", action="version", version=f"eventq {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    serve.add_parser(sub, common)
    jobs.add_parser(sub, common)
    bulk.add_parsers(sub, common)
    users.add_parser(sub, common)
    workers.add_parser(sub, common)
    worker.add_parser(sub, common)
    replay.add_parser(sub, common)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except CliError as exc:
        print(f"eventq: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`eventq jobs list | head`): that is not an error to show.
        # Python would complain again while flushing stdout at exit, so point it elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
