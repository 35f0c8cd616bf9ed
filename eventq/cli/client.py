"""A small HTTP client for the CLI: finds the server and the token by itself."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eventq.auth import TOKEN_FILE
from eventq.server import SERVER_FILE, default_data_dir


class CliError(Exception):
    """Printed as ``eventq: <message>`` with a non-zero exit."""


@dataclass
class Client:
    url: str
    token: str

    @classmethod
    def find(cls, url: str | None, token: str | None, data_dir: Path | None) -> Client:
        """Flags, then EVENTQ_URL / EVENTQ_TOKEN, then the local data directory."""
        home = data_dir or default_data_dir()
        url = url or os.environ.get("EVENTQ_URL") or _read_url(home)
        token = token or os.environ.get("EVENTQ_TOKEN") or _read(home / TOKEN_FILE)
        if not url:
            raise CliError(f"no server found: none is running on {home} "
                           "(start one with `eventq server`, or pass --url / set EVENTQ_URL)")
        if not token:
            raise CliError(f"no token: pass --token, set EVENTQ_TOKEN, or run on the server's "
                           f"machine where {home / TOKEN_FILE} is readable")
        return cls(url.rstrip("/"), token)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise CliError(_error_text(exc)) from None
        except urllib.error.URLError as exc:
            raise CliError(f"cannot reach the server at {self.url}: {exc.reason}") from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
    except ValueError:
        return f"HTTP {exc.code}"
    text = f"{body.get('error', 'error')} (HTTP {exc.code})"
    if body.get("field"):
        text += f" [field: {body['field']}]"
    return text


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _read_url(home: Path) -> str | None:
    raw = _read(home / SERVER_FILE)
    return json.loads(raw).get("url") if raw else None
