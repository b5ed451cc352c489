"""Exact incremental decoding: audio for new code frames as they arrive.

Every layer of the decode path is causal, so the codec can carry state between calls instead of
re-decoding: the tail of each causal conv's input, one input frame per transposed conv, and the
last window-1 keys/values (with absolute positions) of the post-module transformer. Pushing
frames in any split gives the same samples as `Codec.decode` on all of them, and each push costs
only its own frames.
"""
from __future__ import annotations

import torch
from torch import Tensor

from engine.fish.codec.layers import StreamState
from engine.fish.audio_codec import AudioCodec


class StreamingDecoder:
    """One per utterance (or per request, to keep chunk boundaries seamless). Works for any
    `AudioCodec` whose decode layers take a `StreamState` (the modded DAC and the Firefly VQGAN)."""

    def __init__(self, codec: AudioCodec) -> None:
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next push starts a new utterance at position 0."""
        self._state = StreamState()
        self._batch: int | None = None
        self.frames_decoded = 0

    @torch.inference_mode()
    def push(self, codes: Tensor) -> Tensor:
        """Codes [K, n] -> float32 audio [n · hop_length] continuing the previous pushes
        ([B, K, n] -> [B, n · hop_length]; the batch size must stay the same)."""
        batched = codes.dim() == 3
        checked = self.codec.check_codes(codes)
        if self._batch is None:
            self._batch = checked.shape[0]
        elif checked.shape[0] != self._batch:
            raise ValueError(f"batch size changed from {self._batch} to {checked.shape[0]} mid-stream")
        n = checked.shape[-1]
        if n == 0:
            audio = torch.zeros(checked.shape[0], 0, device=self.codec.device)
        else:
            audio = self.codec.decode_codes(checked, self._state)[:, 0].float()
            self.frames_decoded += n
        return audio if batched else audio[0]
