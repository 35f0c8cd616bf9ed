"""``eventq``: the entry point of every command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from eventq import __version__
from eventq.cli import bulk, jobs, replay, serve, ui, users, worker, workers
from eventq.cli.client import CliError

# Each command's module is imported here for its parser only: what a command needs beyond
# the standard library (rich, msgspec, urllib, the server's modules) loads in its handler.


#: Which module's parsers define each command.
DEFINED_BY = {"server": serve, "jobs": jobs, "import": bulk, "export": bulk, "progress": bulk,
              "users": users, "workers": workers, "worker": worker, "replay": replay, "ui": ui}


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; only ``command``'s if given (the others' fifty parsers
    cost every command 7 ms to build)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="default: $EVENTQ_HOME or ~/.eventq")
    common.add_argument("--url", help="server address (default: $EVENTQ_URL, or the local one)")
    common.add_argument("--token", help="API token (default: $EVENTQ_TOKEN, or the local admin's)")
    common.add_argument("--ca", metavar="FILE",
                        help="verify an https server with this CA (PEM; default: $EVENTQ_CA, "
                             "or the system's CAs)")
    common.add_argument("--format", choices=["table", "json"], default="table")
    top = argparse.ArgumentParser(prog="eventq", description="GPU job queue and orchestrator")
    top.add_argument("--version", action="version", version=f"eventq {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    wanted = DEFINED_BY.get(command or "")
    for module in (serve, jobs, bulk, users, workers, worker, replay, ui):
        if wanted in (None, module):
            add = bulk.add_parsers if module is bulk else module.add_parser
            add(sub, common)
    return top


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = parser(next((w for w in words if not w.startswith("-")), None)).parse_args(words)
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
