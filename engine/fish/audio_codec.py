"""What the TTS pipeline needs from a codec, whichever the checkpoint family ships: the modded
DAC (`engine.fish.codec.Codec`, S1-mini and S2-Pro) or the Firefly VQGAN
(`engine.fish.firefly.FireflyCodec`, fish-speech-1.5). `StreamingDecoder` drives either."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class AudioCodec(Protocol):
    @property
    def sample_rate(self) -> int: ...

    @property
    def hop_length(self) -> int:
        """Audio samples per code frame."""
        ...

    @property
    def num_codebooks(self) -> int: ...

    @property
    def codebook_sizes(self) -> tuple[int, ...]: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, audio: Tensor) -> Tensor:
        """Audio at `sample_rate`, [L] or [B, L] -> codes [K, T] or [B, K, T]."""
        ...

    def decode(self, codes: Tensor) -> Tensor:
        """Codes [K, T] or [B, K, T] -> float32 audio [T · hop_length] or [B, T · hop_length]."""
        ...

    def check_codes(self, codes: Tensor) -> Tensor:
        """Validated, range-limited [B, K, T] long codes on the codec's device (a new tensor)."""
        ...

    def decode_codes(self, codes: Tensor, state=None) -> Tensor:
        """Checked codes -> audio [B, 1, T · hop_length]; `state` carries a stream's context."""
        ...
