"""The modded-DAC codec (spec §5): 44.1 kHz mono audio <-> K codebooks at hop 2048.

Module and parameter names follow the published `codec.pth`, so `state_dict()` of a fresh
`Codec(CodecConfig())` lists exactly the published keys (plus nothing else).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.fish.audio_codec import CodecBase
from engine.fish.codec.config import CodecConfig
from engine.fish.codec.layers import CausalConv1d, CausalConvTranspose1d, ResidualUnit, Snake1d, StreamState
from engine.fish.codec.quantizer import DownsampleQuantizer
from engine.fish.codec.transformer import WindowLimitedTransformer


class EncoderBlock(nn.Module):
    """Residual units on dim/2 channels, then a strided conv to dim (and an optional transformer)."""

    def __init__(self, cfg: CodecConfig, dim: int, stride: int, n_transformer_layers: int) -> None:
        super().__init__()
        half = dim // 2
        self.block = nn.ModuleList([
            *(ResidualUnit(half, d, cfg.residual_kernel) for d in cfg.residual_dilations),
            Snake1d(half),
            CausalConv1d(half, dim, 2 * stride, stride=stride),
            WindowLimitedTransformer(cfg.transformer(dim, n_transformer_layers, cfg.encoder_window))
            if n_transformer_layers else nn.Identity(),
        ])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.block:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dim = cfg.encoder_dim
        blocks: list[nn.Module] = [CausalConv1d(1, dim, cfg.encoder_in_kernel)]
        for stride, n_layers in zip(cfg.encoder_strides, cfg.encoder_transformer_layers):
            dim *= 2
            blocks.append(EncoderBlock(cfg, dim, stride, n_layers))
        blocks += [Snake1d(dim), CausalConv1d(dim, cfg.latent_dim, cfg.encoder_out_kernel)]
        self.block = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.block:
            x = layer(x)
        return x


class DecoderBlock(nn.Module):
    """Snake, transposed conv upsampling by `stride`, then residual units."""

    def __init__(self, cfg: CodecConfig, in_dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([
            Snake1d(in_dim),
            CausalConvTranspose1d(in_dim, out_dim, 2 * stride, stride),
            *(ResidualUnit(out_dim, d, cfg.residual_kernel) for d in cfg.residual_dilations),
        ])

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        snake, up, *units = self.block
        x = up(snake(x), state)
        for unit in units:
            x = unit(x, state)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dim = cfg.decoder_dim
        layers: list[nn.Module] = [CausalConv1d(cfg.latent_dim, dim, cfg.decoder_in_kernel)]
        for stride in cfg.decoder_strides:
            layers.append(DecoderBlock(cfg, dim, dim // 2, stride))
            dim //= 2
        layers += [Snake1d(dim), CausalConv1d(dim, 1, cfg.decoder_out_kernel), nn.Tanh()]
        self.model = nn.ModuleList(layers)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        first, *blocks, snake, last, tanh = self.model
        x = first(x, state)
        for block in blocks:
            x = block(x, state)
        return tanh(last(snake(x), state))


class Codec(CodecBase, nn.Module):
    """Encoder + quantizer + decoder. `encode`/`decode` are the public entry points; streaming
    decode lives in `engine.fish.codec.streaming.StreamingDecoder`."""

    def __init__(self, config: CodecConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CodecConfig()
        self.encoder = Encoder(config)
        self.quantizer = DownsampleQuantizer(config)
        self.decoder = Decoder(config)
        self._folded = False
        self.register_load_state_dict_post_hook(Codec._after_load)

    @staticmethod
    def _after_load(module: Codec, _incompatible) -> None:
        module.clear_folded()  # folded copies of the old weights are stale now

    # --- facts callers need
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return self.config.codebook_sizes

    @property
    def device(self) -> torch.device:
        return self.decoder.model[0].conv.bias.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.model[0].conv.bias.dtype

    # --- per-call constants computed once
    def clear_folded(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "clear_folded"):
                module.clear_folded()
        self._folded = False

    # --- encode
    @torch.inference_mode()
    def encode(self, audio: Tensor) -> Tensor:
        """44.1 kHz audio [L], [B, L] or [B, 1, L] -> codes [K, T] (or [B, K, T]) with
        T = ceil(L / hop_length); the audio is right-padded with zeros to whole frames."""
        if audio.dim() not in (1, 2, 3) or (audio.dim() == 3 and audio.shape[1] != 1):
            raise ValueError(f"audio must be shaped [L], [B, L] or [B, 1, L], got {list(audio.shape)}")
        if audio.shape[-1] == 0:
            raise ValueError("audio is empty")
        if not audio.is_floating_point():
            raise ValueError(f"audio must be floating point samples in [-1, 1], got {audio.dtype}")
        self._ensure_folded()
        x = audio.reshape(-1, 1, audio.shape[-1]).to(self.device, self.dtype)
        hop = self.hop_length
        x = F.pad(x, (0, -x.shape[-1] % hop))
        codes = self.quantizer.quantize(self.encoder(x))
        return codes[0] if audio.dim() == 1 else codes

    # --- decode
    def check_codes(self, codes: Tensor) -> Tensor:
        """Codes [K, T] or [B, K, T] as a clamped [B, K, T] long tensor on the codec's device (a
        new tensor: the caller's is never modified). Out-of-range codes are clamped to each
        codebook's range, as upstream does."""
        if codes.dim() not in (2, 3) or codes.shape[-2] != self.num_codebooks:
            raise ValueError(f"codes must be shaped [{self.num_codebooks}, T] or [B, {self.num_codebooks}, T], "
                             f"got {list(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        codes = (codes if codes.dim() == 3 else codes[None]).to(self.device, torch.long)
        limits = self._code_limits(codes.device)
        return torch.minimum(codes.clamp(min=0), limits)

    def _code_limits(self, device: torch.device) -> Tensor:
        cached = getattr(self, "_limits", None)
        if cached is None or cached.device != device:
            with torch.inference_mode(False):
                cached = torch.tensor(self.codebook_sizes, device=device).sub(1).view(1, -1, 1)
            self._limits = cached
        return cached

    def decode_codes(self, codes: Tensor, state: StreamState | None = None) -> Tensor:
        """Checked codes [B, K, T] -> audio [B, 1, T · hop_length] in the model dtype."""
        self._ensure_folded()
        return self.decoder(self.quantizer.dequantize(codes, state), state)
