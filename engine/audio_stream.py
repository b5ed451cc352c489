"""Streaming audio out through PyAV: encode PCM chunk by chunk into a container whose bytes can
be sent as they appear, and stretch time without changing pitch (FFmpeg's `atempo`).

Both keep FFmpeg state across chunks, so a stream encoded or stretched piecewise is one
continuous file / signal, not a string of separately encoded pieces.
"""
from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np

from engine.audio import float_to_pcm16

# format -> (muxer, codec, sample format the encoder takes, output rate or None = the input rate)
STREAM_FORMATS: dict[str, tuple[str, str, str, int | None]] = {
    "mp3": ("mp3", "libmp3lame", "s16p", None),
    "opus": ("ogg", "libopus", "s16", 48000),
    "aac": ("adts", "aac", "fltp", None),
    "flac": ("flac", "flac", "s16", None),
    "wav": ("wav", "pcm_s16le", "s16", None),
    "pcm": ("s16le", "pcm_s16le", "s16", None),
}
MIN_SPEED, MAX_SPEED = 0.25, 4.0
_MUXER_OPTIONS = {
    "flush_packets": "1",  # hand each packet to us at once rather than after 32 KiB
    "page_duration": "100000",  # Ogg: close a page every 100 ms (default 1 s) so Opus leaves promptly
}


class _Sink:
    """A write-only, unseekable file for FFmpeg: it collects what the muxer writes until taken.
    Being unseekable makes the muxers write streamable headers (sizes left open) up front."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class StreamEncoder:
    """Mono float32 PCM in, encoded bytes out as soon as the muxer produces them.

    `push(pcm)` returns the bytes ready so far (possibly b""), `close()` the rest (the encoder's
    tail and the container trailer). The concatenation of everything returned is one valid file
    (raw s16le for "pcm").
    """

    def __init__(self, fmt: str, sample_rate: int, out_rate: int | None = None) -> None:
        if fmt not in STREAM_FORMATS:
            raise ValueError(f"unsupported audio format {fmt!r}; use one of {', '.join(STREAM_FORMATS)}")
        muxer, codec, sample_format, fixed_rate = STREAM_FORMATS[fmt]
        self.format = fmt
        self.in_rate = sample_rate
        self.rate = out_rate or fixed_rate or sample_rate
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format=muxer, container_options=dict(_MUXER_OPTIONS))
        self._stream = self._container.add_stream(codec, rate=self.rate, layout="mono")
        self._container.start_encoding()  # the header goes out with the first bytes
        # One resampler for the whole stream: it converts the sample format and, when the output
        # rate differs, keeps its filter state across chunks (no clicks at chunk joins).
        self._resampler = av.AudioResampler(format=sample_format, layout="mono", rate=self.rate,
                                            frame_size=self._stream.codec_context.frame_size or None)
        self._pts = 0
        self._closed = False

    def _encode(self, frame: av.AudioFrame | None) -> None:
        for out in self._resampler.resample(frame):
            for packet in self._stream.encode(out):
                self._container.mux(packet)

    def push(self, pcm: np.ndarray) -> bytes:
        if self._closed:
            raise RuntimeError("the encoder is closed")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size:
            frame = av.AudioFrame.from_ndarray(float_to_pcm16(pcm).reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.in_rate
            frame.pts = self._pts
            frame.time_base = Fraction(1, self.in_rate)
            self._pts += pcm.size
            self._encode(frame)
        return self._sink.take()

    def close(self) -> bytes:
        if self._closed:
            return b""
        self._closed = True
        self._encode(None)  # the resampler's held samples (a short last frame is padded)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()


def _atempo_factors(speed: float) -> list[float]:
    """Split a speed into atempo stages of at most 2x each way (beyond that atempo drops samples
    instead of overlapping them, which sounds rougher)."""
    stages = max(1, math.ceil(abs(math.log2(speed)) - 1e-9))
    return [speed ** (1.0 / stages)] * stages


class TimeStretch:
    """Change tempo by `speed` (0.25-4.0) while keeping pitch: FFmpeg's atempo (WSOLA), fed chunk
    by chunk. `push` returns what is ready; `flush` the rest at the end of the stream."""

    def __init__(self, speed: float, sample_rate: int) -> None:
        if not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(f"speed must be within [{MIN_SPEED}, {MAX_SPEED}], got {speed}")
        self.rate = sample_rate
        self._graph = av.filter.Graph()
        node = self._graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono",
                                       time_base=Fraction(1, sample_rate))
        for factor in _atempo_factors(speed):
            stage = self._graph.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        sink = self._graph.add("abuffersink")
        node.link_to(sink)
        self._graph.configure()
        self._pts = 0
        self._flushed = False

    def _drain(self) -> np.ndarray:
        out: list[np.ndarray] = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                break
            out.append(frame.to_ndarray().reshape(-1).astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.ascontiguousarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size == 0:
            return np.zeros(0, np.float32)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        frame.time_base = Fraction(1, self.rate)
        self._pts += pcm.size
        self._graph.push(frame)
        return self._drain()

    def flush(self) -> np.ndarray:
        if self._flushed:
            return np.zeros(0, np.float32)
        self._flushed = True
        self._graph.push(None)
        return self._drain()
