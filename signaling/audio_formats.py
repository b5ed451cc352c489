"""The Realtime API's audio formats on a WebSocket: `audio/pcm` (16-bit little-endian mono at
24 kHz), `audio/pcmu` (G.711 μ-law, 8 kHz) and `audio/pcma` (G.711 A-law, 8 kHz).

Input becomes the conversation's 16 kHz float32; output (float32 at the TTS rate) becomes bytes in
the session's format. Resampling and G.711 go through PyAV (FFmpeg's resampler and codecs); one
converter per stream carries the resampler's state, so chunk edges leave no clicks.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import av
import numpy as np

from engine.agent.vad import INPUT_SAMPLE_RATE

FormatType = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
_G711 = {"audio/pcmu": "pcm_mulaw", "audio/pcma": "pcm_alaw"}
_BETA_NAMES = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


@dataclasses.dataclass(frozen=True)
class AudioFormat:
    type: FormatType = "audio/pcm"

    @property
    def rate(self) -> int:
        return 24_000 if self.type == "audio/pcm" else 8_000

    def describe(self) -> dict[str, Any]:
        return {"type": self.type, "rate": self.rate}

    @classmethod
    def parse(cls, value: Any) -> AudioFormat:
        """A GA format object ({"type": "audio/pcm", "rate": 24000}) or a beta name ("pcm16")."""
        if isinstance(value, str):
            value = {"type": _BETA_NAMES.get(value, value)}
        if not isinstance(value, dict) or value.get("type") not in ("audio/pcm", "audio/pcmu", "audio/pcma"):
            raise ValueError("must be {\"type\": \"audio/pcm\" | \"audio/pcmu\" | \"audio/pcma\"}")
        fmt = cls(value["type"])
        rate = value.get("rate")
        if rate is not None and rate != fmt.rate:
            raise ValueError(f"{fmt.type} is {fmt.rate} Hz; got rate {rate!r}")
        return fmt


def _resampler(rate: int) -> av.AudioResampler:
    return av.AudioResampler(format="s16", layout="mono", rate=rate)


def _frame(pcm16: np.ndarray, rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(pcm16.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    return frame


class InputDecoder:
    """Client audio bytes -> float32 mono at 16 kHz."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._resampler = _resampler(INPUT_SAMPLE_RATE)
        self._codec = None
        if fmt.type in _G711:
            self._codec = av.CodecContext.create(_G711[fmt.type], "r")
            self._codec.sample_rate = fmt.rate
            self._codec.layout = "mono"
        self._odd = b""  # a 16-bit sample split across two appends

    def decode(self, data: bytes) -> np.ndarray:
        if self._codec is not None:
            frames = list(self._codec.decode(av.Packet(data))) if data else []
        else:
            data, self._odd = self._odd + data, b""
            if len(data) % 2:
                data, self._odd = data[:-1], data[-1:]
            pcm = np.frombuffer(data, dtype="<i2")
            frames = [_frame(pcm, self.format.rate)] if len(pcm) else []
        out = [f.to_ndarray().reshape(-1) for frame in frames for f in self._resampler.resample(frame)]
        if not out:
            return np.zeros(0, np.float32)
        return np.concatenate(out).astype(np.float32) / 32768.0


class OutputEncoder:
    """Float32 mono at the TTS rate -> bytes in the session's output format."""

    def __init__(self, fmt: AudioFormat, source_rate: int) -> None:
        self.format = fmt
        self.source_rate = source_rate
        self._resampler = _resampler(fmt.rate)
        self._codec = None
        if fmt.type in _G711:
            self._codec = av.CodecContext.create(_G711[fmt.type], "w")
            self._codec.sample_rate = fmt.rate
            self._codec.layout = "mono"
            self._codec.format = "s16"

    def encode(self, pcm: np.ndarray, *, final: bool = False) -> bytes:
        frames = []
        if len(pcm):
            pcm16 = (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype(np.int16)
            frames = self._resampler.resample(_frame(pcm16, self.source_rate))
        if final:
            frames = list(frames) + list(self._resampler.resample(None))
        if not frames:
            return b""
        if self._codec is None:
            return b"".join(f.to_ndarray().astype("<i2").tobytes() for f in frames)
        return b"".join(bytes(p) for f in frames for p in self._codec.encode(f))
