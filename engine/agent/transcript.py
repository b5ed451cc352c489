"""Whole-file transcription with faster-whisper's full output: timed segments, optional word
timings, translation to English, a prompt and a temperature. Segments stream out as Whisper
finishes each 30 s window, so a caller can forward text before the whole file is done.

The realtime path only needs plain text (`Transcriber.transcribe`); this is for file APIs.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Literal

import numpy as np

from engine.agent.asr import Transcriber
from engine.agent.vad import INPUT_SAMPLE_RATE
from engine.agent.vad import as_pcm16k

# Temperature 0 means what OpenAI documents and faster-whisper does by default: start greedy and
# raise the temperature for a window whose output looks like a failure (repetitive or unlikely).
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    task: Literal["transcribe", "translate"] = "transcribe"
    language: str | None = None  # ISO 639-1 code; None = detect (English-only models: "en")
    prompt: str | None = None  # earlier text or spellings, to steer style and vocabulary
    temperature: float = 0.0
    word_timestamps: bool = False


@dataclasses.dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclasses.dataclass(frozen=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] | None = None


@dataclasses.dataclass(frozen=True)
class TranscriptInfo:
    language: str
    duration: float  # seconds of audio


class TranscriptionError(ValueError):
    """Options the loaded model cannot honour (e.g. a language an English-only model lacks)."""


def check_language(transcriber: Transcriber, language: str | None) -> str | None:
    if language is None:
        return None
    code = language.strip().lower()
    supported = list(transcriber.model.supported_languages)
    if code not in supported:
        if supported == ["en"]:
            raise TranscriptionError(f"the loaded ASR model is English-only; language {language!r} is not available")
        raise TranscriptionError(f"unknown language {language!r}; use an ISO 639-1 code such as 'en' or 'de'")
    return code


def _start(model, pcm: np.ndarray, options: TranscribeOptions, beam_size: int):
    temperature = FALLBACK_TEMPERATURES if options.temperature == 0 else (options.temperature,)
    segments, info = model.transcribe(
        pcm, task=options.task, language=options.language, initial_prompt=options.prompt or None,
        temperature=temperature, beam_size=beam_size, vad_filter=False, condition_on_previous_text=False,
        word_timestamps=options.word_timestamps)
    return segments, TranscriptInfo(language=info.language, duration=float(info.duration))


def _segment(seg) -> Segment:
    words = None if seg.words is None else [Word(w.word, float(w.start), float(w.end), float(w.probability))
                                            for w in seg.words]
    return Segment(id=seg.id, seek=seg.seek, start=float(seg.start), end=float(seg.end), text=seg.text,
                   tokens=list(seg.tokens), temperature=float(seg.temperature or 0.0),
                   avg_logprob=float(seg.avg_logprob), compression_ratio=float(seg.compression_ratio),
                   no_speech_prob=float(seg.no_speech_prob), words=words)


async def transcribe_stream(transcriber: Transcriber, pcm16k: np.ndarray,
                            options: TranscribeOptions = TranscribeOptions()) -> AsyncIterator[TranscriptInfo | Segment]:
    """One TranscriptInfo, then each Segment as soon as Whisper has it.

    Each 30 s window is its own job on the ASR thread, so a long file does not hold the thread
    for minutes: a realtime call's short turn waits for one window at most. Closing the iterator
    stops the work after the window in progress.
    """
    pcm = as_pcm16k(pcm16k)
    if pcm.size < INPUT_SAMPLE_RATE // 10:  # Whisper hallucinates on near-empty input
        yield TranscriptInfo(language=options.language or "en", duration=pcm.size / INPUT_SAMPLE_RATE)
        return
    segments, info = await transcriber.run(_start, pcm, options, transcriber.beam_size)
    yield info
    while (seg := await transcriber.run(lambda _model: next(segments, None))) is not None:
        yield _segment(seg)
