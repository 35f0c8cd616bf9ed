"""JSON for the command's requests and replies, written and read by the C encoder and
scanner the ``json`` package itself runs on, without importing that package.

Why: ``import json`` imports ``re`` for its pure-Python fallbacks, and ``re`` imports
``enum``, ``functools`` and ``collections``: 5.0 ms of CPU in every command, where one
``eventq jobs submit`` takes about 17 (``perf stat -r 50``: ``python -c "import json,
itertools, os, sys, _socket, time"`` 13.35 ms, the same with ``_json`` 8.32 ms, ``pass``
7.92 ms). The text is json's own (the same C code writes it: ``dumps(v) == json.dumps(v)``),
and so are the values read (``tests/test_cjson.py``).
"""

from __future__ import annotations

from _json import encode_basestring_ascii, make_encoder, make_scanner

# typing is not imported at run time (eventq/cli/entry.py): annotations are strings.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class _Reading:
    """What json's scanner reads from its decoder: json.loads's defaults."""

    def __init__(self) -> None:
        self.strict = True
        self.object_hook = self.object_pairs_hook = None
        self.parse_float, self.parse_int = float, int
        self.parse_constant = _CONSTANTS.__getitem__


# typeshed says the context is a scanner; the C code only reads these six attributes.
_scan = make_scanner(_Reading())  # type: ignore[arg-type]


def _refuse(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> str:
    """``json.dumps(value)``."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    encode = make_encoder({}, _refuse, encode_basestring_ascii, None, ": ", ", ",
                          False, False, True)
    return "".join(encode(value, 0))


def loads(raw: bytes | str) -> Any:
    """``json.loads(raw)`` for UTF-8, and its ``ValueError`` for what is not JSON."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration:
        _refused(text)
    if text[end:].strip(_WHITESPACE):
        _refused(text)
    return value


def _refused(text: str) -> NoReturn:
    """json's own error for ``text``: it says the line and column."""
    import json

    json.loads(text)
    raise ValueError("not JSON")  # json raised above: a line for the type checker
