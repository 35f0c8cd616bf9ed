"""How ``eventq server`` writes its lines: readable text, or one JSON object a line
(``--log-format json``) that journald, Loki or ``jq`` take as they are.

Every line goes to stderr, but the announcement (where the server listens), which goes to
stdout as it always has, so a script that reads the first line of stdout finds the URL in
either format. JSON is encoded with msgspec, and the lines of one commit of the log
(``Lines``) are rendered without structlog's bound logger and written with one call,
stamped with their events' own time: the server's hot path pays a few microseconds a line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO, cast

import msgspec
import structlog

_encoder = msgspec.json.Encoder(enc_hook=str)
#: As ``configure`` set them: what ``Lines`` renders and which of its lines it keeps.
_format, _level = "console", logging.INFO
_LEVELS = {name.lower(): number for name, number in logging.getLevelNamesMapping().items()}


def _json(event: dict[str, Any], **_: Any) -> str:
    return _encoder.encode(event).decode()


def _leading(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Time, level and what happened first: a person reading ``journalctl -o cat`` sees
    them where a line starts."""
    return {"timestamp": event.pop("timestamp"), "level": event.pop("level"),
            "event": event.pop("event"), **event}


def _console(logger: Any, method: str, event: dict[str, Any]) -> str:
    """structlog's ConsoleRenderer's layout without colours, at a tenth of its cost (47 µs
    a line against 5 on the machine of docs/performance.md): the server writes one for
    every action."""
    stamp, level, what = event.pop("timestamp", ""), event.pop("level", ""), \
        event.pop("event", "")
    trace = event.pop("exception", None)
    pairs = " ".join(f"{key}={value}" for key, value in sorted(event.items()))
    line = f"{stamp} [{level:<9}] {what:<30} {pairs}".rstrip()
    return line if trace is None else f"{line}\n{trace}"


def processors(fmt: str, stamp: bool = True) -> list[Any]:
    """The chain every line goes through: its level, its UTC time (unless the caller gives
    ``timestamp``), its rendering."""
    chain: list[Any] = [structlog.processors.add_log_level]
    if stamp:
        chain.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    chain.append(structlog.processors.format_exc_info)  # a traceback becomes a field
    if fmt == "json":
        return [*chain, _leading, structlog.processors.JSONRenderer(serializer=_json)]
    return [*chain, _console]


def configure(fmt: str, level: str = "info") -> None:
    global _format, _level
    _format, _level = fmt, logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=processors(fmt),
        wrapper_class=structlog.make_filtering_bound_logger(_level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True)


def to(stream: TextIO, fmt: str) -> Any:
    """A logger that writes ``fmt`` lines to ``stream`` (the announcement's stdout)."""
    return structlog.wrap_logger(structlog.PrintLogger(stream), processors=processors(fmt),
                                 wrapper_class=structlog.make_filtering_bound_logger(
                                     logging.INFO))


def iso(t: float) -> str:
    """Epoch seconds as the time stamper writes them (UTC, ``Z``)."""
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


class Lines:
    """Lines kept until ``flush``, in the configured format, each with the time its caller
    gives: a commit's lines cost one write. They are rendered here as structlog's chain
    would render them, without its bound logger: 0.8 µs a line against 6."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.kept: list[str] = []
        self.json = _format == "json"

    def enabled(self, level: int) -> bool:
        return level >= _level

    def write(self, level: str, event: str, timestamp: str, **fields: Any) -> None:
        if _LEVELS[level] < _level:
            return
        line = {"timestamp": timestamp, "level": level, "event": event, **fields}
        self.kept.append(_encoder.encode(line).decode() if self.json
                         else _console(None, level, line))

    def flush(self) -> None:
        if self.kept:
            self.kept.append("")
            self.stream.write("\n".join(self.kept))
            self.stream.flush()
            self.kept.clear()


class Outlet(io.TextIOBase):
    """A stream a server or worker writes lines to, whose failures cost those lines and
    never the process. When whoever read the server's stderr went away (a pipe's reader ended,
    journald restarted without keeping its streams), every write raised
    ``BrokenPipeError``, wherever it was made: in the log's commit loop it stopped every
    commit after it. A broken pipe never mends, so its descriptor is then pointed at
    ``/dev/null``, and what was buffered for it goes there too; any other failure (a full
    disk under a redirected file) drops the write and tries the next."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        #: Writes and flushes that failed.
        self.lost = 0

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            self._failed(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.lost += 1
        if isinstance(exc, BrokenPipeError):
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def writable(self) -> bool:
        return True


def keep_writing() -> None:
    """A long-running process's stdout and stderr (the server's, a worker's) as
    ``Outlet``s, for every writer that finds them in ``sys``: structlog's (so before
    ``configure``, which hands it the stream), the action log's, the fail-stop line, the
    announcement. A command keeps its own: ``eventq jobs list | head`` ends with 141."""
    if not isinstance(sys.stderr, Outlet):
        sys.stderr = cast(TextIO, Outlet(sys.stderr))
    if not isinstance(sys.stdout, Outlet):
        sys.stdout = cast(TextIO, Outlet(sys.stdout))


def lines_lost() -> int:
    """Writes to this process's stdout and stderr that failed and were dropped."""
    return sum(stream.lost for stream in (sys.stdout, sys.stderr) if isinstance(stream, Outlet))
