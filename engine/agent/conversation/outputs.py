"""The session's ordered output stream: events and audio, read by one transport at a time."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.agent.conversation.events import ConversationError, ConversationEvent, ErrorType, Output

_CLOSED = object()


class OutputQueue:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False

    def emit(self, event: ConversationEvent) -> None:
        if not self.closed:
            self._queue.put_nowait(event)

    def put(self, item: Output) -> None:
        """Audio and clears go out even while events are being dropped at close."""
        self._queue.put_nowait(item)

    def error(self, type_: ErrorType, code: str, message: str, *, item_id: str | None = None,
              response_id: str | None = None) -> None:
        self.emit(ConversationError(type=type_, code=code, message=message, item_id=item_id,
                                    response_id=response_id))

    def close(self) -> None:
        self.closed = True
        self._queue.put_nowait(_CLOSED)

    def stream(self) -> AsyncIterator[Output]:
        return _OutputStream(self._queue)


class _OutputStream:
    """A plain iterator over the queue, so leaving an `async for` early closes nothing."""

    def __init__(self, queue: asyncio.Queue[object]) -> None:
        self._queue = queue

    def __aiter__(self) -> _OutputStream:
        return self

    async def __anext__(self) -> Output:
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # every later reader ends too
            raise StopAsyncIteration
        return item  # type: ignore[return-value]
