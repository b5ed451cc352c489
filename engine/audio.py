"""Audio in and out through PyAV (FFmpeg): decode any common container to mono float32 at a
target rate, encode PCM to wav / mp3 / flac / opus / raw pcm, resample."""
from __future__ import annotations

import io

import av
import numpy as np

FORMATS = ("wav", "mp3", "flac", "opus", "pcm")
_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "opus": "audio/ogg",
         "pcm": "audio/L16", "ogg": "audio/ogg"}
# (container, codec, sample format, rates the codec accepts or None for any)
_ENCODERS = {
    "wav": ("wav", "pcm_s16le", "s16", None),
    "mp3": ("mp3", "libmp3lame", "s16p", (48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)),
    "flac": ("flac", "flac", "s16", None),
    "opus": ("ogg", "libopus", "s16", (48000, 24000, 16000, 12000, 8000)),
}


class AudioDecodeError(ValueError):
    """The bytes are not audio that FFmpeg can decode, or hold no samples."""


def mime_type(fmt: str) -> str:
    return _MIME.get(fmt, "application/octet-stream")


def float_to_pcm16(pcm: np.ndarray) -> np.ndarray:
    # Round to nearest (a plain cast truncates toward zero: up to 1 LSB of error and a dead zone
    # around silence); NaN, which a cast turns into an arbitrary value, becomes silence.
    pcm = np.nan_to_num(np.asarray(pcm, dtype=np.float32), nan=0.0)
    return np.rint(np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2")


def resample(pcm: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Mono float32 resampling with libswresample."""
    pcm = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
    if src_rate == dst_rate or pcm.size == 0:
        return pcm
    resampler = av.AudioResampler(format="flt", layout="mono", rate=dst_rate)
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = src_rate
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def decode_audio(data: bytes, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Any container/codec FFmpeg knows -> mono float32 in [-1, 1] at `sample_rate`."""
    if not data:
        raise AudioDecodeError("audio is empty")
    chunks: list[np.ndarray] = []
    total = 0
    limit = None if max_seconds is None else int(max_seconds * sample_rate)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioDecodeError("no audio stream in the data")
            stream = container.streams.audio[0]
            # Keep the channels (planar) and average them here: FFmpeg's own downmix to mono
            # scales stereo by 1/sqrt(2) per channel, not 1/2, and can clip.
            resampler = av.AudioResampler(format="fltp", layout=None, rate=sample_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().mean(axis=0)
                    chunks.append(chunk)
                    total += chunk.size
                if limit is not None and total > limit:
                    raise AudioDecodeError(f"audio is longer than the {max_seconds:g} s limit")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0))
    except AudioDecodeError:
        raise
    except (av.FFmpegError, ValueError, OSError, IndexError) as exc:
        raise AudioDecodeError(f"cannot decode audio: {exc}") from exc
    pcm = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if pcm.size == 0:
        raise AudioDecodeError("audio holds no samples")
    return pcm


def encode_audio(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Mono float32 PCM -> bytes of `fmt` (wav 16-bit, mp3, flac, ogg/opus, raw s16le pcm)."""
    if fmt == "pcm":
        return float_to_pcm16(pcm).tobytes()
    if fmt not in _ENCODERS:
        raise ValueError(f"unsupported audio format {fmt!r}; use one of {', '.join(FORMATS)}")
    container_name, codec, sample_format, rates = _ENCODERS[fmt]
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    rate = sample_rate
    if rates is not None and rate not in rates:
        rate = min((r for r in rates if r >= rate), default=max(rates))
        pcm = resample(pcm, sample_rate, rate)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_name) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        out.start_encoding()  # writes the header even when there are no samples
        if pcm.size:  # FFmpeg rejects an empty frame
            frame = av.AudioFrame.from_ndarray(float_to_pcm16(pcm).reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = rate
            resampler = av.AudioResampler(format=sample_format, layout="mono", rate=rate)
            for f in resampler.resample(frame):
                for packet in stream.encode(f):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
