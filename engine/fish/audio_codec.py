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


class CodecBase:
    """What both codecs implement the same way (mixed into their nn.Module): weight-norm weights
    folded once, and a whole-utterance decode built on `check_codes` and `decode_codes`."""

    _folded: bool = False

    def fold_weight_norm(self):
        """Compute every folded constant (weight-normed weights g·v/‖v‖, and what each layer keeps)
        once. Done by the loaders (and lazily by encode/decode); call again after editing
        parameters in place. Loading a state dict clears them."""
        for module in self.modules():  # type: ignore[attr-defined]
            if module is not self and hasattr(module, "fold"):
                module.fold()
        self._folded = True
        return self

    def _ensure_folded(self) -> None:
        if not self._folded:
            self.fold_weight_norm()

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes [K, T] -> float32 audio [T · hop_length] (or [B, K, T] -> [B, T · hop_length])."""
        batched = codes.dim() == 3
        checked = self.check_codes(codes)  # type: ignore[attr-defined]
        if checked.shape[-1] == 0:
            audio = torch.zeros(checked.shape[0], 0, device=self.device)  # type: ignore[attr-defined]
        else:
            audio = self.decode_codes(checked)[:, 0].float()  # type: ignore[attr-defined]
        return audio if batched else audio[0]
