"""``eventq users add|list|token|revoke|delete|set``: people, levels, teams and tokens (admins)."""

from __future__ import annotations

import argparse
from typing import Any

from eventq.cli import output
from eventq.cli.client import Client, CliError, quote
from eventq.cli.output import emit_json, table

#: eventq.events.Level's values, spelled out so that the parser does not load the events
#: (msgspec); the server checks a level against Level itself.
LEVELS = ["admin", "lead", "researcher", "viewer"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    users = sub.add_parser("users", help="users, levels, teams and tokens (admins)") \
        .add_subparsers(dest="action", required=True)
    a = users.add_parser("add", parents=[common], help="create a user; prints their token once")
    a.add_argument("name")
    a.add_argument("--level", choices=LEVELS, default="researcher",
                   help="gives the priority of their jobs (default: researcher)")
    a.add_argument("--team")
    a.set_defaults(run=add)
    ls = users.add_parser("list", parents=[common], help="every user")
    ls.set_defaults(run=list_users)
    t = users.add_parser("token", parents=[common],
                         help="issue another token for a user; prints it once")
    t.add_argument("name")
    t.set_defaults(run=issue_token)
    r = users.add_parser("revoke", parents=[common], help="revoke every token of a user")
    r.add_argument("name")
    r.set_defaults(run=revoke)
    d = users.add_parser("delete", parents=[common],
                         help="delete a user: their tokens and sessions end (refused while "
                              "a job of theirs waits or runs)")
    d.add_argument("name")
    d.set_defaults(run=delete)
    s = users.add_parser("set", parents=[common], help="change a user's level or team")
    s.add_argument("name")
    s.add_argument("--level", choices=LEVELS)
    s.add_argument("--team", help='"" removes the user from their team')
    s.set_defaults(run=change)


def _client(args: argparse.Namespace) -> Client:
    return Client.find(args.url, args.token, args.data_dir, args.ca)


def _print_token(args: argparse.Namespace, reply: dict[str, Any], what: str) -> int:
    if args.format == "json":
        emit_json(reply)
        return 0
    output.console.print(what, markup=False)
    output.console.print("token (shown only this once; give it to them as EVENTQ_TOKEN):",
                         markup=False)
    print(reply["token"])
    return 0


def add(args: argparse.Namespace) -> int:
    body = {"name": args.name, "level": args.level, "team": args.team}
    reply = _client(args).call("POST", "/api/admin/users", body)
    team = f", team {reply['team']}" if reply.get("team") else ""
    return _print_token(args, reply, f"added {reply['name']} ({reply['level']}{team})")


def list_users(args: argparse.Namespace) -> int:
    users = _client(args).call("GET", "/api/admin/users")["users"]
    if args.format == "json":
        emit_json(users)
        return 0
    table(users, ["name", "level", "team", "tokens"])
    return 0


def issue_token(args: argparse.Namespace) -> int:
    reply = _client(args).call("POST", f"/api/admin/users/{quote(args.name)}/tokens")
    return _print_token(args, reply, f"a new token for {reply['name']} "
                                     "(their other tokens still work)")


def revoke(args: argparse.Namespace) -> int:
    reply = _client(args).call("DELETE", f"/api/admin/users/{quote(args.name)}/tokens")
    if args.format == "json":
        emit_json(reply)
    else:
        output.console.print(f"revoked every token of {reply['name']}", markup=False)
    return 0


def delete(args: argparse.Namespace) -> int:
    reply = _client(args).call("DELETE", f"/api/admin/users/{quote(args.name)}")
    if args.format == "json":
        emit_json(reply)
    else:
        output.say(f"deleted {reply['name']}: their tokens and sessions no longer work")
    return 0


def change(args: argparse.Namespace) -> int:
    if args.level is None and args.team is None:
        raise CliError("nothing to change: give --level and/or --team")
    body: dict[str, Any] = {}
    if args.level is not None:
        body["level"] = args.level
    if args.team is not None:
        body["team"] = args.team
    reply = _client(args).call("PATCH", f"/api/admin/users/{quote(args.name)}", body)
    if args.format == "json":
        emit_json(reply)
    else:
        output.console.print(f"{reply['name']}: {reply['level']}, team {reply['team'] or '-'}",
                             markup=False)
    return 0
