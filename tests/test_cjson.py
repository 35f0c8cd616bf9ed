"""The command's JSON (``eventq/cli/cjson.py``) writes what json writes and reads what json
reads, and refuses what json refuses with json's own message."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventq.cli import cjson

#: Every kind of value a request or a reply holds, nested; any text, any float.
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30)


def same(a: Any, b: Any) -> bool:
    """Equal, where NaN equals NaN (json reads its own NaN back as a new NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(VALUES)
def test_it_writes_what_json_writes(value: Any) -> None:
    assert cjson.dumps(value) == json.dumps(value)


@given(VALUES, st.sampled_from(["", " ", "\n", " \t\r\n "]))
def test_it_reads_what_json_reads(value: Any, space: str) -> None:
    text = space + json.dumps(value) + space
    assert same(cjson.loads(text), json.loads(text))
    assert same(cjson.loads(text.encode()), json.loads(text))


@pytest.mark.parametrize("text", ["", "   ", "{", '{"a": 1} x', "[1, 2", "nul", '"\x01"',
                                  "{'a': 1}", "1 2"])
def test_what_json_refuses_it_refuses_with_json_s_words(text: str) -> None:
    with pytest.raises(ValueError) as by_json:
        json.loads(text)
    with pytest.raises(ValueError) as by_cjson:
        cjson.loads(text)
    assert str(by_cjson.value) == str(by_json.value)


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(ValueError):
        cjson.loads(b'"\xff"')


def test_what_json_cannot_write_it_cannot_either() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        cjson.dumps({"a": object()})
    with pytest.raises(ValueError, match="Circular"):
        loop: list[Any] = []
        loop.append(loop)
        cjson.dumps(loop)
