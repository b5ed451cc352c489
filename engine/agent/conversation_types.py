"""Transport-free contract of the conversation pipeline (agent mode and realtime TTS).

A transport (WebRTC, WebSocket, the job API) feeds a session 16 kHz mono float32 PCM and
client requests, and forwards what `ConversationSession.outputs()` yields: `PipelineEvent`s
(JSON-able, timestamped) and `AudioOut` pieces (mono float32 at the TTS sample rate), plus
`AudioClear` when queued audio must be dropped at once (barge-in, response.cancel).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

import numpy as np

INPUT_SAMPLE_RATE = 16_000

# Event names follow the OpenAI Realtime vocabulary where one exists, so transports can map 1:1.
EventType = Literal[
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "conversation.item.input_audio_transcription.completed",
    "response.created",
    "response.output_audio_transcript.delta",
    "response.output_audio_transcript.done",
    "output_audio_buffer.started",
    "output_audio_buffer.stopped",
    "output_audio_buffer.cleared",
    "response.done",
    "error",
]


@dataclasses.dataclass(frozen=True)
class PipelineEvent:
    type: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    response_id: str | None = None
    t: float = dataclasses.field(default_factory=time.monotonic)  # monotonic seconds, for latency


@dataclasses.dataclass(frozen=True)
class AudioOut:
    response_id: str
    pcm: np.ndarray  # mono float32 in [-1, 1]
    sample_rate: int


@dataclasses.dataclass(frozen=True)
class AudioClear:
    """Drop every queued AudioOut of this response now (barge-in or cancel)."""

    response_id: str | None


@dataclasses.dataclass(frozen=True)
class TurnDetection:
    """OpenAI `server_vad` parameters and defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
