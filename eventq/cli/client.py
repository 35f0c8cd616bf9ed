"""A small HTTP client for the CLI: finds the server and the token by itself."""

from __future__ import annotations

import os
import sys

from eventq.cli import cjson
from eventq.paths import SERVER_FILE, TOKEN_FILE

# typing is not imported at run time (2.5 ms of every command): annotations are strings.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import _socket
    import http.client
    import ssl
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

# urllib.request (http.client, ssl, email) loads with the first request that needs it: an
# https server, a proxy, or a stream. A plain-HTTP call (every `eventq jobs submit` on the
# server's machine) is one request on a socket, written here: importing http.client alone
# costs 16 ms of CPU (44 ms against 28 ms for a process that imports argparse, json,
# urllib.parse and pathlib; a socket adds 1 ms), more than the rest of the command.


def default_data_dir() -> Path:
    from pathlib import Path

    return Path(_home())


def _home() -> str:
    return os.environ.get("EVENTQ_HOME") or os.path.join(os.path.expanduser("~"), ".eventq")


def path_arg(text: str) -> Path:
    """A path option as a Path: pathlib (3 ms of CPU) loads only when one is given, so a
    command that finds its server by $EVENTQ_HOME or ~/.eventq does not pay for it."""
    from pathlib import Path

    return Path(text)


class CliError(Exception):
    """Printed as ``eventq: <message>`` with a non-zero exit (as JSON with
    ``--format json``: ``{"error": message, "status": HTTP status, …the server's fields}``)."""

    def __init__(self, message: str, status: int | None = None,
                 reply: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        #: The HTTP status of a refusal, and what the server said besides its error.
        self.status, self.reply = status, reply or {}

    def as_json(self) -> dict[str, Any]:
        found = {k: v for k, v in self.reply.items() if k not in ("error", "success")}
        return {"error": self.reply.get("error", str(self)), **found,
                **({"status": self.status} if self.status is not None else {})}


class ServerSentEvent:
    """One message of a ``text/event-stream``."""

    __slots__ = ("data", "event", "id")

    def __init__(self, event: str, data: str, id: str | None) -> None:
        self.event, self.data, self.id = event, data, id


def quote(part: str) -> str:
    """One path segment of a URL (a job id or a user name as typed)."""
    import urllib.parse

    return urllib.parse.quote(part, safe="")


class Client:
    """The server's address, the token every request carries, and the CA its certificate
    is verified against. (Not a dataclass: `dataclasses` loads `inspect`, 7 ms of every
    command.)"""

    def __init__(self, url: str, token: str, ca: str | None = None,
                 pinned: bool = False) -> None:
        self.url, self.token = url, token
        #: A PEM file to verify the server's certificate with (None: the system's CAs);
        #: ``pinned``: it is the server's own certificate, read from its ``server.json``.
        self.ca, self.pinned = ca, pinned
        self._ssl: ssl.SSLContext | None = None

    @classmethod
    def find(cls, url: str | None, token: str | None, data_dir: Path | None,
             ca: str | None = None) -> Client:
        """Flags, then EVENTQ_URL / EVENTQ_TOKEN / EVENTQ_CA, then the local data directory
        (whose ``server.json`` also names the certificate of a local TLS server)."""
        home = os.fspath(data_dir) if data_dir is not None else _home()
        ca = ca or os.environ.get("EVENTQ_CA") or None
        pinned = False
        url = url or os.environ.get("EVENTQ_URL")
        if not url:
            url, cert = _read_server(home)
            pinned = ca is None and cert is not None
            ca = ca or cert
        token = token or os.environ.get("EVENTQ_TOKEN") or _read(os.path.join(home, TOKEN_FILE))
        if not url:
            raise CliError(f"no server found: none is running on {home} "
                           "(start one with `eventq server`, or pass --url / set EVENTQ_URL)")
        if not token:
            raise CliError(f"no token: pass --token, set EVENTQ_TOKEN, or run on the server's "
                           f"machine where {os.path.join(home, TOKEN_FILE)} is readable")
        return cls(url.rstrip("/"), token, ca, pinned)

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """For an https URL: what verifies the server (None for plain HTTP)."""
        if self._ssl is None and self.url.startswith("https:"):
            from eventq import tls

            try:
                self._ssl = tls.ca_context(self.ca) if not self.pinned else \
                    tls.client_context(self.ca, pinned=True)
            except tls.TlsError as exc:
                raise CliError(str(exc)) from None
            except OSError as exc:
                raise CliError(f"cannot use the server's certificate {self.ca}: {exc}") from None
        return self._ssl
    def open(self, method: str, path: str, body: Any = None,
             timeout: float | None = 60.0) -> http.client.HTTPResponse:
        """The raw response of a successful request; errors become CliError."""
        import urllib.error
        import urllib.request

        data = None if body is None else request_body(body)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        try:
            resp: http.client.HTTPResponse = urllib.request.urlopen(
                req, timeout=timeout, context=self.ssl_context)
        except urllib.error.HTTPError as exc:
            raise refusal(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            raise CliError(self.unreachable(exc.reason)) from None
        except OSError as exc:
            raise CliError(self.unreachable(exc)) from None
        return resp

    def unreachable(self, reason: object) -> str:
        """One line on why a request failed before any answer came."""
        ssl = sys.modules.get("ssl")  # no TLS, no certificate to blame
        if ssl is not None and isinstance(reason, ssl.SSLCertVerificationError):
            from eventq import tls

            return tls.untrusted(self.url, reason.verify_message or str(reason))
        return f"cannot reach the server at {self.url}: {reason}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        if self.url.startswith("http:") and not _proxied():
            status, raw = self._plain(method, path, body)
            if not 200 <= status < 300:
                raise refusal(status, raw)
            return cjson.loads(raw or b"null")
        with self.open(method, path, body) as resp:
            return cjson.loads(resp.read() or b"null")

    def _plain(self, method: str, path: str, body: Any, timeout: float = 60.0,
               ) -> tuple[int, bytes]:
        """One plain-HTTP request on its own connection: the status and the body."""
        netloc, host, port, target = split_http_url(self.url + path)
        data = b"" if body is None else request_body(body)
        try:
            head = (f"{method} {target} HTTP/1.1\r\nHost: {netloc}"
                    f"\r\nAuthorization: Bearer {self.token}\r\nContent-Type: "
                    f"application/json\r\nContent-Length: {len(data)}\r\n"
                    "Connection: close\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise CliError("the token or the URL has characters HTTP cannot carry") from None
        try:
            raw = _exchange(host, port, head + data, timeout)
        except OSError as exc:
            raise CliError(self.unreachable(exc)) from None
        try:
            return parse_response(raw)
        except ValueError:
            raise CliError(f"the server at {self.url} sent an answer that is not "
                           "HTTP") from None

    def text(self, path: str) -> bytes:
        """A plain-text resource, as the bytes the server sent."""
        with self.open("GET", path) as resp:
            return resp.read()

    def stream(self, path: str) -> Iterator[ServerSentEvent]:
        """Follow a ``text/event-stream`` until the server closes it.

        No read timeout: a follow lasts as long as what it follows (Ctrl-C ends it).
        """
        with self.open("GET", path, timeout=None) as resp:
            yield from parse_sse(resp)


def parse_sse(lines: Iterator[bytes] | Any) -> Iterator[ServerSentEvent]:
    """The messages of an event stream (the WHATWG format: fields, comments, blank lines)."""
    event, last_id = "", None
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value
    if data:
        yield ServerSentEvent(event or "message", "\n".join(data), last_id)


def request_body(body: Any) -> bytes:
    """``body`` as the request's JSON. A word, path or variable of the shell that is not
    UTF-8 (bytes of another encoding) is held by Python as lone surrogates, which JSON
    escapes and the server refuses, the whole request, as "not valid JSON": it is named
    here instead, with what it holds."""
    text = cjson.dumps(body)
    if "\\ud" in text and (found := not_utf8(body, "")):
        where, value = found
        raise CliError(f"{where or 'the request'} is not UTF-8 text ({shown(value)}); eventq "
                       "sends requests as JSON, which carries UTF-8 only")
    return text.encode()


def not_utf8(value: Any, where: str) -> tuple[str, str] | None:
    """Where in ``value`` the first text that is not UTF-8 is, and that text."""
    if isinstance(value, str):
        return None if _utf8(value) else (where, value)
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if not isinstance(key, str):
            inner = f"{where}[{key}]"
        elif not _utf8(key):
            return f"a name in {where or 'the request'}", key
        else:
            inner = f"{where}.{key}" if where else key
        if found := not_utf8(item, inner):
            return found
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def shown(text: str) -> str:
    """``text`` with the bytes that are not UTF-8 as ``\\xNN``."""
    return text.encode(errors="surrogateescape").decode(errors="backslashreplace")


def exportable_environ() -> dict[str, str]:
    """This shell's variables, for a job run on the server's machine: those that are UTF-8
    text; the others (bytes of another encoding) are named on stderr and left out, rather
    than the whole submission refused for one of them."""
    env, left = {}, []
    for name, value in os.environ.items():
        if _utf8(name) and _utf8(value):
            env[name] = value
        else:
            left.append(shown(name))
    if left:
        print(f"eventq: not exported, not UTF-8 text: {', '.join(left)}", file=sys.stderr)
    return env


def split_http_url(url: str) -> tuple[str, str, int, str]:
    """An ``http://`` URL's host and port as the Host header names them, the host, the port
    and the request's target: what urllib.parse.urlsplit gives for the one scheme a plain
    call takes, without importing urllib.parse (2.1 ms of CPU, for its named tuples)."""
    rest = url.removeprefix("http://")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc = rest[:cut].rpartition("@")[2]  # no user:password@ in what is sent
    target = rest[cut:].partition("#")[0]
    if netloc.startswith("["):  # an IPv6 address: [::1]:8080
        host, _, port = netloc[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = netloc.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        raise CliError(f"{url.partition('/api/')[0]} is not a URL: its port is {port!r}")
    return netloc, host or "localhost", int(port) if port else 80, \
        target if target.startswith("/") else "/" + target


def _exchange(host: str, port: int, request: bytes, timeout: float) -> bytes:
    """Send ``request`` to the first address of ``host`` that answers, and read the reply
    until the server closes the connection (socket.create_connection's loop). On _socket,
    the C module under socket: `import socket` costs 3.1 ms of CPU, building its enums;
    `import _socket` 0.5 ms. An ASCII host goes as bytes, which getaddrinfo takes as they
    are (a str loads the IDNA codec, 1 ms, to encode what is already ASCII)."""
    sock = _connect(host.encode() if host.isascii() else host, port, timeout)
    # Sent once: a request that fails from here on is not tried at another address (the
    # server may have recorded it).
    try:
        sock.sendall(request)
        parts = []
        while part := sock.recv(65536):
            parts.append(part)
        return b"".join(parts)
    finally:
        sock.close()


def _connect(host: str | bytes, port: int, timeout: float) -> _socket.socket:
    """A socket connected to the first of ``host``'s addresses that accepts."""
    import _socket

    failed: OSError = OSError(f"no address for {host!r}")
    for family, kind, proto, _, address in _socket.getaddrinfo(host, port, 0,
                                                               _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            failed = exc
    raise failed


def _proxied() -> bool:
    """An HTTP proxy in the environment, which urllib (and so the CLI) goes through."""
    return bool(os.environ.get("http_proxy") or os.environ.get("HTTP_PROXY"))


def parse_response(raw: bytes) -> tuple[int, bytes]:
    """The status and the body of a whole HTTP/1.1 response (read until the server closed
    the connection); ValueError if it is not one."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    first = lines[0].split(None, 2)
    if not sep or len(first) < 2 or not first[0].startswith(b"HTTP/"):
        raise ValueError("not an HTTP response")
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(b":") for line in lines[1:])}
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    elif b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(body) < length:
            raise ValueError("the body ended early")
        body = body[:length]
    return int(first[1]), body


def _dechunk(body: bytes) -> bytes:
    """A chunked body's data (RFC 9112 7.1; trailers ignored)."""
    parts: list[bytes] = []
    at = 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            raise ValueError("the body ended early")
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(parts)
        if end + 2 + size > len(body):
            raise ValueError("the body ended early")
        parts.append(body[end + 2:end + 2 + size])
        at = end + 2 + size + 2


def refusal(status: int, raw: bytes) -> CliError:
    """An HTTP error reply as an error to show: ``no job x (HTTP 404) [field: …]``."""
    try:
        body = cjson.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return CliError(f"HTTP {status}", status)
    text = f"{body.get('error', 'error')} (HTTP {status})"
    if body.get("field"):
        text += f" [field: {body['field']}]"
    return CliError(text, status, body)


def _read(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip() or None
    except OSError:
        return None


def _read_server(home: str) -> tuple[str | None, str | None]:
    """The local server's URL and, when it serves TLS, its certificate file."""
    raw = _read(os.path.join(home, SERVER_FILE))
    found = cjson.loads(raw) if raw else {}
    return found.get("url"), found.get("cert")
