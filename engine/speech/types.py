"""Wire-neutral types shared by the TTS pipeline and every transport that calls it.

Transports (the job API, upstream's /v1/tts, WebRTC, the agent pipeline) build a `TTSRequest`
and consume `AudioChunk`s from `SpeechSynthesizer.stream`; nothing else of the engine leaks out.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling knobs. Defaults follow the original RunPod endpoint."""

    temperature: float = 0.7
    top_p: float = 0.7
    top_k: int = 30
    repetition_penalty: float = 1.2
    max_new_tokens: int = 0  # per text chunk; 0 = until the end token or the context limit
    seed: int | None = None
    greedy: bool = False  # argmax everywhere (tests and fidelity checks)


@dataclasses.dataclass(frozen=True)
class Reference:
    """One reference voice: its transcript plus either encoded audio bytes or codes [K, T]."""

    text: str
    audio: bytes | None = None  # any common container/codec; decoded and encoded by the engine
    codes: np.ndarray | None = None  # int array [num_codebooks, frames], already encoded


@dataclasses.dataclass(frozen=True)
class TTSRequest:
    text: str
    references: tuple[Reference, ...] = ()
    sampling: SamplingOptions = SamplingOptions()
    chunk_length: int = 200  # UTF-8 bytes per text chunk; earlier chunks' codes are fed back
    normalize: bool = True  # expand numbers and common symbols into words
    use_memory_cache: bool = True  # cache reference codes by content hash
    stream_every_frames: int | None = None  # decoder cadence; None = the engine's default


@dataclasses.dataclass(frozen=True)
class AudioChunk:
    """A piece of the output waveform, mono float32 in [-1, 1]."""

    pcm: np.ndarray
    sample_rate: int
    frames: int  # code frames this chunk was decoded from
    text_chunk: int  # index of the text chunk it belongs to


class SpeechSynthesizer(Protocol):
    """What transports need from the TTS engine."""

    @property
    def sample_rate(self) -> int: ...

    def prepare_text(self, request: TTSRequest) -> list[str]:
        """The request's text as the engine will speak it (normalised, split into chunks);
        raises ValueError when nothing speakable is left. Cheap: transports call it to refuse
        such text before queueing."""
        ...

    def stream(self, request: TTSRequest) -> AsyncIterator[AudioChunk]:
        """Yield audio as it is produced. Closing the iterator (aclose / task cancel) stops
        the model work for this request promptly and frees the model for others."""
        ...

    async def encode_reference(self, audio: bytes, *, use_memory_cache: bool = True,
                               pcm: np.ndarray | None = None) -> np.ndarray:
        """Decode any common audio format and return its codec codes [K, T]. `pcm` is the same
        audio already decoded (mono float32 at `sample_rate`), which spares decoding it again;
        `audio` still keys the cache."""
        ...

    def close(self) -> None:
        """Stop the engine's model work for good (server shutdown)."""
        ...


async def synthesize_whole(tts: SpeechSynthesizer, request: TTSRequest) -> np.ndarray:
    """All of a request's audio at once (float32 mono at `tts.sample_rate`), for any synthesizer."""
    parts = [chunk.pcm async for chunk in tts.stream(request)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
