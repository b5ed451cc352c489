"""Streamed text -> sentences -> TTS per sentence, with both stages running at once.

Shared by the realtime session (engine.agent.conversation) and the job API helper (engine.agent.job_turn):
while the LLM is still writing, the first finished sentence is already being synthesised, and
text deltas and audio come back interleaved in the order they were produced.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Literal

from engine.text.sentences import SentenceSplitter, speakable
from engine.speech.types import AudioChunk, SpeechSynthesizer, TTSRequest


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str
    t: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(frozen=True)
class SentenceAudio:
    index: int  # sentence number within the reply
    text: str  # the sentence as written (history keeps this form)
    chunk: AudioChunk
    t: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass(frozen=True)
class SentenceSpoken:
    """All audio of one sentence has been produced."""

    index: int
    text: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class ReplyDone:
    text: str  # the whole reply text


ReplyItem = TextDelta | SentenceAudio | SentenceSpoken | ReplyDone  # plus the source's non-text items


class ReplyError(RuntimeError):
    """A stage of the reply failed. `stage` says which, for a precise error event."""

    def __init__(self, stage: Literal["llm", "tts"], message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.code = code or f"{stage}_failed"


@dataclasses.dataclass(frozen=True)
class _Failure:
    error: BaseException


_END = object()


async def one_shot(text: str) -> AsyncIterator[str]:
    """A fixed text as a one-delta stream (TTS requests reuse the reply path)."""
    yield text


async def spoken_reply(text_stream: AsyncIterator[object], tts: SpeechSynthesizer | None,
                       speech: TTSRequest, *, max_sentence_chars: int = 250) -> AsyncIterator[ReplyItem]:
    """Interleaved TextDelta / SentenceAudio / SentenceSpoken items, then one ReplyDone.
    Items of `text_stream` that are not text (tool calls) are passed through in their place.

    `speech` is the TTS request template (voice, sampling, ...); its text is replaced per
    sentence. Without `tts`, only text items come back. Closing this iterator stops both the
    text source and the synthesis at once. Failures raise ReplyError.
    """
    out: asyncio.Queue[object] = asyncio.Queue()
    sentences: asyncio.Queue[object] = asyncio.Queue()
    parts: list[str] = []

    async def write() -> None:
        splitter = SentenceSplitter(max_chars=max_sentence_chars)
        try:
            async with contextlib.aclosing(text_stream) as deltas:  # type: ignore[type-var]
                async for delta in deltas:
                    if not isinstance(delta, str):  # a tool call (or other typed item): passed on in order
                        out.put_nowait(delta)
                        continue
                    parts.append(delta)
                    out.put_nowait(TextDelta(delta))
                    for sentence in splitter.feed(delta):
                        sentences.put_nowait(sentence)
            for sentence in splitter.flush():
                sentences.put_nowait(sentence)
        except asyncio.CancelledError:
            raise
        except ReplyError as exc:
            out.put_nowait(_Failure(exc))
        except Exception as exc:  # noqa: BLE001 - LLMError and anything a backend raises
            out.put_nowait(_Failure(ReplyError("llm", str(exc) or type(exc).__name__)))
        finally:
            sentences.put_nowait(_END)

    async def say() -> None:
        index = 0
        while (sentence := await sentences.get()) is not _END:
            text = speakable(sentence)  # type: ignore[arg-type]
            if tts is None or not any(ch.isalnum() for ch in text):
                continue  # nothing a voice could say ("...", a lone emoji)
            seconds = 0.0
            try:
                request = dataclasses.replace(speech, text=text)
                async with contextlib.aclosing(tts.stream(request)) as chunks:  # type: ignore[type-var]
                    async for chunk in chunks:
                        seconds += len(chunk.pcm) / chunk.sample_rate
                        out.put_nowait(SentenceAudio(index, sentence, chunk))  # type: ignore[arg-type]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any synthesis failure ends the reply
                out.put_nowait(_Failure(ReplyError("tts", f"speech synthesis failed: {exc}")))
                return
            out.put_nowait(SentenceSpoken(index, sentence, seconds))  # type: ignore[arg-type]
            index += 1
        out.put_nowait(_END)

    tasks = [asyncio.create_task(write(), name="reply-text"), asyncio.create_task(say(), name="reply-speech")]
    try:
        while (item := await out.get()) is not _END:
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
        yield ReplyDone("".join(parts).strip())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
