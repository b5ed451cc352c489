"""Audio I/O through PyAV: encode -> decode round trips per format, raw PCM, resampling, channel
averaging, the length guard and bad input."""
from __future__ import annotations

import io
import wave

import av
import numpy as np
import pytest

from engine.audio import (FORMATS, AudioDecodeError, decode_audio, encode_audio, float_to_pcm16, mime_type,
                          resample)

SR = 44100


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def chirp_mix(seconds: float, rate: int) -> np.ndarray:
    """Two tones with a fade in: not periodic per frame, so misalignment shows in correlation."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.4 * np.sin(2 * np.pi * 330 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t + 1.0)
    return (x * np.minimum(1.0, t / 0.2)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def wav_bytes(channels: list[np.ndarray], rate: int) -> bytes:
    """A PCM16 WAV written with the standard library (independent of the code under test)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(len(channels))
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.stack(channels, axis=1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_lossless_round_trip_is_sample_exact(fmt):
    x = chirp_mix(1.0, SR)
    data = encode_audio(x, SR, fmt)
    y = decode_audio(data, SR)
    assert y.dtype == np.float32
    assert len(y) == len(x)
    assert np.max(np.abs(y - x)) < 1.5 / 32767  # 16-bit quantisation only
    assert np.corrcoef(x, y)[0, 1] > 0.99999


def test_wav_is_16_bit_mono_at_the_given_rate():
    data = encode_audio(tone(440, 0.25, 24000), 24000, "wav")
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 24000, 6000)


@pytest.mark.parametrize("fmt,rate", [("mp3", SR), ("opus", SR), ("mp3", 24000), ("opus", 22050)])
def test_lossy_round_trip_keeps_duration_level_and_pitch(fmt, rate):
    x = tone(440, 1.0, rate)
    data = encode_audio(x, rate, fmt)
    assert 0 < len(data) < len(x)  # actually compressed
    y = decode_audio(data, rate)
    assert abs(len(y) - len(x)) <= 0.03 * rate  # within 30 ms
    body = y[int(0.1 * rate):int(0.9 * rate)]
    assert rms(body) == pytest.approx(rms(x), rel=0.1)
    assert peak_hz(body, rate) == pytest.approx(440, abs=3)


def test_opus_container_is_ogg():
    data = encode_audio(tone(440, 0.2, 24000), 24000, "opus")
    assert data[:4] == b"OggS"
    with av.open(io.BytesIO(data)) as c:
        assert c.streams.audio[0].codec_context.name == "opus"
        assert c.streams.audio[0].sample_rate in (48000, 24000)


def test_decode_resamples_to_the_requested_rate():
    x = tone(440, 1.0, 16000)
    y = decode_audio(encode_audio(x, 16000, "wav"), 24000)
    assert abs(len(y) - 24000) <= 2
    assert peak_hz(y, 24000) == pytest.approx(440, abs=2)


def test_pcm_is_raw_little_endian_int16():
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0], np.float32)
    data = encode_audio(x, 16000, "pcm")
    assert len(data) == 2 * len(x)
    assert np.frombuffer(data, "<i2").tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767]
    assert len(encode_audio(tone(440, 0.5, SR), SR, "pcm")) == 2 * int(0.5 * SR)


def test_float_to_pcm16_rounds_and_clips():
    out = float_to_pcm16(np.array([-5.0, -1.0, 0.0, 0.25, -0.25, 1.0, 5.0, np.nan, 0.9 / 32767]))
    assert out.dtype == np.dtype("<i2")
    assert out.tolist() == [-32767, -32767, 0, 8192, -8192, 32767, 32767, 0, 1]


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus"])
def test_no_samples_encode_to_a_valid_file_that_decodes_to_an_error(fmt):
    data = encode_audio(np.zeros(0, np.float32), 24000, fmt)
    assert data  # a container header, not nothing
    with pytest.raises(AudioDecodeError):
        decode_audio(data, 24000)


# ----------------------------------------------------------------------------- resample


@pytest.mark.parametrize("src,dst", [(44100, 16000), (16000, 48000), (24000, 44100), (48000, 24000)])
def test_resample_keeps_length_ratio_and_frequency(src, dst):
    x = tone(440, 1.0, src)
    y = resample(x, src, dst)
    assert y.dtype == np.float32
    assert abs(len(y) - dst) <= 2
    assert peak_hz(y, dst) == pytest.approx(440, abs=2)
    assert rms(y[dst // 10:-dst // 10]) == pytest.approx(rms(x), rel=0.02)


def test_resample_identity_and_empty():
    x = tone(440, 0.1, 16000)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
    assert resample(np.zeros(0, np.float32), 16000, 48000).size == 0


def test_resample_removes_content_above_the_new_nyquist():
    x = tone(10000, 1.0, 44100)  # above 8 kHz, the Nyquist frequency at 16 kHz
    y = resample(x, 44100, 16000)
    assert rms(y[1600:-1600]) < 0.05 * rms(x)


# ----------------------------------------------------------------------------- channels


def test_stereo_is_averaged_to_mono():
    rate = 16000
    left, right = tone(300, 1.0, rate, 0.5), tone(700, 1.0, rate, 0.3)
    y = decode_audio(wav_bytes([left, right], rate), rate)
    np.testing.assert_allclose(y, (left + right) / 2, atol=2e-4)


def test_identical_channels_keep_their_level_and_opposite_ones_cancel():
    rate = 16000
    x = tone(300, 0.5, rate, 0.9)
    np.testing.assert_allclose(decode_audio(wav_bytes([x, x], rate), rate), x, atol=2e-4)
    assert np.max(np.abs(decode_audio(wav_bytes([x, -x], rate), rate))) < 1e-3


# ----------------------------------------------------------------------------- guards and errors


def test_max_seconds_guard():
    data = encode_audio(tone(440, 1.0, 16000), 16000, "wav")
    with pytest.raises(AudioDecodeError, match="limit"):
        decode_audio(data, 16000, max_seconds=0.5)
    assert len(decode_audio(data, 16000, max_seconds=1.0)) == 16000
    assert len(decode_audio(data, 8000, max_seconds=2.0)) == pytest.approx(8000, abs=2)


@pytest.mark.parametrize("data", [
    b"",
    b"garbage" * 100,
    bytes(range(256)) * 20,
    b"RIFF\x24\x00\x00\x00WAVE",  # a WAV header and nothing else
])
def test_bad_bytes_raise_audio_decode_error(data):
    with pytest.raises(AudioDecodeError):
        decode_audio(data, 16000)


def test_truncated_files_raise_or_decode_a_prefix():
    data = encode_audio(tone(440, 1.0, 16000), 16000, "mp3")
    with pytest.raises(AudioDecodeError):
        decode_audio(data[:40], 16000)
    y = decode_audio(data[:len(data) // 2], 16000)  # half a file is still audio
    assert 0.3 * 16000 < len(y) < 0.7 * 16000


def test_container_without_audio_raises():
    buf = io.BytesIO()
    with av.open(buf, "w", format="nut") as c:
        s = c.add_stream("rawvideo", rate=1)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24").reformat(format="yuv420p")
        for packet in [*s.encode(frame), *s.encode(None)]:
            c.mux(packet)
    with pytest.raises(AudioDecodeError, match="no audio"):
        decode_audio(buf.getvalue(), 16000)


def test_unsupported_format_raises_value_error():
    with pytest.raises(ValueError, match="unsupported"):
        encode_audio(tone(440, 0.1, 16000), 16000, "aac")
    assert issubclass(AudioDecodeError, ValueError)


def test_mime_types():
    assert {f: mime_type(f) for f in FORMATS} == {
        "wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "opus": "audio/ogg", "pcm": "audio/L16"}
    assert mime_type("nope") == "application/octet-stream"
