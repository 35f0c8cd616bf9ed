"""``eventq ui [--open]``: a one-time sign-in link to the web page.

On the server's machine the CLI finds the local admin's token by itself, so the link signs
the admin in with no typing: ``<server url>/#signin=<code>``. The code travels in the
fragment, which a browser never sends to a server, so no access log holds it; the page
sends it once to ``POST /api/session``. It is good once, for five minutes.
"""

from __future__ import annotations

import argparse
import sys

from eventq.cli.client import Client
from eventq.cli.output import emit_json


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ui", parents=[common],
                       help="print a one-time sign-in link to the web page (the local admin's)")
    p.add_argument("--open", action="store_true", help="also open it in a browser")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    client = Client.find(args.url, args.token, args.data_dir, args.ca)
    reply = client.call("POST", "/api/session/code")
    link = client.url + reply["link"]
    if args.format == "json":
        emit_json({"url": link, "user": reply["user"], "expires_at": reply["expires_at"]})
    else:
        print(link, flush=True)
        print(f"signs {reply['user']} in once, within 5 minutes", file=sys.stderr)
    if args.open:
        import webbrowser

        if not webbrowser.open(link):
            print("eventq: no browser could be opened here; open the link above in one",
                  file=sys.stderr)
            return 1
    return 0
