"""A real HTTP receiver on loopback for completion callbacks (an aiohttp server)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

AiohttpServer = Callable[..., Awaitable[TestServer]]


@dataclass
class Receiver:
    """Answers each POST with the next of ``answers`` (200 once they run out), or, while
    ``hanging``, not at all until ``release`` is set."""

    answers: list[int] = field(default_factory=list)
    hanging: bool = False
    got: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    base: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append(await request.json())
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)
        if self.hanging:
            await self.release.wait()
        status = self.answers.pop(0) if self.answers else 200
        return web.json_response({"ok": status < 300}, status=status)

    def url(self, path: str = "/hook") -> str:
        return self.base + path


@contextlib.asynccontextmanager
async def receiving(aiohttp_server: AiohttpServer) -> AsyncIterator[Receiver]:
    """A receiver on pytest-aiohttp's ``aiohttp_server``, which closes it after the test."""
    made = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", made.handle)
    server = await aiohttp_server(app)
    made.base = str(server.make_url("")).rstrip("/")
    try:
        yield made
    finally:
        made.release.set()  # a held answer ends, so the receiver can close
