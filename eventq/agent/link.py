"""The agent's current connection to the orchestrator, shared by everything that sends.

Connections come and go; what is sent through a closed one is not queued here, because
every report the orchestrator must not miss is sent again after the next ``welcome``
(see ``attempts``). A numbered connection lets an attempt know whether its report went
out on the connection that is up now.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp


class Link:
    """Sends one message at a time on the open websocket, if there is one."""

    def __init__(self) -> None:
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        #: Which connection is up (or was last up): 1 for the first, then one more each time.
        self.number = 0
        self.up = asyncio.Event()
        self._lock = asyncio.Lock()

    def attach(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.number = ws, self.number + 1
        self.up.set()

    def detach(self) -> None:
        self.ws = None
        self.up.clear()

    @property
    def is_up(self) -> bool:
        return self.ws is not None and not self.ws.closed

    async def send(self, message: dict[str, Any]) -> bool:
        """True if the message was written to the open connection."""
        ws = self.ws
        if ws is None or ws.closed:
            return False
        try:
            async with self._lock:
                await ws.send_str(json.dumps(message))
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            return False  # the connection is closing; the reader will notice
        return True
