"""User turns: audio in -> VAD (or manual commits) -> a turn's audio -> its transcript, in spoken order."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np

from engine.agent.conversation.events import (INPUT_SAMPLE_RATE, TurnDetection, UserAudioCommitted,
                                              UserSpeechStarted, UserSpeechStopped, UserTranscript,
                                              UserTranscriptDelta)
from engine.agent.conversation.outputs import OutputQueue
from engine.agent.conversation.playout import ms
from engine.agent.incremental_asr import IncrementalTranscriber
from engine.agent.smart_turn import FIRST_CHECK_MS, SemanticEndOfTurn, SemanticTurnDetection
from engine.agent.vad import MAX_TURN_SECONDS, SpeechStarted, SpeechStopped, TurnDetector, as_pcm16k

if TYPE_CHECKING:
    from engine.agent.asr import Transcriber
    from engine.agent.smart_turn import SmartTurn
    from engine.agent.vad import SileroVAD

log = logging.getLogger(__name__)


class TurnInput:
    """Detects and transcribes the user's turns; the session decides what a turn leads to.

    `on_speech_started(item_id)` runs at the start of speech (barge-in is decided there) and
    `on_transcript(event, t_speech_stopped, respond)` once a turn is transcribed.
    `on_likely_transcript(text)` runs while a turn is still open, when a pass over all its speech so
    far has landed in a pause (what the turn's transcript will be if it ends there), and
    `on_transcript_void()` when that no longer holds because the user spoke on or the turn was dropped.
    """

    def __init__(self, *, asr: "Transcriber", vad_model: "SileroVAD", outputs: OutputQueue,
                 spawn: Callable, new_id: Callable[[str], str],
                 on_speech_started: Callable[[str], Awaitable[None]],
                 on_transcript: Callable[[UserTranscript, float, bool], None],
                 smart_turn: "SmartTurn | None" = None,
                 on_likely_transcript: Callable[[str], None] | None = None,
                 on_transcript_void: Callable[[], None] | None = None) -> None:
        self._asr = asr
        self._vad_model = vad_model
        self._smart_turn = smart_turn
        self._outputs = outputs
        self._spawn = spawn
        self._new_id = new_id
        self._on_speech_started = on_speech_started
        self._on_transcript = on_transcript
        self._on_likely_transcript = on_likely_transcript
        self._on_transcript_void = on_transcript_void
        self._likely_end_ms: int | None = None  # where the speech ended for the likely transcript
        self.turn_detection: TurnDetection | SemanticTurnDetection | None = None
        self._detector: TurnDetector | None = None
        self._end_of_turn: SemanticEndOfTurn | None = None  # semantic_vad: Smart Turn over the same detector
        self._manual_buffer: list[np.ndarray] = []
        self._asr_lock = asyncio.Lock()  # turns are transcribed, and answered, in spoken order
        self._turn_item: str | None = None
        self._live: IncrementalTranscriber | None = None  # the open turn's transcript, while it is spoken

    def check(self, turn_detection: TurnDetection | SemanticTurnDetection | None) -> None:
        if isinstance(turn_detection, SemanticTurnDetection) and self._smart_turn is None:
            raise ValueError("semantic_vad needs the Smart Turn model, which is not loaded")

    def configure(self, turn_detection: TurnDetection | SemanticTurnDetection | None) -> None:
        """None switches to manual turns (audio is buffered; commit ends a turn); semantic_vad puts
        Smart Turn over the same silero detector, so a turn in progress survives a switch."""
        self.check(turn_detection)
        semantic = isinstance(turn_detection, SemanticTurnDetection)
        self.turn_detection = turn_detection
        params = turn_detection.silence_params() if semantic else turn_detection
        if params is None:
            self._drop_live()
            self._detector = None
            if self._likely_end_ms is not None:
                self._void_likely()  # the open turn is dropped with the detector
        elif self._detector is None:
            self._detector = TurnDetector(self._vad_model, params)
        else:
            self._detector.configure(params)
        self._end_of_turn = None
        if semantic:
            self._end_of_turn = SemanticEndOfTurn(self._detector, self._smart_turn, turn_detection)  # type: ignore

    @property
    def user_speaking(self) -> bool:
        return self._detector is not None and self._detector.in_speech

    async def push(self, pcm16k: np.ndarray) -> None:
        pcm = as_pcm16k(pcm16k)
        if self._detector is None:
            self._manual_buffer.append(pcm)
            held = sum(len(p) for p in self._manual_buffer)
            while held > MAX_TURN_SECONDS * INPUT_SAMPLE_RATE and len(self._manual_buffer) > 1:
                held -= len(self._manual_buffer.pop(0))  # bounded, like a server's input buffer
            return
        events = await self._end_of_turn.push(pcm) if self._end_of_turn else self._detector.push(pcm)
        for event in events:
            if isinstance(event, SpeechStarted):
                await self._speech_started(event)
            else:
                self._speech_stopped(event)
        if self._live is not None and self._detector.in_speech:
            self._live.update(self._detector)
        if self._likely_end_ms is not None and self._speech_end_ms() != self._likely_end_ms:
            self._void_likely()  # the user spoke on (a turn that ended has handed it to on_transcript)

    def _speech_end_ms(self) -> int | None:
        """Where the open turn's speech so far ends, in turn time (None between turns)."""
        detector = self._detector
        return detector.turn_ms - detector.pause_ms if detector is not None and detector.in_speech else None

    def _pause_pass(self, item_id: str, text: str, speech_end_ms: int) -> None:
        if self._turn_item != item_id or self._speech_end_ms() != speech_end_ms or not text.strip():
            return  # the turn ended, or words came after the pass's audio
        self._likely_end_ms = speech_end_ms
        if self._on_likely_transcript is not None:
            self._on_likely_transcript(text)

    def _void_likely(self) -> None:
        self._likely_end_ms = None
        if self._on_transcript_void is not None:
            self._on_transcript_void()

    async def commit(self) -> None:
        if self._detector is not None:
            event = self._detector.flush()
            if event is not None:
                self._speech_stopped(event)
            return
        pcm = np.concatenate(self._manual_buffer) if self._manual_buffer else np.zeros(0, np.float32)
        self._manual_buffer = []
        if len(pcm) == 0:
            self._outputs.error("invalid_request_error", "input_audio_buffer_commit_empty", "no audio to commit")
            return
        item_id = self._new_id("item")
        self._outputs.emit(UserAudioCommitted(item_id=item_id))
        self._spawn(self._transcribe(pcm, item_id, time.monotonic(), respond=False))

    def clear(self) -> None:
        self._manual_buffer = []
        self._drop_live()
        if self._detector is not None:
            self._detector.reset()
        if self._likely_end_ms is not None:
            self._void_likely()

    async def _speech_started(self, event: SpeechStarted) -> None:
        self._turn_item = item_id = self._new_id("item")
        self._drop_live()
        # How long the turn's end waits after speech: a pass that takes longer would delay the final.
        detection = self.turn_detection
        if isinstance(detection, SemanticTurnDetection):
            budget = 2 * FIRST_CHECK_MS  # Smart Turn decides at the first short pause
        else:
            budget = detection.silence_duration_ms if detection is not None else 500
        self._live = IncrementalTranscriber(
            self._asr, budget_ms=budget,
            on_delta=lambda delta: self._outputs.emit(UserTranscriptDelta(item_id=item_id, delta=delta)),
            on_pause_pass=lambda text, end_ms: self._pause_pass(item_id, text, end_ms))
        self._outputs.emit(UserSpeechStarted(item_id=self._turn_item, audio_start_ms=event.audio_start_ms))
        await self._on_speech_started(self._turn_item)

    def _speech_stopped(self, event: SpeechStopped) -> None:
        item_id = self._turn_item or self._new_id("item")
        self._turn_item = None
        self._likely_end_ms = None  # the turn's transcript now decides (on_transcript)
        t_stopped = time.monotonic()
        self._outputs.emit(UserSpeechStopped(item_id=item_id, audio_end_ms=event.audio_end_ms))
        respond = self.turn_detection is not None and self.turn_detection.create_response
        live, self._live = self._live, None
        speech_end_ms = event.audio_end_ms - event.audio_start_ms
        self._spawn(self._transcribe(event.audio, item_id, t_stopped, respond=respond, live=live,
                                     speech_end_ms=speech_end_ms))

    def _drop_live(self) -> None:
        if self._live is not None:
            self._live.cancel()
            self._live = None

    async def _transcribe(self, pcm: np.ndarray, item_id: str, t_stopped: float, *, respond: bool,
                          live: IncrementalTranscriber | None = None, speech_end_ms: int = 0) -> None:
        async with self._asr_lock:
            try:
                if live is not None:  # it sends the transcript's last delta itself
                    transcript = await live.finish(pcm, speech_end_ms)
                else:
                    transcript = await self._asr.transcribe(pcm, turn=True)
                    if transcript:
                        self._outputs.emit(UserTranscriptDelta(item_id=item_id, delta=transcript))
            except Exception as exc:  # noqa: BLE001 - the session survives a failed turn
                log.exception("transcription failed")
                self._outputs.error("server_error", "transcription_failed", f"transcription failed: {exc}",
                                    item_id=item_id)
                return
            t_transcript = time.monotonic()
            event = UserTranscript(item_id=item_id, transcript=transcript, latency_ms=ms(t_transcript - t_stopped),
                                   t=t_transcript)
            self._outputs.emit(event)
            self._on_transcript(event, t_stopped, respond)
