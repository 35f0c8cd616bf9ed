"""``eventq``: every command, parsed by argparse (``eventq.cli.entry``, the console script's
entry point, reads a plain submission itself and hands everything else here).

Every way a command can fail ends here as one message and a non-zero exit: a mistyped
command (with the nearest ones), bad arguments, a refusal from the server, a server that
cannot be reached. With ``--format json`` that message is JSON on stdout, as an answer is.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys

from eventq import __version__
from eventq.cli.client import CliError, path_arg
from eventq.cli.entry import USAGE as USAGE
from eventq.cli.entry import UsageError, failed, wants_json

# typing is not imported at run time (2.5 ms of every command): annotations are strings.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

# A command's module is imported when that command runs (all of them for `eventq --help`
# or a word the parser does not know): `eventq jobs submit` does not load the server's
# modules that `eventq import` needs. What a command needs beyond the standard library
# (rich, msgspec, the server's modules) loads in its handler.

#: The modules of eventq.cli that define the commands, in the order `--help` lists them.
COMMAND_MODULES = ("serve", "jobs", "bulk", "users", "workers", "worker", "replay", "limits",
                   "ui")
#: Which module's parsers define each command.
DEFINED_BY = {"server": "serve", "jobs": "jobs", "import": "bulk", "export": "bulk",
              "progress": "bulk", "users": "users", "workers": "workers", "worker": "worker",
              "replay": "replay", "queue": "limits", "ui": "ui"}


class Parser(argparse.ArgumentParser):
    """argparse, whose errors are raised to ``main`` (which prints them as text or JSON)
    instead of printed and exited on the spot. Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", self.format_usage())

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for each option it adds (to check its metavar), and a
        # formatter asks shutil, 2 ms of CPU to import, for the terminal's width.
        return self.formatter_class(prog=self.prog, width=columns() - 2)  # type: ignore[call-arg]


@functools.cache  # asked for each option added (argparse checks its metavar): 0.15 ms a submit
def columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil; read once."""
    try:
        found = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        found = 0
    if found > 0:
        return found
    stdout = sys.__stdout__
    try:
        return (os.get_terminal_size(stdout.fileno()).columns if stdout else 0) or 80
    except (ValueError, OSError):  # not a terminal, or closed
        return 80


def parser(command: str | None = None, action: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; only ``command``'s if given (the others' fifty parsers
    cost every command 7 ms to build), and of that command only ``action``'s where its
    module can build one alone (``jobs submit``)."""
    common = Parser(add_help=False)
    common.add_argument("--data-dir", type=path_arg, help="default: $EVENTQ_HOME or ~/.eventq")
    common.add_argument("--url", help="server address (default: $EVENTQ_URL, or the local one)")
    common.add_argument("--token", help="API token (default: $EVENTQ_TOKEN, or the local admin's)")
    common.add_argument("--ca", metavar="FILE",
                        help="verify an https server with this CA (PEM; default: $EVENTQ_CA, "
                             "or the system's CAs)")
    common.add_argument("--format", choices=["table", "json"], default="table")
    top = Parser(prog="eventq", description="GPU job queue and orchestrator")
    top.add_argument("--version", action="version", version=f"eventq {__version__}")
    # Its subcommands' parsers are Parsers too (argparse makes them of its own class).
    sub: argparse._SubParsersAction[Any] = top.add_subparsers(dest="command", required=True)
    wanted = DEFINED_BY.get(command or "")
    for name in COMMAND_MODULES:
        if wanted in (None, name):
            module: Any = importlib.import_module(f"eventq.cli.{name}")
            if name == "bulk":
                module.add_parsers(sub, common)
            elif name == "jobs":
                module.add_parser(sub, common, action)
            else:
                module.add_parser(sub, common)
    return top


def check_command(top: argparse.ArgumentParser, words: list[str]) -> None:
    """A command word the parser does not know, named with the nearest known ones
    (``eventq jobs submti``: did you mean submit?), before argparse lists them all."""
    from eventq.cli.output import did_you_mean

    level, said = top, ["eventq"]
    for word in words:
        choices: dict[str, argparse.ArgumentParser] | None = next(
            (a.choices for a in level._actions if isinstance(a, argparse._SubParsersAction)),
            None)
        if choices is None or word.startswith("-"):
            return
        if word not in choices:
            hint = did_you_mean(word, choices) or f"the commands are {', '.join(choices)}"
            raise UsageError(f"{' '.join(said)}: no command {word!r}; {hint}",
                             level.format_usage())
        level = choices[word]
        said.append(word)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words == ["--version"]:  # what argparse prints, without every command's parser first
        print(f"eventq {__version__}")
        return 0
    as_json = wants_json(words)
    try:
        # The words as typed (`eventq jobs submit …`) name the parsers to build; any other
        # order gets them all, and argparse says what is wrong with it.
        top = parser(*(words[:2] if words[:1] == ["jobs"] else
                       (next((w for w in words if not w.startswith("-")), None),)))
        check_command(top, words)
        args: Any = top.parse_args(words)
        as_json = getattr(args, "format", None) == "json"
        code: int = args.run(args)
    except (CliError, KeyboardInterrupt, BrokenPipeError) as exc:
        return failed(exc, as_json)
    return code


if __name__ == "__main__":
    sys.exit(main())
