"""Responses: one at a time, LLM reply (or exact text) -> sentences -> TTS -> audio out, and
cancelling one so that the history keeps only what the user heard."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from engine.agent.conversation.events import (AudioClear, AudioOut, ConversationError, FunctionCallDone,
                                              FunctionCallStarted, ResponseAudioCleared,
                                              ResponseAudioStarted, ResponseAudioStopped, ResponseCreated,
                                              ResponseDone, ResponseKind, ResponseTextDelta, ResponseTextDone,
                                              ResponseTruncated)
from engine.agent.conversation.history import History
from engine.agent.conversation.outputs import OutputQueue
from engine.agent.conversation.playout import Response
from engine.agent.conversation.tool_calls import CallReady, CallStarted
from engine.agent.reply_stream import ReplyDone, ReplyError, SentenceAudio, SentenceSpoken, TextDelta, spoken_reply
from engine.speech.types import SpeechSynthesizer, TTSRequest

KEEP_RESPONSES = 16  # recent responses that mark_played can still refer to

TextSource = Callable[[], AsyncIterator[object]]  # called once the response's turn to generate comes
Spawn = Callable[[Coroutine[Any, Any, None]], asyncio.Task]


class Responder:
    """Runs a session's responses in order and owns their playout accounting."""

    def __init__(self, *, tts: SpeechSynthesizer | None, outputs: OutputQueue, history: History, spawn: Spawn,
                 new_id: Callable[[str], str]) -> None:
        self._tts = tts
        self._outputs = outputs
        self._history = history
        self._spawn = spawn
        self._new_id = new_id
        self._lock = asyncio.Lock()  # one response generates at a time
        self._responses: OrderedDict[str, Response] = OrderedDict()
        self._playout_end = 0.0  # when the transport's queue runs dry, by the real-time estimate
        self.current: Response | None = None

    # ------------------------------------------------------------------ starting
    def start(self, kind: ResponseKind, source: TextSource, request: TTSRequest, *, speak: bool = True,
              tools: bool = False, t_speech_stopped: float | None = None, t_transcript: float | None = None,
              prepared: AsyncIterator[object] | None = None) -> str:
        """Queue a response; `speak=False` makes a text-only one (no TTS); `tools`: it may call tools.
        `prepared`: the reply items already being made (an adopted speculation), instead of
        running `source` through the TTS here."""
        resp = Response(id=self._new_id("resp"), kind=kind, item_id=self._new_id("item"),
                        t_created=time.monotonic(), t_speech_stopped=t_speech_stopped, t_transcript=t_transcript,
                        speak=speak and self._tts is not None, tools=tools)
        self._responses[resp.id] = resp
        while len(self._responses) > KEEP_RESPONSES:
            self._responses.popitem(last=False)
        resp.task = self._spawn(self._run(resp, source, request, prepared))
        return resp.id

    async def _run(self, resp: Response, source: TextSource, request: TTSRequest,
                   prepared: AsyncIterator[object] | None = None) -> None:
        try:
            await self._generate(resp, source, request, prepared)
        finally:
            if prepared is not None:  # cancelled before its turn came: stop what is being made for it
                await prepared.aclose()  # type: ignore[attr-defined]
        if resp.playout:
            self._spawn(self._watch_playout(resp))

    async def _generate(self, resp: Response, source: TextSource, request: TTSRequest,
                        prepared: AsyncIterator[object] | None) -> None:
        async with self._lock:
            self.current = resp
            self._outputs.emit(ResponseCreated(response_id=resp.id, item_id=resp.item_id, kind=resp.kind,
                                               audio=resp.speak, tools=resp.tools))
            try:
                items = prepared if prepared is not None else spoken_reply(
                    source(), self._tts if resp.speak else None, request)
                async with contextlib.aclosing(items) as stream:  # type: ignore[type-var]
                    async for item in stream:
                        self._on_reply_item(resp, item)
            except ReplyError as exc:
                resp.status = "failed"
                # What will still play out (or, without a voice, the text already shown).
                heard = resp.complete_text() if resp.speak else resp.text.strip()
                self._history.record_reply(resp, heard)
                self._record_calls(resp)
                error = ConversationError(type="server_error", code=exc.code, message=str(exc),
                                          response_id=resp.id)
                self._outputs.emit(error)
                self._emit_done(resp, heard, error=error)
            else:
                resp.status = "completed"
                self._history.record_reply(resp, resp.text)
                self._record_calls(resp)
                self._outputs.emit(ResponseTextDone(response_id=resp.id, item_id=resp.item_id,
                                                    transcript=resp.text))
                self._emit_done(resp, resp.text)

    def _on_reply_item(self, resp: Response, item: object) -> None:
        if isinstance(item, TextDelta):
            if resp.t_first_token is None:
                resp.t_first_token = item.t
            resp.text += item.text
            self._outputs.emit(ResponseTextDelta(response_id=resp.id, item_id=resp.item_id, delta=item.text))
        elif isinstance(item, SentenceAudio):
            seconds = len(item.chunk.pcm) / item.chunk.sample_rate
            start = max(item.t, self._playout_end)
            self._playout_end = start + seconds
            resp.add_audio(item.index, item.text, start, seconds)
            if resp.t_first_audio is None:
                resp.t_first_audio = item.t
                self._outputs.emit(ResponseAudioStarted(response_id=resp.id, latency=resp.latency()))
            self._outputs.put(AudioOut(resp.id, item.chunk.pcm, item.chunk.sample_rate))
        elif isinstance(item, SentenceSpoken):
            resp.sentence(item.index, item.text).complete = True
        elif isinstance(item, ReplyDone):
            resp.text = item.text
        elif isinstance(item, CallStarted):
            item_id = resp.call_items.setdefault(item.index, self._new_id("item"))
            self._outputs.emit(FunctionCallStarted(response_id=resp.id, item_id=item_id, call_id=item.call_id,
                                                   name=item.name))
        elif isinstance(item, CallReady):
            item_id = resp.call_items[item.index]
            resp.calls.append((item_id, item.call_id, item.name, item.arguments))
            # The call joins the history now (the client may answer before response.done), after the
            # text said before it; that text is corrected to what was heard when the response ends.
            if resp.text.strip():
                self._history.record_reply(resp, resp.text)
            self._record_calls(resp)
            self._outputs.emit(FunctionCallDone(response_id=resp.id, item_id=item_id, call_id=item.call_id,
                                                name=item.name, arguments=item.arguments, deltas=item.deltas))

    def _record_calls(self, resp: Response) -> None:
        """The response's finished calls join the history after its text (once)."""
        for item_id, call_id, name, arguments in resp.calls:
            if self._history.get(item_id) is None:
                self._history.add_call(item_id, call_id, name, arguments)

    def _emit_done(self, resp: Response, transcript: str, *, reason: str | None = None,
                   error: ConversationError | None = None) -> None:
        self._outputs.emit(ResponseDone(
            response_id=resp.id, item_id=resp.item_id, kind=resp.kind, status=resp.status, transcript=transcript,
            audio_seconds=round(resp.audio_seconds, 3), latency=resp.latency(), times=resp.times(),
            reason=reason, error=error))

    async def _watch_playout(self, resp: Response) -> None:
        """Announce the end of the response's audio once it has played out."""
        while not resp.stopped:
            remaining = resp.unplayed(time.monotonic())
            if remaining <= 1e-3:
                resp.stopped = True
                self._outputs.emit(ResponseAudioStopped(response_id=resp.id,
                                                        audio_end_ms=int(resp.audio_seconds * 1000)))
                return
            await asyncio.sleep(min(remaining, 0.25))

    # ------------------------------------------------------------------ while it runs
    @property
    def generating(self) -> bool:
        return self.current is not None and self.current.generating

    def active(self) -> bool:
        """Generating, or its audio still playing."""
        resp = self.current
        if resp is None:
            return False
        return resp.generating or (not resp.stopped and resp.unplayed(time.monotonic()) > 1e-3)

    def get(self, response_id: str) -> Response | None:
        return self._responses.get(response_id)

    def by_item(self, item_id: str) -> Response | None:
        return next((r for r in self._responses.values() if r.item_id == item_id), None)

    async def truncate(self, resp: Response, audio_end_ms: int) -> None:
        """The client says only `audio_end_ms` of this response's audio was heard."""
        self.mark_played(resp.id, audio_end_ms / 1000.0)
        if resp is self.current and self.active():
            await self.cancel("client_truncated")  # stops generation and playout; keeps what was heard
            return
        heard = resp.spoken_text(audio_end_ms / 1000.0) if resp.speak else resp.text.strip()
        self._history.record_reply(resp, heard)
        self._outputs.emit(ResponseTruncated(response_id=resp.id, item_id=resp.item_id, audio_end_ms=audio_end_ms,
                                             transcript=heard))

    def mark_played(self, response_id: str, seconds: float) -> None:
        resp = self._responses.get(response_id)
        if resp is not None and seconds >= 0:
            resp.report = (time.monotonic(), float(seconds))

    async def cancel(self, reason: str) -> None:
        """Stop LLM and TTS now; clear queued audio; keep only the heard text in the history."""
        resp = self.current
        if resp is None or resp.stopped and not resp.generating:
            return
        generating = resp.generating
        if generating:
            resp.task.cancel()  # type: ignore[union-attr]
            await asyncio.gather(resp.task, return_exceptions=True)  # type: ignore[arg-type]
        now = time.monotonic()
        played = resp.played(now)
        unplayed = resp.audio_seconds - played > 1e-3
        if unplayed or generating:
            self._outputs.put(AudioClear(resp.id))
        self._playout_end = now
        audio_end_ms = int(played * 1000)
        if not resp.stopped and resp.playout:
            resp.stopped = True
            self._outputs.emit(ResponseAudioCleared(response_id=resp.id, audio_end_ms=audio_end_ms))
        resp.stopped = True
        # Without a voice, the text itself is what the user got.
        heard = resp.spoken_text(played) if resp.speak else resp.text.strip()
        if generating:
            resp.status = "cancelled"
            self._history.record_reply(resp, heard)
            self._record_calls(resp)  # calls announced done stay: the client may be running them
            self._outputs.emit(ResponseTextDone(response_id=resp.id, item_id=resp.item_id, transcript=heard))
            self._emit_done(resp, heard, reason=reason)
        elif unplayed and resp.in_history:
            self._history.record_reply(resp, heard)
            self._outputs.emit(ResponseTruncated(response_id=resp.id, item_id=resp.item_id,
                                                 audio_end_ms=audio_end_ms, transcript=heard))


def tts_request(template: TTSRequest, **changes: Any) -> TTSRequest:
    return dataclasses.replace(template, text="", **changes)
