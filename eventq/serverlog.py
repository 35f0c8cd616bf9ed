"""How ``eventq server`` writes its lines: readable text, or one JSON object a line
(``--log-format json``) that journald, Loki or ``jq`` take as they are.

Every line goes to stderr, but the announcement (where the server listens), which goes to
stdout as it always has, so a script that reads the first line of stdout finds the URL in
either format. JSON is encoded with msgspec, and the lines of one commit of the log
(``Lines``) are rendered without structlog's bound logger and written with one call,
stamped with their events' own time: the server's hot path pays a few microseconds a line.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

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
