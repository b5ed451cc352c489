"""The transport-free conversation pipeline (agent mode and realtime TTS mode).

Speech in -> VAD turn -> ASR transcript -> LLM reply streamed -> sentences -> TTS per sentence
-> audio out, each stage starting as soon as its input exists. A transport (WebRTC, WebSocket,
the job API) feeds `push_audio` / `send_text` / `speak` and forwards what `outputs()` yields.

SKELETON: public API fixed; bodies are being filled in.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal

import numpy as np

from engine.conversation_types import AudioClear, AudioOut, PipelineEvent, TurnDetection
from engine.tts_types import Reference, SamplingOptions, SpeechSynthesizer

if TYPE_CHECKING:
    from engine.asr import Transcriber
    from engine.llm.base import ChatLLM
    from engine.vad import SileroVAD

DEFAULT_INSTRUCTIONS = (
    "You are a friendly voice assistant. Answer in one or two short spoken sentences, "
    "without lists, markdown or emoji."
)


class ConversationSession:
    """One conversation: its history, turn detector and the response being spoken."""

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
    ) -> None:
        raise NotImplementedError

    def update(self, *, mode=None, voice=None, instructions=None, turn_detection=None, sampling=None) -> None:
        raise NotImplementedError

    async def push_audio(self, pcm16k: np.ndarray) -> None:
        """Float32 mono 16 kHz, any length. Runs VAD; may emit turns and barge-in."""
        raise NotImplementedError

    async def send_text(self, text: str, *, respond: bool = True) -> None:
        """A typed user message (conversation.item.create + optional response.create)."""
        raise NotImplementedError

    async def create_response(self) -> None:
        """Respond to the history as it stands."""
        raise NotImplementedError

    async def speak(self, text: str, *, sampling: SamplingOptions | None = None, voice=None) -> str:
        """Say exactly `text` (a TTS request); returns the response id."""
        raise NotImplementedError

    async def cancel_response(self) -> None:
        """Stop LLM and TTS now; emits AudioClear and the cancel events."""
        raise NotImplementedError

    def mark_played(self, response_id: str, seconds: float) -> None:
        """The transport reports how many seconds of a response's audio were actually played."""
        raise NotImplementedError

    def outputs(self) -> AsyncIterator[PipelineEvent | AudioOut | AudioClear]:
        """Events and audio, in order. Single consumer; ends after close()."""
        raise NotImplementedError

    @property
    def history(self) -> list[dict]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
