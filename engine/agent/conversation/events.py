"""What a conversation yields: typed, frozen events, plus the audio it speaks.

A transport feeds a session 16 kHz mono float32 PCM and client requests, and forwards what
`ConversationSession.outputs()` yields: these events, `AudioOut` pieces (mono float32 at the TTS
sample rate) and `AudioClear` when queued audio must be dropped at once (barge-in, cancel).
No wire vocabulary lives here: a transport maps each event to its own protocol at its edge.
Every event carries `t`, the monotonic time it happened, so transports can report latency.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Literal

import numpy as np

from engine.agent.vad import INPUT_SAMPLE_RATE, TurnDetection  # noqa: F401 - part of this contract

ResponseKind = Literal["agent", "tts"]
ResponseStatus = Literal["in_progress", "completed", "cancelled", "failed"]
ErrorType = Literal["server_error", "invalid_request_error"]


def _now() -> float:
    return time.monotonic()


@dataclasses.dataclass(frozen=True)
class Latency:
    """Milliseconds from the end of the user's turn (or from the response's creation) to each stage."""

    transcript: float | None = None
    first_token: float | None = None
    first_audio: float | None = None


@dataclasses.dataclass(frozen=True)
class ResponseTimes:
    """Monotonic seconds of a response's milestones (None: not reached)."""

    created: float
    speech_stopped: float | None = None
    transcript: float | None = None
    first_token: float | None = None
    first_audio: float | None = None


# ------------------------------------------------------------------ events
@dataclasses.dataclass(frozen=True, kw_only=True)
class ConversationEvent:
    t: float = dataclasses.field(default_factory=_now)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserSpeechStarted(ConversationEvent):
    item_id: str
    audio_start_ms: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserSpeechStopped(ConversationEvent):
    item_id: str
    audio_end_ms: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserAudioCommitted(ConversationEvent):
    """A manual turn (no turn detection) was committed."""

    item_id: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserTranscriptDelta(ConversationEvent):
    """More of a turn's transcript, final as far as it goes: the deltas of a turn, in order, add up
    to its UserTranscript (which wins if the last pass rewrote a word already sent)."""

    item_id: str
    delta: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserTranscript(ConversationEvent):
    item_id: str
    transcript: str
    latency_ms: float  # end of the turn -> transcript


@dataclasses.dataclass(frozen=True, kw_only=True)
class UserDtmf(ConversationEvent):
    """The caller pressed a telephone key (0-9, *, #, A-D), reported by a phone transport."""

    digit: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseCreated(ConversationEvent):
    response_id: str
    item_id: str
    kind: ResponseKind
    audio: bool = True  # False: a text-only response
    tools: bool = False  # it may call tools (its message item then starts with its first text)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseTextDelta(ConversationEvent):
    response_id: str
    item_id: str
    delta: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseTextDone(ConversationEvent):
    response_id: str
    item_id: str
    transcript: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class FunctionCallStarted(ConversationEvent):
    """The model began a call of tool `name`; its arguments follow once they validate."""

    response_id: str
    item_id: str
    call_id: str
    name: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class FunctionCallDone(ConversationEvent):
    """A call's arguments, checked against the tool's schema: `deltas` as the model wrote them,
    `arguments` whole. The call is now an item of the conversation, awaiting its output."""

    response_id: str
    item_id: str
    call_id: str
    name: str
    arguments: str
    deltas: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseAudioStarted(ConversationEvent):
    """The response's first audio left the pipeline."""

    response_id: str
    latency: Latency


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseAudioStopped(ConversationEvent):
    """The response's audio has played out."""

    response_id: str
    audio_end_ms: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseAudioCleared(ConversationEvent):
    """Queued audio was dropped (barge-in, cancel) after `audio_end_ms` had played."""

    response_id: str
    audio_end_ms: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseTruncated(ConversationEvent):
    """A finished reply was cut while playing: the history keeps `transcript`, what was heard."""

    response_id: str
    item_id: str
    audio_end_ms: int
    transcript: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResponseDone(ConversationEvent):
    response_id: str
    item_id: str
    kind: ResponseKind
    status: ResponseStatus
    transcript: str
    audio_seconds: float
    latency: Latency
    times: ResponseTimes
    reason: str | None = None  # why it was cancelled
    error: ConversationError | None = None  # why it failed


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConversationError(ConversationEvent):
    type: ErrorType
    code: str
    message: str
    item_id: str | None = None
    response_id: str | None = None


# ------------------------------------------------------------------ audio
@dataclasses.dataclass(frozen=True)
class AudioOut:
    response_id: str
    pcm: np.ndarray  # mono float32 in [-1, 1]
    sample_rate: int


@dataclasses.dataclass(frozen=True)
class AudioClear:
    """Drop every queued AudioOut of this response now (barge-in or cancel)."""

    response_id: str | None


Output = ConversationEvent | AudioOut | AudioClear
