"""The transport-free conversation pipeline (agent mode and realtime TTS mode).

Speech in -> VAD turn -> ASR transcript -> LLM reply streamed -> sentences -> TTS per sentence
-> audio out, each stage starting as soon as its input exists. A transport (WebRTC, WebSocket,
the job API) feeds `push_audio` / `send_text` / `speak` and forwards what `outputs()` yields:
`PipelineEvent`s named after the OpenAI Realtime events, `AudioOut` pieces and `AudioClear`.

Barge-in: when the user starts speaking while a response is generating or its audio is still
playing, generation stops, queued audio is cleared, and the history keeps only what was heard.
How much was heard comes from `mark_played` reports, or else from a real-time playout estimate.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from engine.agent.conversation_types import INPUT_SAMPLE_RATE, AudioClear, AudioOut, PipelineEvent, TurnDetection
from engine.agent.llm.base import ChatOptions, build_messages, validate_messages
from engine.agent.reply_stream import ReplyDone, ReplyError, SentenceAudio, SentenceSpoken, TextDelta, one_shot, spoken_reply
from engine.speech.types import Reference, SamplingOptions, SpeechSynthesizer, TTSRequest
from engine.agent.vad import MAX_TURN_SECONDS, SpeechStarted, SpeechStopped, TurnDetector, as_pcm16k

if TYPE_CHECKING:
    from engine.agent.asr import Transcriber
    from engine.agent.llm.base import ChatLLM
    from engine.agent.vad import SileroVAD

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTIONS = (
    "You are a friendly voice assistant. Answer in one or two short spoken sentences, "
    "without lists, markdown or emoji."
)
Output = PipelineEvent | AudioOut | AudioClear
_CLOSED = object()
_DEFAULT_CHARS_PER_SECOND = 14.0  # speaking rate assumed before a sentence's audio is complete
_KEEP_RESPONSES = 16  # recent responses that mark_played can still refer to


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


@dataclasses.dataclass
class _Sentence:
    text: str
    seconds: float = 0.0  # audio produced so far
    complete: bool = False


@dataclasses.dataclass
class _Response:
    """One response's text, audio schedule and timings."""

    id: str
    kind: Literal["agent", "tts"]
    item_id: str
    t_created: float
    turn: dict[str, float]  # t_speech_stopped / t_transcript when a voice turn caused it
    task: asyncio.Task | None = None
    text: str = ""
    sentences: list[_Sentence] = dataclasses.field(default_factory=list)
    playout: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (start, seconds) per chunk
    report: tuple[float, float] | None = None  # (monotonic time, seconds played) from mark_played
    history_item: dict | None = None
    t_first_token: float | None = None
    t_first_audio: float | None = None
    status: str = "in_progress"
    stopped: bool = False  # output_audio_buffer.stopped/cleared already sent

    @property
    def audio_seconds(self) -> float:
        return sum(seconds for _, seconds in self.playout)

    def played(self, now: float) -> float:
        """Seconds of audio heard by `now`: real-time playout from emission, capped by reports."""
        estimate = sum(min(max(now - start, 0.0), seconds) for start, seconds in self.playout)
        if self.report is None:
            return estimate
        t_report, seconds = self.report
        return min(seconds + max(now - t_report, 0.0), estimate)

    def spoken_text(self, played: float) -> str:
        """The reply text whose audio was heard; a partly heard sentence keeps that share of words."""
        done = [s for s in self.sentences if s.complete and s.seconds > 0]
        rate = (sum(len(s.text) for s in done) / sum(s.seconds for s in done)) if done else _DEFAULT_CHARS_PER_SECOND
        kept: list[str] = []
        remaining = played
        for sentence in self.sentences:
            if remaining <= 0:
                break
            total = sentence.seconds if sentence.complete else max(sentence.seconds, len(sentence.text) / rate)
            if total <= 0:
                continue
            if remaining >= total - 1e-6:
                kept.append(sentence.text)
            else:
                words = sentence.text.split()
                share = int(len(words) * remaining / total)
                if share:
                    kept.append(" ".join(words[:share]))
            remaining -= total
        return " ".join(kept)


class _OutputStream:
    """Reads the session's output queue; a plain iterator, so `break` does not close anything."""

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


class ConversationSession:
    """One conversation: its history, turn detector and the response being spoken.

    All methods are called from one asyncio loop. Model work (ASR, LLM, TTS) runs off the loop
    inside the model wrappers; VAD (~0.1 ms per 32 ms frame) runs inline in `push_audio`.
    """

    def __init__(
        self,
        *,
        tts: SpeechSynthesizer | None,
        asr: "Transcriber",
        llm: "ChatLLM | None",
        vad_model: "SileroVAD",
        mode: Literal["agent", "tts"] = "agent",
        voice: tuple[Reference, ...] = (),
        instructions: str = DEFAULT_INSTRUCTIONS,
        turn_detection: TurnDetection | None = TurnDetection(),
        sampling: SamplingOptions = SamplingOptions(),
        history: list[dict] | None = None,
        chat: ChatOptions = ChatOptions(),
        speech: TTSRequest = TTSRequest(text=""),
    ) -> None:
        """`chat` sets the LLM's reply length/temperature; `speech` is the TTS request template
        (chunk_length, normalize, ...): its text, voice and sampling are filled in per sentence."""
        self._tts = tts
        self._asr = asr
        self._llm = llm
        self._vad_model = vad_model
        self._history: list[dict] = [dict(m) for m in (history or [])]
        validate_messages(self._history, allow_empty=True)  # bad history fails here, not at the first reply
        self.mode: Literal["agent", "tts"] = "agent"
        self.voice: tuple[Reference, ...] = ()
        self.instructions = instructions
        self.sampling = sampling
        self.chat = chat
        self.speech = speech
        self.turn_detection: TurnDetection | None = None
        self._detector: TurnDetector | None = None
        self._manual_buffer: list[np.ndarray] = []
        self._outputs: asyncio.Queue[object] = asyncio.Queue()
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self._asr_lock = asyncio.Lock()  # turns are transcribed, and answered, in spoken order
        self._response_lock = asyncio.Lock()  # one response generates at a time
        self._current: _Response | None = None
        self._responses: OrderedDict[str, _Response] = OrderedDict()
        self._playout_end = 0.0  # when the transport's queue runs dry, by the real-time estimate
        self._ids = itertools.count(1)
        self._turn_item: str | None = None
        self._t_speech_started: float | None = None
        self.update(mode=mode, voice=voice, turn_detection=turn_detection)

    # ------------------------------------------------------------------ configuration
    def update(self, *, mode: Literal["agent", "tts"] | None = None, voice: tuple[Reference, ...] | None = None,
               instructions: str | None = None, turn_detection: TurnDetection | None | Literal["keep"] = "keep",
               sampling: SamplingOptions | None = None, chat: ChatOptions | None = None) -> None:
        """Change session settings (session.update). `turn_detection=None` switches to manual turns
        (push_audio buffers; commit_audio ends a turn); leave it out to keep the current setting."""
        if mode is not None:
            if mode not in ("agent", "tts"):
                raise ValueError(f"mode must be 'agent' or 'tts', got {mode!r}")
            if mode == "agent" and self._llm is None:
                raise ValueError("agent mode needs an agent LLM (none is configured)")
            self.mode = mode
        if voice is not None:
            if not all(isinstance(r, Reference) for r in voice):
                raise ValueError("voice must be a tuple of Reference")
            self.voice = tuple(voice)
        if instructions is not None:
            self.instructions = instructions
        if sampling is not None:
            self.sampling = sampling
        if chat is not None:
            self.chat = chat
        if turn_detection != "keep":
            self.turn_detection = turn_detection  # type: ignore[assignment]
            if turn_detection is None:
                self._detector = None
            elif self._detector is None:
                self._detector = TurnDetector(self._vad_model, turn_detection)  # type: ignore[arg-type]
            else:
                self._detector.configure(turn_detection)  # type: ignore[arg-type]

    @property
    def history(self) -> list[dict]:
        return [dict(m) for m in self._history]

    # ------------------------------------------------------------------ input
    async def push_audio(self, pcm16k: np.ndarray) -> None:
        """Float32 mono 16 kHz, any length. Runs VAD; may emit turns and barge-in."""
        self._check_open()
        pcm = as_pcm16k(pcm16k)
        if self._detector is None:
            self._manual_buffer.append(pcm)
            held = sum(len(p) for p in self._manual_buffer)
            while held > MAX_TURN_SECONDS * INPUT_SAMPLE_RATE and len(self._manual_buffer) > 1:
                held -= len(self._manual_buffer.pop(0))  # bounded, like a server's input buffer
            return
        for event in self._detector.push(pcm):
            if isinstance(event, SpeechStarted):
                await self._on_speech_started(event)
            else:
                self._on_speech_stopped(event)

    async def commit_audio(self) -> None:
        """Manual turns: treat the buffered audio (or a turn in progress) as one user turn."""
        self._check_open()
        if self._detector is not None:
            event = self._detector.flush()
            if event is not None:
                self._on_speech_stopped(event)
            return
        pcm = np.concatenate(self._manual_buffer) if self._manual_buffer else np.zeros(0, np.float32)
        self._manual_buffer = []
        if len(pcm) == 0:
            self._error("invalid_request_error", "input_audio_buffer_commit_empty", "no audio to commit")
            return
        item_id = self._new_id("item")
        self._emit("input_audio_buffer.committed", {"item_id": item_id})
        self._spawn(self._handle_turn(pcm, item_id, {"t_speech_stopped": time.monotonic()}, respond=False))

    def clear_audio(self) -> None:
        """Drop buffered input audio and any turn in progress (input_audio_buffer.clear)."""
        self._manual_buffer = []
        if self._detector is not None:
            self._detector.reset()

    async def send_text(self, text: str, *, respond: bool = True) -> None:
        """A typed user message (conversation.item.create + optional response.create).
        In TTS mode the text is spoken as given instead."""
        self._check_open()
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        if self.mode == "tts":
            if respond:
                await self.speak(text)
            return
        self._history.append({"role": "user", "content": text.strip()})
        if respond:
            await self.create_response()

    async def create_response(self) -> None:
        """Respond to the history as it stands (agent mode; in TTS mode there is nothing to say)."""
        self._check_open()
        if self.mode != "agent" or self._llm is None:
            self._error("invalid_request_error", "no_agent", "response.create needs agent mode with an LLM")
            return
        self._start_response("agent", None, {})

    async def speak(self, text: str, *, sampling: SamplingOptions | None = None,
                    voice: tuple[Reference, ...] | None = None) -> str:
        """Say exactly `text` in the session voice (a TTS request); returns the response id.
        The speech queues behind a response in progress; it does not enter the history."""
        self._check_open()
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text must be a non-empty string")
        if self._tts is None:
            raise ValueError("no TTS engine is configured")
        return self._start_response("tts", text.strip(), {}, sampling=sampling, voice=voice)

    async def cancel_response(self, reason: str = "client_cancelled") -> None:
        """Stop LLM and TTS now; clear queued audio; keep only the heard text in the history."""
        resp = self._current
        if resp is None or resp.stopped and (resp.task is None or resp.task.done()):
            return
        generating = resp.task is not None and not resp.task.done()
        if generating:
            resp.task.cancel()
            await asyncio.gather(resp.task, return_exceptions=True)
        now = time.monotonic()
        played = resp.played(now)
        unplayed = resp.audio_seconds - played > 1e-3
        if unplayed or generating:
            self._outputs.put_nowait(AudioClear(resp.id))
        self._playout_end = now
        if not resp.stopped and resp.playout:
            resp.stopped = True
            self._emit("output_audio_buffer.cleared", {"audio_end_ms": int(played * 1000)}, resp.id)
        resp.stopped = True
        # Without a voice, the text itself is what the user got.
        heard = resp.spoken_text(played) if self._tts is not None else resp.text.strip()
        if generating:
            resp.status = "cancelled"
            self._record_reply(resp, heard)
            self._emit("response.output_audio_transcript.done", {"item_id": resp.item_id, "transcript": heard},
                       resp.id)
            self._emit("response.done", self._done_data(resp, {"type": "cancelled", "reason": reason},
                                                        transcript=heard), resp.id)
        elif unplayed and resp.history_item is not None:
            self._record_reply(resp, heard)
            self._emit("conversation.item.truncated", {"item_id": resp.item_id, "audio_end_ms": int(played * 1000),
                                                       "transcript": heard}, resp.id)

    def mark_played(self, response_id: str, seconds: float) -> None:
        """The transport reports how many seconds of a response's audio were actually played.
        Report as audio goes out (say per 20 ms frame); the latest report wins."""
        resp = self._responses.get(response_id)
        if resp is not None and seconds >= 0:
            resp.report = (time.monotonic(), float(seconds))

    # ------------------------------------------------------------------ output
    def outputs(self) -> AsyncIterator[Output]:
        """Events and audio, in order; ends after close(). One consumer at a time: leaving an
        `async for` early loses nothing, and a later outputs() call continues where it stopped."""
        return _OutputStream(self._outputs)

    async def close(self) -> None:
        """Stop every task of this session and end outputs(). Shared models stay loaded."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._outputs.put_nowait(_CLOSED)

    # ------------------------------------------------------------------ turns
    async def _on_speech_started(self, event: SpeechStarted) -> None:
        self._turn_item = self._new_id("item")
        self._t_speech_started = time.monotonic()
        self._emit("input_audio_buffer.speech_started",
                   {"audio_start_ms": event.audio_start_ms, "item_id": self._turn_item})
        if self.turn_detection is not None and self.turn_detection.interrupt_response and self._response_active():
            await self.cancel_response(reason="turn_detected")

    def _on_speech_stopped(self, event: SpeechStopped) -> None:
        item_id = self._turn_item or self._new_id("item")
        self._turn_item = None
        t_stopped = time.monotonic()
        self._emit("input_audio_buffer.speech_stopped", {"audio_end_ms": event.audio_end_ms, "item_id": item_id})
        respond = self.turn_detection is not None and self.turn_detection.create_response
        self._spawn(self._handle_turn(event.audio, item_id, {"t_speech_stopped": t_stopped}, respond=respond))

    async def _handle_turn(self, pcm: np.ndarray, item_id: str, turn: dict[str, float], *, respond: bool) -> None:
        async with self._asr_lock:
            try:
                transcript = await self._asr.transcribe(pcm)
            except Exception as exc:  # noqa: BLE001 - the session survives a failed turn
                log.exception("transcription failed")
                self._error("server_error", "transcription_failed", f"transcription failed: {exc}", item_id=item_id)
                return
            turn["t_transcript"] = time.monotonic()
            self._emit("conversation.item.input_audio_transcription.completed",
                       {"item_id": item_id, "transcript": transcript,
                        "latency_ms": {"transcript": _ms(turn["t_transcript"] - turn["t_speech_stopped"])}})
            if not transcript.strip():
                return  # a cough or noise: nothing to answer
            if self.mode == "agent":
                self._history.append({"role": "user", "content": transcript})
                # If the user has already started another turn, answering now would talk over
                # them: that turn's response will answer both.
                talking_again = (self._detector is not None and self._detector.in_speech
                                 and self.turn_detection is not None and self.turn_detection.interrupt_response)
                if respond and self._llm is not None and not talking_again:
                    self._start_response("agent", None, turn)

    # ------------------------------------------------------------------ responses
    def _start_response(self, kind: Literal["agent", "tts"], text: str | None, turn: dict[str, float], *,
                        sampling: SamplingOptions | None = None, voice: tuple[Reference, ...] | None = None) -> str:
        resp = _Response(id=self._new_id("resp"), kind=kind, item_id=self._new_id("item"),
                         t_created=time.monotonic(), turn=turn)
        self._responses[resp.id] = resp
        while len(self._responses) > _KEEP_RESPONSES:
            self._responses.popitem(last=False)
        request = dataclasses.replace(self.speech, text="", references=self.voice if voice is None else tuple(voice),
                                      sampling=sampling or self.sampling)
        resp.task = self._spawn(self._run_response(resp, text, request))
        return resp.id

    async def _run_response(self, resp: _Response, text: str | None, request: TTSRequest) -> None:
        async with self._response_lock:
            self._current = resp
            self._emit("response.created", {"response": {"id": resp.id, "kind": resp.kind, "status": "in_progress"},
                                            "item_id": resp.item_id}, resp.id)
            if text is None:
                messages = build_messages(self.instructions, self._history, self.chat.history_window)
                source = self._llm.stream_chat(messages, max_tokens=self.chat.max_tokens,  # type: ignore[union-attr]
                                               temperature=self.chat.temperature)
            else:
                source = one_shot(text)
            try:
                async for item in spoken_reply(source, self._tts, request):
                    self._on_reply_item(resp, item)
            except ReplyError as exc:
                resp.status = "failed"
                # What will still play out (or, without a voice, the text already shown).
                heard = (" ".join(s.text for s in resp.sentences if s.complete) if self._tts is not None
                         else resp.text.strip())
                self._record_reply(resp, heard)
                self._error("server_error", f"{exc.stage}_failed", str(exc), response_id=resp.id)
                self._emit("response.done", self._done_data(resp, {"type": "failed", "error": {
                    "type": "server_error", "code": f"{exc.stage}_failed", "message": str(exc)}}, transcript=heard),
                    resp.id)
            else:
                resp.status = "completed"
                self._record_reply(resp, resp.text)
                self._emit("response.output_audio_transcript.done",
                           {"item_id": resp.item_id, "transcript": resp.text}, resp.id)
                self._emit("response.done", self._done_data(resp, None, transcript=resp.text), resp.id)
        if resp.playout:
            self._spawn(self._watch_playout(resp))

    def _on_reply_item(self, resp: _Response, item: object) -> None:
        if isinstance(item, TextDelta):
            if resp.t_first_token is None:
                resp.t_first_token = item.t
            resp.text += item.text
            self._emit("response.output_audio_transcript.delta", {"item_id": resp.item_id, "delta": item.text},
                       resp.id)
        elif isinstance(item, SentenceAudio):
            while len(resp.sentences) <= item.index:
                resp.sentences.append(_Sentence(item.text))
            seconds = len(item.chunk.pcm) / item.chunk.sample_rate
            resp.sentences[item.index].seconds += seconds
            start = max(item.t, self._playout_end)
            self._playout_end = start + seconds
            resp.playout.append((start, seconds))
            if resp.t_first_audio is None:
                resp.t_first_audio = item.t
                self._emit("output_audio_buffer.started", {"latency_ms": self._latency(resp)}, resp.id)
            self._outputs.put_nowait(AudioOut(resp.id, item.chunk.pcm, item.chunk.sample_rate))
        elif isinstance(item, SentenceSpoken):
            while len(resp.sentences) <= item.index:
                resp.sentences.append(_Sentence(item.text))
            resp.sentences[item.index].complete = True
        elif isinstance(item, ReplyDone):
            resp.text = item.text

    async def _watch_playout(self, resp: _Response) -> None:
        """Emit output_audio_buffer.stopped once the response's audio has played out."""
        while not resp.stopped:
            remaining = resp.audio_seconds - resp.played(time.monotonic())
            if remaining <= 1e-3:
                resp.stopped = True
                self._emit("output_audio_buffer.stopped", {"audio_end_ms": int(resp.audio_seconds * 1000)}, resp.id)
                return
            await asyncio.sleep(min(remaining, 0.25))

    def _response_active(self) -> bool:
        resp = self._current
        if resp is None:
            return False
        if resp.task is not None and not resp.task.done():
            return True
        return not resp.stopped and resp.audio_seconds - resp.played(time.monotonic()) > 1e-3

    def _record_reply(self, resp: _Response, text: str) -> None:
        """Put the heard reply in the history (agent replies only; TTS requests are not turns)."""
        if resp.kind != "agent":
            return
        text = text.strip()
        if resp.history_item is None:
            if text:
                resp.history_item = {"role": "assistant", "content": text}
                self._history.append(resp.history_item)
        elif text:
            resp.history_item["content"] = text
        else:
            self._history = [m for m in self._history if m is not resp.history_item]
            resp.history_item = None

    def _latency(self, resp: _Response) -> dict[str, float]:
        """Milliseconds from the end of the user's turn (VAD stop) or from response creation."""
        base = resp.turn.get("t_speech_stopped", resp.t_created)
        points = {"transcript": resp.turn.get("t_transcript"), "first_token": resp.t_first_token,
                  "first_audio": resp.t_first_audio}
        return {name: _ms(t - base) for name, t in points.items() if t is not None}

    def _done_data(self, resp: _Response, details: dict | None, *, transcript: str) -> dict[str, Any]:
        times = {"t_created": resp.t_created, **resp.turn, "t_first_token": resp.t_first_token,
                 "t_first_audio": resp.t_first_audio}
        return {"response": {"id": resp.id, "kind": resp.kind, "status": resp.status, "status_details": details},
                "item_id": resp.item_id, "transcript": transcript, "audio_seconds": round(resp.audio_seconds, 3),
                "latency_ms": self._latency(resp), "t": {k: v for k, v in times.items() if v is not None}}

    # ------------------------------------------------------------------ plumbing
    def _emit(self, type_: str, data: dict[str, Any], response_id: str | None = None) -> None:
        if not self._closed:
            self._outputs.put_nowait(PipelineEvent(type_, data, response_id))

    def _error(self, type_: str, code: str, message: str, **extra: Any) -> None:
        response_id = extra.pop("response_id", None)
        self._emit("error", {"error": {"type": type_, "code": code, "message": message, **extra}}, response_id)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("conversation task failed", exc_info=task.exception())
            self._error("server_error", "internal_error", f"internal error: {task.exception()}")

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids)}"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the conversation session is closed")
