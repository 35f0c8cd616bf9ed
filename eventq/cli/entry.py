"""The ``eventq`` command's entry point: a plain ``eventq jobs submit … -- CMD`` is read here,
without argparse; every other command line goes to ``eventq.cli.main``, whose parsers are
the reference (their checks, messages and ``--help``).

Why by hand: the submission is most of what a user types, and its process's CPU is on the
path to the job's start. argparse (with the gettext and locale it loads, and the submit
parser it builds) was 8 ms of the 35 ms of CPU of one `eventq jobs submit` (26.8 ms without
it, same minutes; the interpreter alone 13.2 ms), where the rest was the interpreter, `re`
(which older pip's scripts import) and json (now ``cjson``). So only the forms read here
without doubt take this path: options of ``QUICK_VALUES`` and ``QUICK_FLAGS`` by their full
names, each value one that argparse would take as it is, then ``--`` and the command.
Anything else (an abbreviation, ``-h``, a value that is not a number, a value that starts
with ``-``, no ``--``) goes to argparse, which reads it or says what is wrong with it.
``tests/test_cli_entry.py`` holds what this path reads equal to what argparse reads.

Every way a command can fail ends here or in ``main`` as one message and a non-zero exit.
"""

from __future__ import annotations

import itertools
import os
import sys

from eventq.cli import cjson
from eventq.cli.client import CliError

# typing is not imported at run time (2.5 ms of every command): annotations are strings.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Exit status of a usage error or a refusal (argparse's own).
USAGE = 2

#: What ``eventq jobs submit`` holds for an option not given: argparse's defaults.
SUBMIT_DEFAULTS: dict[str, Any] = {
    "action": "submit", "any_gpu": False, "begin_at": None, "ca": None, "config": None,
    "config_name": None, "data_dir": None, "depends_on": [], "device_ids": None,
    "dry_run": False, "env": [], "estimated_cost": None, "estimated_runtime": None,
    "export_env": [], "format": "table", "gpus": 1, "max_attempts": None, "max_runtime": None,
    "metadata": [], "name": None, "no_export_env": False, "no_wait": False, "notify": None,
    "priority": None, "requires_approval": False, "retry_on_failure": False, "target": "auto",
    "team": None, "token": None, "url": None, "worker_labels": None}
#: The options with a value read here: where each goes, and its type or its choices.
QUICK_VALUES: dict[str, tuple[str, Any]] = {
    "--gpus": ("gpus", int), "--name": ("name", str), "--priority": ("priority", int),
    "--max-runtime": ("max_runtime", float), "--estimated-runtime": ("estimated_runtime", float),
    "--max-attempts": ("max_attempts", int), "--team": ("team", str), "--url": ("url", str),
    "--token": ("token", str), "--ca": ("ca", str),
    "--format": ("format", ("table", "json")), "--target": ("target", ("auto", "worker", "local"))}
#: The flags read here, and where each goes.
QUICK_FLAGS = {"--no-wait": "no_wait", "--any-gpu": "any_gpu",
               "--retry-on-failure": "retry_on_failure", "--dry-run": "dry_run",
               "--requires-approval": "requires_approval", "--no-export-env": "no_export_env"}


class UsageError(CliError):
    """Arguments the parser refused; ``usage`` is the command's usage line."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = plain_submission(words)
    if args is None:
        from eventq.cli.main import main as parsed_main

        return parsed_main(words)
    try:
        from eventq.cli.jobs import submit

        return submit(args)
    except (CliError, KeyboardInterrupt, BrokenPipeError) as exc:
        return failed(exc, args.format == "json")


def plain_submission(words: list[str]) -> Any:
    """What argparse would make of ``words`` (its Namespace's fields, but ``run``), when they
    are a submission this module reads without doubt; None for anything else."""
    if words[:2] != ["jobs", "submit"] or "--" not in words:
        return None
    cut = words.index("--")
    if cut + 1 == len(words):
        return None
    found = {k: list(v) if isinstance(v, list) else v for k, v in SUBMIT_DEFAULTS.items()}
    found["command"] = words[cut:]
    options = iter(words[2:cut])
    for word in options:
        name, sep, value = word.partition("=")
        if name in QUICK_FLAGS and not sep:
            found[QUICK_FLAGS[name]] = True
            continue
        if name not in QUICK_VALUES:
            return None
        given = value if sep else next(options, None)
        dest, kind = QUICK_VALUES[name]
        read = _value(given, kind)
        if read is None:
            return None
        found[dest] = read
    from types import SimpleNamespace

    return SimpleNamespace(**found)


def _value(given: str | None, kind: Any) -> Any:
    """``given`` as argparse would read it for ``kind`` (a type or choices); None where it
    might read it otherwise or refuse it."""
    if given is None or given.startswith("-"):
        return None
    if isinstance(kind, tuple):
        return given if given in kind else None
    try:
        return kind(given)
    except ValueError:
        return None


def wants_json(words: list[str]) -> bool:
    """``--format json`` among the options (not in a job's command, after ``--``)."""
    options = words[:words.index("--")] if "--" in words else words
    return "--format=json" in options or any(
        a == "--format" and b == "json" for a, b in itertools.pairwise(options))


def complain(exc: CliError, as_json: bool) -> None:
    if as_json:
        print(cjson.dumps(exc.as_json()))
    elif isinstance(exc, UsageError):
        print(exc.usage + str(exc).replace(": ", ": error: ", 1), file=sys.stderr, end="\n")
    else:
        print(f"eventq: {exc}", file=sys.stderr)


def failed(exc: CliError | KeyboardInterrupt | BrokenPipeError, as_json: bool) -> int:
    """The exit status of a command that ended in ``exc``, said as the user should see it."""
    if isinstance(exc, CliError):
        complain(exc, as_json)
        return USAGE
    if isinstance(exc, KeyboardInterrupt):
        return 130
    # The reader went away (`eventq jobs list | head`): that is not an error to show.
    # Python would complain again while flushing stdout at exit, so point it elsewhere.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


if __name__ == "__main__":
    sys.exit(main())
