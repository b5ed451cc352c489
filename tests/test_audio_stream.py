"""Streaming encode and pitch-keeping time stretch (engine.audio_stream), checked by decoding
the result with PyAV and measuring it."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest

from engine.audio import decode_audio
from engine.audio_stream import STREAM_FORMATS, StreamEncoder, TimeStretch

RATE = 44100


def tone(freq: float, seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(pcm.size)))
    return float(np.fft.rfftfreq(pcm.size, 1 / rate)[spectrum.argmax()])


def encode_in_pieces(fmt: str, pcm: np.ndarray, piece: int = 4096, **kwargs) -> tuple[bytes, list[bytes]]:
    encoder = StreamEncoder(fmt, RATE, **kwargs)
    out = [encoder.push(pcm[i:i + piece]) for i in range(0, pcm.size, piece)]
    out.append(encoder.close())
    return b"".join(out), out


@pytest.mark.parametrize("fmt", [f for f in STREAM_FORMATS if f != "pcm"])
def test_piecewise_encoding_is_one_file_of_the_right_length(fmt):
    pcm = tone(440, 2.0)
    data, pieces = encode_in_pieces(fmt, pcm)
    assert sum(1 for p in pieces[:-1] if p) >= 5  # bytes come out while the input is still arriving
    with av.open(io.BytesIO(data)) as container:
        rate = container.streams.audio[0].codec_context.sample_rate
    out = decode_audio(data, rate)
    assert out.size / rate == pytest.approx(2.0, abs=0.06)
    assert peak_hz(out, rate) == pytest.approx(440, abs=3)
    assert float(np.sqrt(np.mean(out ** 2))) == pytest.approx(0.4 / np.sqrt(2), rel=0.1)


def test_raw_pcm_at_another_rate_is_continuous():
    pcm = tone(440, 1.0)
    data, _ = encode_in_pieces("pcm", pcm, out_rate=24000)
    out = np.frombuffer(data, "<i2").astype(np.float32) / 32768
    assert out.size == pytest.approx(24000, abs=64)
    assert peak_hz(out, 24000) == pytest.approx(440, abs=2)
    # One resampler across pieces: no clicks at the joins (a sine's sample-to-sample step stays small).
    assert np.abs(np.diff(out[100:-100])).max() < 2 * 0.4 * np.sin(np.pi * 440 / 24000) * 1.2


def test_first_mp3_bytes_leave_with_the_first_piece():
    encoder = StreamEncoder("mp3", RATE)
    first = encoder.push(tone(440, 0.1))
    assert first  # header and first frames, not held back until 32 KiB have piled up
    encoder.close()


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_time_stretch_keeps_pitch(speed):
    pcm = tone(440, 2.0)
    stretch = TimeStretch(speed, RATE)
    parts = [stretch.push(pcm[i:i + 4096]) for i in range(0, pcm.size, 4096)] + [stretch.flush()]
    out = np.concatenate(parts)
    assert out.size / pcm.size == pytest.approx(1 / speed, rel=0.03)
    assert peak_hz(out, RATE) == pytest.approx(440, abs=4)  # a resample would move it to 440 * speed


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        TimeStretch(5.0, RATE)
    with pytest.raises(ValueError):
        StreamEncoder("ogg-vorbis", RATE)
