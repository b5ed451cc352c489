"""Speculative replies: the answer to a spoken turn, started before the turn has ended.

With server_vad the pause pass of `IncrementalTranscriber` usually holds the turn's transcript
while the VAD is still counting the silence that ends the turn (on a 2-core CPU with tiny.en the
pass lands ~400 ms after the words, the turn ends ~580 ms after them). A `Speculation` runs the
reply from that transcript at once, LLM and TTS, and holds everything it makes. When the turn ends
with the same transcript and the reply would be asked with exactly the same messages and settings
(`ReplyPlan.same_as`), the response starts from what is already made; otherwise (speech resumed,
the final transcript differs, the conversation or the session changed) it is cancelled and nothing
of it is seen.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from engine.agent.tools import Tool, ToolChoice, may_call_tools
from engine.speech.types import TTSRequest


@dataclasses.dataclass(frozen=True, eq=False)
class ReplyPlan:
    """Everything an agent reply is generated from."""

    messages: list[dict]
    max_tokens: int
    temperature: float
    tools: tuple[Tool, ...]
    choice: ToolChoice
    speak: bool
    request: TTSRequest  # the TTS template (voice, sampling, ...)

    @property
    def calls_tools(self) -> bool:
        return may_call_tools(self.tools, self.choice)

    def same_as(self, other: ReplyPlan) -> bool:
        return (self.messages == other.messages and self.max_tokens == other.max_tokens
                and self.temperature == other.temperature and self.tools == other.tools
                and self.choice == other.choice and self.speak == other.speak
                and _same_request(self.request, other.request))


def _same_request(a: TTSRequest, b: TTSRequest) -> bool:
    # References hold numpy codes, which == cannot compare: a voice is the same when it is the same objects.
    return (len(a.references) == len(b.references) and all(x is y for x, y in zip(a.references, b.references))
            and dataclasses.replace(a, references=()) == dataclasses.replace(b, references=()))


@dataclasses.dataclass(frozen=True)
class _Failure:
    error: BaseException


_END = object()


class Speculation:
    """A reply stream run ahead into a queue, until it is adopted (`replay`) or cancelled. The queue
    ends with `_END`, after a `_Failure` if the stream raised (reply_stream.spoken_reply's layout)."""

    def __init__(self, plan: ReplyPlan, items: AsyncIterator[object],
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task]) -> None:
        self.plan = plan
        self.t_started = time.monotonic()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.made = 0  # items produced so far (text deltas, audio chunks, ...)
        self._task = spawn(self._fill(items))

    async def _fill(self, items: AsyncIterator[object]) -> None:
        try:
            async with contextlib.aclosing(items) as stream:  # type: ignore[type-var]
                async for item in stream:
                    self._queue.put_nowait(item)
                    self.made += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - kept for the response that adopts it (a ReplyError)
            self._queue.put_nowait(_Failure(exc))
        finally:
            self._queue.put_nowait(_END)

    def replay(self) -> _Replay:
        """What was made so far, stamped with the moment it is handed on (that is when the client
        can have it), then the rest as it comes. Closing it (even unread) cancels the generation."""
        return _Replay(self)

    async def _next(self) -> object:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # the end stays the end for a caller that asks again
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            raise item.error
        return _stamped(item, time.monotonic())

    def cancel(self) -> None:
        self._task.cancel()


class _Replay:
    """An async iterator over an adopted speculation whose aclose() always stops it."""

    def __init__(self, speculation: Speculation) -> None:
        self._speculation = speculation

    def __aiter__(self) -> _Replay:
        return self

    async def __anext__(self) -> object:
        return await self._speculation._next()

    async def aclose(self) -> None:
        self._speculation.cancel()


def _stamped(item: object, now: float) -> object:
    if dataclasses.is_dataclass(item) and hasattr(item, "t") and item.t < now:  # type: ignore[attr-defined]
        return dataclasses.replace(item, t=now)  # type: ignore[type-var]
    return item
