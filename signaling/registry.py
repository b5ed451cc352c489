"""Live realtime sessions (WebRTC calls and WebSocket sessions together), with one cap on how many
run at once, and closing them all at shutdown."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from signaling.errors import CallError


class LiveSession(Protocol):
    id: str

    async def close(self, reason: str = "hangup") -> None: ...


class CallRegistry:
    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self.calls: dict[str, LiveSession] = {}
        self._reserved = 0

    @property
    def active(self) -> int:
        return len(self.calls) + self._reserved

    @contextlib.asynccontextmanager
    async def reserve(self):
        """Hold a slot while a session is being set up (so concurrent offers cannot overshoot)."""
        if self.active >= self.max_calls:
            raise CallError(503, "too_many_sessions",
                            f"the server is at its limit of {self.max_calls} concurrent calls; try again later")
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    def add(self, call: LiveSession) -> None:
        self.calls[call.id] = call

    def discard(self, call: LiveSession) -> None:
        if self.calls.get(call.id) is call:
            del self.calls[call.id]

    async def close_all(self) -> None:
        await asyncio.gather(*(call.close("server_shutdown") for call in list(self.calls.values())),
                             return_exceptions=True)
