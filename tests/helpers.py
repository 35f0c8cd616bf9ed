"""Helpers the async tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(check: Callable[[], bool], what: str = "the condition",
                seconds: float = 10.0) -> None:
    """Wait, polling every 10 ms, until ``check()`` holds; fail after ``seconds``."""
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")
