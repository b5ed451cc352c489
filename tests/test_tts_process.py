"""The TTS engine in its own process (`engine.speech.tts_process.TTSProcess`): the same audio
and the same errors as the in-process engine, cancellation that reaches the child, and a child
that dies taking down only its own requests."""
from __future__ import annotations

import asyncio
import io
import os
import signal
import time

import numpy as np
import pytest
import soundfile
import torch

from engine.audio import AudioDecodeError
from engine.speech.text import TTSInputError
from engine.speech.tts_process import TTSProcess, TTSProcessError
from engine.speech.types import Reference, SamplingOptions, TTSRequest


@pytest.fixture(scope="module")
def tts_process(tiny_checkpoint):
    engine = TTSProcess(dict(checkpoint=tiny_checkpoint, device="cpu", threads=torch.get_num_threads()))
    yield engine
    engine.close()


def request(frames: int, seed: int = 3, text: str = "Hello from the other process.") -> TTSRequest:
    return TTSRequest(text=text, sampling=SamplingOptions(max_new_tokens=frames, seed=seed))


async def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_streams_what_the_in_process_engine_streams(tts_process, tts_engine):
    assert tts_process.sample_rate == tts_engine.sample_rate
    assert tts_process.num_codebooks == tts_engine.num_codebooks
    chunks = [c async for c in tts_process.stream(request(12))]
    local = [c async for c in tts_engine.stream(request(12))]
    assert [c.frames for c in chunks] == [c.frames for c in local]
    assert sum(c.frames for c in chunks) == 12
    # the same codes; the audio to float rounding (thread counts may differ once other tests ran)
    np.testing.assert_allclose(np.concatenate([c.pcm for c in chunks]), np.concatenate([c.pcm for c in local]),
                               atol=1e-5)
    assert tts_process.active_requests == 0


async def test_encodes_references_like_the_in_process_engine(tts_process, tts_engine):
    pcm = await tts_engine.synthesize(request(8))
    wav = io.BytesIO()
    soundfile.write(wav, pcm, tts_engine.sample_rate, format="WAV", subtype="FLOAT")
    codes = await tts_process.encode_reference(wav.getvalue())
    np.testing.assert_array_equal(codes, await tts_engine.encode_reference(wav.getvalue()))
    # and a request may carry the reference as audio: the child encodes it
    voiced = TTSRequest(text="Same voice.", references=(Reference(text="Hello.", audio=wav.getvalue()),),
                        sampling=SamplingOptions(max_new_tokens=6, seed=1))
    assert len(await tts_process.synthesize(voiced)) > 0


async def test_errors_keep_their_types(tts_process):
    with pytest.raises(TTSInputError, match="empty"):  # refused here, before the pipe
        await tts_process.synthesize(TTSRequest(text="   "))
    bad_codes = TTSRequest(text="Hi.", references=(Reference(text="x", codes=np.zeros((3, 4), np.int64)),))
    with pytest.raises(TTSInputError, match="reference codes must be shaped"):  # raised in the child
        await tts_process.synthesize(bad_codes)
    with pytest.raises(AudioDecodeError):
        await tts_process.encode_reference(b"this is not audio")
    assert len(await tts_process.synthesize(request(4))) > 0  # nothing of that harmed the engine


async def test_closing_a_stream_stops_the_work_in_the_child(tts_process):
    stream = tts_process.stream(request(2000))  # minutes of audio if nobody stopped it
    first = await stream.__anext__()
    assert first.pcm.size > 0
    assert (await tts_process.child_status())["active_requests"] == 1
    await stream.aclose()

    async def child_idle() -> bool:
        return (await tts_process.child_status())["active_requests"] == 0

    await wait_until(child_idle, timeout=10)
    assert tts_process.active_requests == 0


async def test_ctrl_c_is_left_to_the_parent(tts_process):
    os.kill(tts_process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole process group
    await asyncio.sleep(0.5)
    assert (await tts_process.child_status())["pid"] == tts_process.pid
    assert tts_process.restarts == 0 and len(await tts_process.synthesize(request(4))) > 0


async def test_a_killed_child_fails_its_requests_and_comes_back(tiny_checkpoint):
    engine = TTSProcess(dict(checkpoint=tiny_checkpoint, device="cpu"))
    try:
        first_pid = engine.pid
        other = asyncio.ensure_future(engine.synthesize(request(2000, seed=5)))
        with pytest.raises(TTSProcessError, match="exited unexpectedly"):
            async for _ in engine.stream(request(2000)):
                os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(TTSProcessError):  # every request in flight fails, none hangs
            await asyncio.wait_for(other, 30)

        async def restarted() -> bool:
            return engine.restarts == 1

        await wait_until(restarted, timeout=120)
        assert engine.pid != first_pid
        assert len(await engine.synthesize(request(6))) > 0
    finally:
        engine.close()
    assert engine.exitcode == 0, "close() lets the child finish cleanly rather than killing it"
    with pytest.raises(TTSProcessError, match="closed"):
        await engine.synthesize(request(4))


def test_a_checkpoint_that_does_not_load_gives_the_reason(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    missing.mkdir()
    with pytest.raises(TTSProcessError) as caught:
        TTSProcess(dict(checkpoint=str(missing), device="cpu"))
    assert "config.json not found" in str(caught.value)  # the loader's own words, from the child
