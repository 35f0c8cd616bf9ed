"""The event log's hash chain, with the standard library alone.

Guards the promise that every row is what its server wrote: ``hashed_rows`` checks that
seqs run from 1 without a gap and that each row hashes, with the previous row's hash, to
the hash stored with it. A start with a large log runs it in a second process
(``python -m eventq.chain LOG UPTO``: sqlite3 and hashlib only, so it starts in tens of
milliseconds) while the server's own process decodes and folds the same rows
(``eventq.log.EventLog.replay``), and acts on nothing until its answer is in.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
import sys
from collections.abc import Iterator
from typing import Any

GENESIS = b"\x00" * 32
_SEQ_TIME = struct.Struct(">qd")

Row = tuple[int, float, str, str, str | None, int, bytes, bytes]

ROWS = ("SELECT seq, time, principal, type, job_id, v, body, hash FROM events "
        "WHERE seq <= ? ORDER BY seq")


class LogCorrupt(Exception):
    """The log is not as its server wrote it, from ``seq`` on.

    ``first``: ``seq`` is the first row that differs. When only the anchor shows the change
    (a chain recomputed after an edit), ``seq`` is the anchored head and the change is at
    or before it.
    """

    def __init__(self, seq: int, why: str, first: bool = True) -> None:
        super().__init__(f"log is corrupt at seq {seq}: {why}")
        self.seq, self.why, self.first = seq, why, first


def chain_hash(prev: bytes, seq: int, time: float, principal: str, type_: str,
               job_id: str | None, version: int, body: bytes) -> bytes:
    """The hash of one row, chained to the previous row's hash."""
    fields = f"{principal}\x1f{type_}\x1f{job_id or ''}\x1f{version}".encode()
    return hashlib.sha256(b"".join((prev, _SEQ_TIME.pack(seq, time), fields, body))).digest()


def hashed_rows(conn: sqlite3.Connection, upto: int) -> Iterator[Row]:
    """Rows 1 to ``upto``, each yielded once it is in sequence and its hash holds
    (``chain_hash`` inlined: the hot loop of every start)."""
    prev, expected = GENESIS, 1
    sha256, pack = hashlib.sha256, _SEQ_TIME.pack
    try:
        for row in conn.execute(ROWS, (upto,)):
            seq, time, principal, type_, job_id, version, body, stored = row
            if seq != expected:
                raise LogCorrupt(expected, f"sequence jumps to {seq}")
            fields = f"{principal}\x1f{type_}\x1f{job_id or ''}\x1f{version}".encode()
            if sha256(b"".join((prev, pack(seq, time), fields, body))).digest() != stored:
                raise LogCorrupt(seq, "hash does not match its contents and the previous hash")
            yield row
            prev, expected = stored, seq + 1
    except (TypeError, ValueError, struct.error) as exc:  # a column of the wrong kind
        raise LogCorrupt(expected, f"the row cannot be read: {exc}") from exc


def check_rows(rows: Iterator[Row]) -> dict[str, Any]:
    """The head ``rows`` reach, or where they break, as ``python -m eventq.chain`` answers."""
    seq, digest = 0, GENESIS
    try:
        for row in rows:
            seq, digest = row[0], row[7]
    except LogCorrupt as exc:
        return {"corrupt": exc.seq, "why": exc.why, "first": exc.first}
    return {"seq": seq, "hash": digest.hex()}


def check(path: str, upto: int) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return check_rows(hashed_rows(conn, upto))
    finally:
        conn.close()


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1], int(sys.argv[2]))))
