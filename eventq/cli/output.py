"""Printing for the CLI: rich tables by default, JSON with ``--format json``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

# Piped output is read by scripts and grep: do not squeeze it to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=200)


def pick(record: dict[str, Any], path: str) -> Any:
    """A dot path into a record: ``metadata.run_name``."""
    value: Any = record
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def table(rows: Sequence[dict[str, Any]], fields: Sequence[str], title: str | None = None) -> None:
    t = Table(title=title, show_lines=False)
    for f in fields:
        # Ids are copied into the next command: never cut them.
        t.add_column(f, no_wrap=f.endswith("id"), min_width=12 if f.endswith("id") else None,
                     overflow="fold")
    for row in rows:
        t.add_row(*(cell(pick(row, f)) for f in fields))
    console.print(t)
