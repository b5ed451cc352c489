"""The TTS pipeline end to end on tiny checkpoints: streaming, references, chunking,
concurrency, cancellation and bad input."""
from __future__ import annotations

import asyncio
import io
import wave

import numpy as np
import pytest
import torch

from engine.speech.tts import (AHEAD_SECONDS, PushCadence, TTSEngine, TTSInputError, first_push_frames,
                               model_threads)
from engine.speech.types import Reference, SamplingOptions, TTSRequest

GREEDY8 = SamplingOptions(greedy=True, max_new_tokens=8)


def _wav_bytes(seconds=1.0, rate=22050, freq=220.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


async def _collect(engine, request):
    return [c async for c in engine.stream(request)]


async def test_stream_yields_chunks_every_n_frames(tts_engine):
    chunks = await _collect(tts_engine, TTSRequest(text="Hello there.", sampling=GREEDY8, stream_every_frames=3))
    frames = [c.frames for c in chunks]
    assert sum(frames) <= 8 and frames[0] == 3 and all(f <= 3 for f in frames)
    hop = tts_engine.models.codec.hop_length
    assert all(len(c.pcm) == c.frames * hop for c in chunks)
    assert all(c.sample_rate == 44100 and c.pcm.dtype == np.float32 for c in chunks)
    audio = np.concatenate([c.pcm for c in chunks])
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


async def whole_decode(tts_engine, text: str, sampling: SamplingOptions) -> tuple[torch.Tensor, np.ndarray]:
    """The codes the engine generates for `text` (no reference), and their one-shot codec decode."""
    from engine.fish.generate import generate_codes
    from engine.fish.prompt import build_prompt

    m = tts_engine.models
    prompt = build_prompt(m.tokenizer, m.family, text, references=[], history=[],
                          num_codebooks=m.config.num_codebooks)
    codes = await asyncio.wrap_future(tts_engine.worker.call(
        lambda: generate_codes(m.runner, torch.as_tensor(prompt), sampling, sampling.max_new_tokens)))
    with torch.inference_mode():
        return codes, m.codec.decode(codes).float().numpy().reshape(-1)


async def test_streamed_audio_equals_whole_decode_of_the_same_codes(tts_engine):
    request = TTSRequest(text="Streaming check.", sampling=GREEDY8, stream_every_frames=2, normalize=False)
    streamed = np.concatenate([c.pcm for c in await _collect(tts_engine, request)])
    _, whole = await whole_decode(tts_engine, "Streaming check.", GREEDY8)
    assert streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() < 1e-4


async def test_default_cadence_starts_small_and_streams_the_whole_decode(tts_engine):
    """Without a request cadence the pushes may grow; the audio is still exactly the whole decode."""
    sampling = SamplingOptions(greedy=True, max_new_tokens=40)
    chunks = await _collect(tts_engine, TTSRequest(text="Cadence check.", sampling=sampling, normalize=False))
    frames = [c.frames for c in chunks]
    assert frames[0] == tts_engine.stream_every_frames and max(frames) <= tts_engine.max_stream_frames
    codes, whole = await whole_decode(tts_engine, "Cadence check.", sampling)
    streamed = np.concatenate([c.pcm for c in chunks])
    assert sum(frames) == codes.shape[1] and streamed.shape == whole.shape
    assert np.abs(streamed - whole).max() < 1e-4


def test_push_cadence_grows_only_while_the_listener_is_ahead():
    now = [100.0]
    cadence = PushCadence(2, 8, clock=lambda: now[0])
    assert not cadence.due(1) and cadence.due(2)  # nothing emitted yet: every 2 frames
    cadence.emitted(0.2)
    now[0] += 0.05
    assert cadence.due(2), "0.15 s ahead of playback: keep pushing small"
    cadence.emitted(AHEAD_SECONDS + 0.2)
    assert not cadence.due(2) and not cadence.due(7) and cadence.due(8), "well ahead: up to 8 frames a push"
    now[0] += 0.6  # generation stalled while playback went on: the lead is under the margin again
    assert cadence.due(2)
    fixed = PushCadence(3, 3, clock=lambda: now[0])
    fixed.emitted(10.0)
    assert fixed.due(3), "a fixed cadence never grows"


def test_a_first_chunk_under_load_is_longer():
    assert [first_push_frames(2, n) for n in (1, 3, 4, 6, 7)] == [2, 2, 3, 3, 4]
    load = [1]
    cadence = PushCadence(2, 8, first=lambda: first_push_frames(2, load[0]))
    assert cadence.due(2), "alone: the first chunk is as short as ever"
    load[0] = 6
    cadence = PushCadence(2, 8, first=lambda: first_push_frames(2, load[0]))
    assert not cadence.due(2) and cadence.due(3)
    cadence.emitted(0.14)
    assert cadence.due(2), "after the first chunk, the usual cadence"


async def test_concurrent_requests_start_with_longer_chunks(tts_engine):
    requests = [TTSRequest(text="Hello there.", sampling=SamplingOptions(max_new_tokens=12, seed=i)) for i in range(4)]
    streams = await asyncio.gather(*(_collect(tts_engine, r) for r in requests))
    assert [chunks[0].frames for chunks in streams] == [3, 3, 3, 3]  # 4 requests in progress: 2 + 1 frames
    alone = await _collect(tts_engine, requests[0])
    assert alone[0].frames == 2


def test_model_threads_leave_the_event_loop_a_core_on_cpu():
    import os

    cores = len(os.sched_getaffinity(0))
    assert model_threads(torch.device("cpu")) == max(1, cores - 1)
    assert model_threads(torch.device("cpu"), 3) == 3  # an explicit count wins
    assert model_threads(torch.device("cuda")) is None  # a GPU keeps torch's default


async def test_reference_audio_is_encoded_once_and_cached(tts_engine):
    audio = _wav_bytes(1.0)
    before = len(tts_engine.references)
    a = await tts_engine.encode_reference(audio)
    b = await tts_engine.encode_reference(audio)
    assert a.shape == (tts_engine.num_codebooks, 22)  # ceil(44100 / 2048) frames
    assert np.array_equal(a, b) and len(tts_engine.references) == before + 1
    ref = Reference(text="A reference sentence.", audio=audio)
    with_ref = await _collect(tts_engine, TTSRequest(text="Hi.", references=(ref,), sampling=GREEDY8))
    without = await _collect(tts_engine, TTSRequest(text="Hi.", sampling=GREEDY8))
    a1 = np.concatenate([c.pcm for c in with_ref])
    a2 = np.concatenate([c.pcm for c in without])
    assert a1.shape != a2.shape or not np.allclose(a1, a2)  # the reference changes the prompt


async def test_reference_codes_can_be_passed_directly(tts_engine):
    codes = await tts_engine.encode_reference(_wav_bytes(0.5, freq=330.0))
    by_audio = await _collect(tts_engine, TTSRequest(
        text="Hi.", references=(Reference(text="ref", audio=_wav_bytes(0.5, freq=330.0)),), sampling=GREEDY8))
    by_codes = await _collect(tts_engine, TTSRequest(
        text="Hi.", references=(Reference(text="ref", codes=codes),), sampling=GREEDY8))
    assert np.array_equal(np.concatenate([c.pcm for c in by_audio]), np.concatenate([c.pcm for c in by_codes]))


async def test_long_text_is_chunked_and_earlier_chunks_feed_the_next(tts_engine):
    text = "The first sentence is here. " * 4 + "And this is the final one."
    chunks = await _collect(tts_engine, TTSRequest(text=text, sampling=SamplingOptions(greedy=True, max_new_tokens=4),
                                                   chunk_length=60))
    indices = sorted({c.text_chunk for c in chunks})
    assert len(indices) >= 2 and indices == list(range(len(indices)))


async def test_concurrent_requests_interleave_and_match_sequential_results(tts_engine):
    r1 = TTSRequest(text="One two three.", sampling=GREEDY8)
    r2 = TTSRequest(text="Four five six.", sampling=GREEDY8)
    s1 = np.concatenate([c.pcm for c in await _collect(tts_engine, r1)])
    s2 = np.concatenate([c.pcm for c in await _collect(tts_engine, r2)])
    c1, c2 = await asyncio.gather(_collect(tts_engine, r1), _collect(tts_engine, r2))
    assert np.array_equal(np.concatenate([c.pcm for c in c1]), s1)
    assert np.array_equal(np.concatenate([c.pcm for c in c2]), s2)


async def test_closing_a_stream_stops_the_model_work(tts_engine):
    request = TTSRequest(text="This would run for a long time.",
                         sampling=SamplingOptions(greedy=True, max_new_tokens=500), stream_every_frames=1)
    stream = tts_engine.stream(request)
    first = await stream.__anext__()
    assert first.frames == 1
    await stream.aclose()
    for _ in range(100):
        if tts_engine.active_requests == 0:
            break
        await asyncio.sleep(0.01)
    assert tts_engine.active_requests == 0
    after = await _collect(tts_engine, TTSRequest(text="Still here.", sampling=GREEDY8))
    assert after


async def test_seeded_sampling_reproduces(tts_engine):
    opts = SamplingOptions(seed=123, max_new_tokens=6, temperature=0.9, top_p=0.9)
    a = np.concatenate([c.pcm for c in await _collect(tts_engine, TTSRequest(text="Seeded.", sampling=opts))])
    b = np.concatenate([c.pcm for c in await _collect(tts_engine, TTSRequest(text="Seeded.", sampling=opts))])
    assert np.array_equal(a, b)


async def test_bad_input_gets_clear_errors(tts_engine):
    from engine.audio import AudioDecodeError

    with pytest.raises(TTSInputError, match="empty"):
        await _collect(tts_engine, TTSRequest(text="   "))
    with pytest.raises(AudioDecodeError):
        await _collect(tts_engine, TTSRequest(text="Hi.", references=(Reference(text="x", audio=b"not audio"),)))
    with pytest.raises(TTSInputError, match="shaped"):
        await _collect(tts_engine, TTSRequest(text="Hi.", references=(Reference(text="x", codes=np.zeros((3, 4))),)))
    ok = await _collect(tts_engine, TTSRequest(text="Fine again.", sampling=GREEDY8))
    assert ok


async def test_s2_family_synthesizes(tiny_s2_checkpoint):
    engine = TTSEngine.load(tiny_s2_checkpoint, device="cpu")
    try:
        assert engine.models.family == "s2-pro"
        ref = Reference(text="A reference.", audio=_wav_bytes(0.6))
        chunks = await _collect(engine, TTSRequest(text="Hello from S2.", references=(ref,), sampling=GREEDY8))
        assert sum(c.frames for c in chunks) >= 1
    finally:
        engine.close()
