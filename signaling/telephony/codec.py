"""Telephone audio: G.711 μ-law / A-law at the carrier's rate (8 kHz) <-> the pipeline's PCM.

Both directions go through PyAV (FFmpeg's `pcm_mulaw` / `pcm_alaw` codecs and swresample), one
codec context and one resampler per stream, so the resampling filters carry their state from
one 20 ms frame to the next.
"""
from __future__ import annotations

from typing import Literal

import av
import numpy as np

from engine.agent.conversation import INPUT_SAMPLE_RATE

Encoding = Literal["mulaw", "alaw"]
_CODECS: dict[str, str] = {"mulaw": "pcm_mulaw", "alaw": "pcm_alaw"}
TELEPHONE_RATE = 8000


class UnsupportedAudio(ValueError):
    """A media format this bridge cannot carry (only G.711 μ-law / A-law are)."""


def codec_name(encoding: str) -> str:
    try:
        return _CODECS[encoding]
    except KeyError:
        raise UnsupportedAudio(f"unsupported telephone audio encoding {encoding!r}; use μ-law or A-law") from None


class PhoneDecoder:
    """G.711 bytes from the carrier -> mono float32 at 16 kHz (what the conversation takes)."""

    def __init__(self, encoding: Encoding = "mulaw", rate: int = TELEPHONE_RATE) -> None:
        self._codec = av.CodecContext.create(codec_name(encoding), "r")
        self._codec.sample_rate = rate
        self._codec.layout = "mono"
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=INPUT_SAMPLE_RATE)

    def decode(self, payload: bytes) -> np.ndarray:
        if not payload:
            return np.zeros(0, np.float32)
        parts = [out.to_ndarray().reshape(-1)
                 for frame in self._codec.decode(av.Packet(payload))
                 for out in self._resampler.resample(frame)]
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)


class PhoneEncoder:
    """One response's mono float32 PCM (any rate) -> G.711 bytes at the carrier's rate.

    G.711 is one byte per sample, so byte counts are sample counts. `flush` returns what the
    resampler still holds (the end of the response).
    """

    def __init__(self, encoding: Encoding = "mulaw", rate: int = TELEPHONE_RATE) -> None:
        self.rate = rate
        self._codec = av.CodecContext.create(codec_name(encoding), "w")
        self._codec.sample_rate = rate
        self._codec.layout = "mono"
        self._codec.format = "s16"
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        self._input_rate: int | None = None

    def encode(self, pcm: np.ndarray, sample_rate: int) -> bytes:
        if self._input_rate is not None and sample_rate != self._input_rate:
            raise ValueError(f"one response's audio has one rate ({self._input_rate}), got {sample_rate}")
        self._input_rate = sample_rate
        samples = np.ascontiguousarray(np.clip(pcm, -1.0, 1.0), dtype=np.float32).reshape(1, -1)
        if samples.size == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.sample_rate = sample_rate
        return self._encode(self._resampler.resample(frame))

    def flush(self) -> bytes:
        if self._input_rate is None:
            return b""
        return self._encode(self._resampler.resample(None))

    def _encode(self, frames: list[av.AudioFrame]) -> bytes:
        out = bytearray()
        for frame in frames:
            frame.pts = None
            for packet in self._codec.encode(frame):
                out += bytes(packet)
        return bytes(out)


def silence_byte(encoding: Encoding) -> int:
    """The G.711 byte of digital silence (0xFF in μ-law, 0xD5 in A-law), from the codec itself."""
    encoder = PhoneEncoder(encoding)
    return encoder.encode(np.zeros(TELEPHONE_RATE // 50, np.float32), TELEPHONE_RATE)[0]
