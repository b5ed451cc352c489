"""Whole-file transcription (engine.agent.transcript) with the bundled whisper tiny.en on
espeak-ng speech: timed segments and words, and a long file that lets short turns through."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import speechkit
from engine.agent.asr import Transcriber
from engine.agent.transcript import (Segment, TranscribeOptions, TranscriptInfo, TranscriptionError, check_language,
                                     transcribe_stream)

pytestmark = pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed")
SPOKEN = "Please turn on the kitchen lights."


@pytest.fixture(scope="module")
def asr() -> Transcriber:
    transcriber = Transcriber.load()
    yield transcriber
    transcriber.close()


async def collect(asr, pcm, options=TranscribeOptions()) -> tuple[TranscriptInfo, list[Segment]]:
    items = [item async for item in transcribe_stream(asr, pcm, options)]
    assert isinstance(items[0], TranscriptInfo)
    return items[0], items[1:]


async def test_segments_and_words_are_timed(asr):
    second = "Hello from the server."
    pcm, truth = speechkit.speech_with_gaps([1.5, SPOKEN, 1.0, second, 0.5])
    info, segments = await collect(asr, pcm, TranscribeOptions(word_timestamps=True))
    assert info.language == "en" and info.duration == pytest.approx(pcm.size / 16000, abs=0.01)
    assert speechkit.wer(f"{SPOKEN} {second}", " ".join(s.text for s in segments)) == 0.0
    words = [w for s in segments for w in s.words]
    assert speechkit.wer(f"{SPOKEN} {second}", " ".join(w.word for w in words)) == 0.0
    assert all(a.end <= b.start + 0.01 for a, b in zip(words, words[1:]))  # in order, not overlapping
    hello = next(w for w in words if w.word.strip().lower() == "hello")
    assert hello.start == pytest.approx(truth[1][0], abs=0.3)  # the second sentence starts where it was placed
    assert words[-1].end == pytest.approx(truth[1][1], abs=0.4)


async def test_a_long_file_lets_a_short_turn_through(asr):
    # Two 30 s windows. Each window is its own job on the ASR thread, so a realtime turn submitted
    # meanwhile is answered before the file is done, not after it.
    speech = speechkit.espeak_wav(SPOKEN)
    long = np.concatenate([speech, np.zeros(35 * 16000 - speech.size, np.float32)])
    order: list[str] = []
    texts: list[str] = []

    async def long_file() -> None:
        async for item in transcribe_stream(asr, long):
            if isinstance(item, Segment):
                texts.append(item.text)
        order.append("file done")

    async def short_turn() -> None:
        await asyncio.sleep(0)  # the file's first job is already queued
        text = await asr.transcribe(speechkit.espeak_wav("Hello from the server."))
        assert speechkit.wer("Hello from the server.", text) == 0.0
        order.append("turn done")

    await asyncio.gather(long_file(), short_turn())
    assert order == ["turn done", "file done"]
    assert "kitchen lights" in speechkit.normalize(" ".join(texts))


async def test_languages_the_model_lacks_are_refused(asr):
    assert check_language(asr, "EN") == "en" and check_language(asr, None) is None
    with pytest.raises(TranscriptionError, match="English-only"):
        check_language(asr, "de")


async def test_near_empty_audio_gives_no_segments(asr):
    info, segments = await collect(asr, np.zeros(800, np.float32))
    assert segments == [] and info.duration == pytest.approx(0.05)
