"""The Firefly VQGAN of fish-speech-1.5 (spec §5.9): 44.1 kHz mono audio <-> 8 FSQ codebooks of
1000 codes at 2048 samples per frame.

    encode: log-mel -> ConvNeXt backbone -> 2 × (strided causal conv + ConvNeXt) -> grouped FSQ
    decode: FSQ values -> 2 × (transposed conv + ConvNeXt) -> causal HiFi-GAN-style head

Parameter names follow the published generator file, so `state_dict()` of a fresh
`FireflyCodec(FireflyConfig())` lists exactly its keys. Every decode layer is causal and takes an
optional `StreamState`, which makes `StreamingDecoder` exact for this codec too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.fish.audio_codec import CodecBase
from engine.fish.codec.layers import CausalConv1d, CausalConvTranspose1d, ConvNeXtBlock, StreamState
from engine.fish.firefly.config import FireflyConfig
from engine.fish.firefly.mel import LogMelSpectrogram


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, T)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None] * ((x - mean) / torch.sqrt(var + self.eps)) + self.bias[:, None]


class ConvNeXtEncoder(nn.Module):
    """Per stage: a downsample layer (the stem: causal conv + norm; later: norm + 1×1 conv to the
    next width), then ConvNeXt blocks; a final norm. Time resolution never changes."""

    def __init__(self, cfg: FireflyConfig) -> None:
        super().__init__()
        dims = cfg.backbone_dims
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            CausalConv1d(cfg.n_mels, dims[0], 7, weight_normed=False), ChannelsFirstLayerNorm(dims[0]))])
        for a, b in zip(dims, dims[1:]):
            self.downsample_layers.append(nn.Sequential(ChannelsFirstLayerNorm(a), nn.Conv1d(a, b, 1)))
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(d, cfg.backbone_kernel) for _ in range(n)))
            for d, n in zip(dims, cfg.backbone_depths))
        self.norm = ChannelsFirstLayerNorm(dims[-1])

    def forward(self, x: Tensor) -> Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x)


class FSQGroup(nn.Module):
    """One group of the grouped FSQ: a 64 -> 4 projection, four scalar quantisers with levels
    [8, 5, 5, 5] (index = mixed-radix number of the digits), a 4 -> 64 projection back."""

    def __init__(self, dim: int, levels: tuple[int, ...]) -> None:
        super().__init__()
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)
        basis = [1]
        for n in levels[:-1]:
            basis.append(basis[-1] * n)
        self.levels, self.basis = levels, tuple(basis)

    def _constants(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        levels = torch.tensor(self.levels, dtype=torch.float32, device=like.device)
        basis = torch.tensor(self.basis, dtype=torch.long, device=like.device)
        return levels, torch.div(levels, 2, rounding_mode="floor"), basis

    @staticmethod
    def _bound(z: Tensor, levels: Tensor) -> Tensor:
        # tanh squashes z into (-h, h) - offset, so rounding lands on exactly `levels` integers
        half = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        return torch.tanh(z + torch.atanh(offset / half)) * half - offset

    def encode(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> indices (B, T)."""
        levels, half, basis = self._constants(x)
        # the residual wrapper bounds once, the scalar quantiser again (both are upstream's)
        z = self._bound(self._bound(self.project_in(x).float(), levels), levels)
        digits = torch.round(z) + half  # in 0 .. levels-1
        return (digits.long() * basis).sum(-1)

    def decode(self, indices: Tensor) -> Tensor:
        """indices (B, T) -> (B, T, dim)."""
        levels, half, basis = self._constants(indices)
        digits = torch.div(indices[..., None], basis, rounding_mode="floor") % levels.long()
        values = (digits.float() - half) / half
        return self.project_out(values.to(self.project_out.weight.dtype))


class GroupedFSQ(nn.Module):
    def __init__(self, cfg: FireflyConfig) -> None:
        super().__init__()
        self.rvqs = nn.ModuleList(FSQGroup(cfg.latent_dim // cfg.fsq_groups, cfg.fsq_levels)
                                  for _ in range(cfg.fsq_groups))

    def encode(self, z: Tensor) -> Tensor:
        """(B, T, D) -> codes (B, groups, T); group g reads feature slice g."""
        parts = z.chunk(len(self.rvqs), dim=-1)
        return torch.stack([g.encode(p) for g, p in zip(self.rvqs, parts)], dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (B, groups, T) -> (B, T, D)."""
        return torch.cat([g.decode(codes[:, i]) for i, g in enumerate(self.rvqs)], dim=-1)


class FireflyQuantizer(nn.Module):
    def __init__(self, cfg: FireflyConfig) -> None:
        super().__init__()
        d = cfg.latent_dim
        self.residual_fsq = GroupedFSQ(cfg)
        self.downsample = nn.ModuleList(
            nn.ModuleList([CausalConv1d(d, d, f, stride=f, weight_normed=False), ConvNeXtBlock(d)])
            for f in cfg.downsample_factors)
        self.upsample = nn.ModuleList(
            nn.ModuleList([CausalConvTranspose1d(d, d, f, f, weight_normed=False), ConvNeXtBlock(d)])
            for f in reversed(cfg.downsample_factors))

    def encode(self, z: Tensor) -> Tensor:
        for conv, block in self.downsample:
            z = block(conv(z))
        return self.residual_fsq.encode(z.transpose(1, 2))

    def decode(self, codes: Tensor, state: StreamState | None = None) -> Tensor:
        z = self.residual_fsq.decode(codes).transpose(1, 2)
        for conv, block in self.upsample:
            z = block(conv(z, state), state)
        return z


class ResBlock(nn.Module):
    """Three dilated pairs: x + conv2(silu(conv1(silu(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(CausalConv1d(channels, channels, kernel, dilation=d) for d in dilations)
        self.convs2 = nn.ModuleList(CausalConv1d(channels, channels, kernel, dilation=d) for d in dilations)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.silu(c1(F.silu(x), state)), state)
        return x


class ParallelResBlocks(nn.Module):
    """The mean of resblocks with different kernels over the same input."""

    def __init__(self, channels: int, kernels: tuple[int, ...], dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(channels, k, dilations) for k in kernels)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        return torch.stack([block(x, state) for block in self.blocks]).mean(0)


class HiFiGANHead(nn.Module):
    def __init__(self, cfg: FireflyConfig) -> None:
        super().__init__()
        ch = cfg.head_initial_channels
        self.conv_pre = CausalConv1d(cfg.latent_dim, ch, cfg.pre_conv_kernel)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernels)):
            self.ups.append(CausalConvTranspose1d(ch >> i, ch >> (i + 1), kernel, rate))
            self.resblocks.append(ParallelResBlocks(ch >> (i + 1), cfg.resblock_kernels, cfg.resblock_dilations))
        self.conv_post = CausalConv1d(ch >> len(cfg.upsample_rates), 1, cfg.post_conv_kernel)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        x = self.conv_pre(x, state)
        for up, res in zip(self.ups, self.resblocks):
            x = res(up(F.silu(x), state), state)
        return torch.tanh(self.conv_post(F.silu(x), state))


class FireflyCodec(CodecBase, nn.Module):
    """Same public surface as `engine.fish.codec.Codec` (encode, decode, check_codes,
    decode_codes, sample_rate, hop_length, num_codebooks, codebook_sizes, device, dtype), so the
    TTS pipeline and `StreamingDecoder` use either codec unchanged."""

    def __init__(self, config: FireflyConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FireflyConfig()
        self.spec_transform = LogMelSpectrogram(config.sample_rate, config.n_fft, config.win_length,
                                                config.mel_hop, config.n_mels)
        self.backbone = ConvNeXtEncoder(config)
        self.quantizer = FireflyQuantizer(config)
        self.head = HiFiGANHead(config)
        self._folded = False

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
        return self.head.conv_pre.conv.bias.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.conv_pre.conv.bias.dtype

    @torch.inference_mode()
    def encode(self, audio: Tensor) -> Tensor:
        """44.1 kHz audio [L], [B, L] or [B, 1, L] -> codes [K, T] (or [B, K, T]) with
        T = ceil((L // 512) / 4), as upstream's encoder gives them (no padding to whole frames)."""
        if audio.dim() not in (1, 2, 3) or (audio.dim() == 3 and audio.shape[1] != 1):
            raise ValueError(f"audio must be shaped [L], [B, L] or [B, 1, L], got {list(audio.shape)}")
        if not audio.is_floating_point():
            raise ValueError(f"audio must be floating point samples in [-1, 1], got {audio.dtype}")
        if audio.shape[-1] < self.hop_length:
            raise ValueError(f"audio is too short: at least {self.hop_length} samples "
                             f"({self.hop_length / self.sample_rate * 1000:.0f} ms) are needed")
        self._ensure_folded()
        x = audio.reshape(-1, audio.shape[-1]).to(self.device, torch.float32)
        mel = self.spec_transform(x).to(self.dtype)
        codes = self.quantizer.encode(self.backbone(mel))
        return codes[0] if audio.dim() == 1 else codes

    def check_codes(self, codes: Tensor) -> Tensor:
        """Codes [K, T] or [B, K, T] as a [B, K, T] long tensor on the codec's device (a new
        tensor). Codes past the 1000 FSQ entries (the model's 1024-entry heads can name them)
        are clamped to the last one, as the modded-DAC codec does for its range."""
        if codes.dim() not in (2, 3) or codes.shape[-2] != self.num_codebooks:
            raise ValueError(f"codes must be shaped [{self.num_codebooks}, T] or [B, {self.num_codebooks}, T], "
                             f"got {list(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex():
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        codes = (codes if codes.dim() == 3 else codes[None]).to(self.device, torch.long)
        return codes.clamp(0, self.config.codebook_size - 1)

    def decode_codes(self, codes: Tensor, state: StreamState | None = None) -> Tensor:
        """Checked codes [B, K, T] -> audio [B, 1, T · hop_length] in the model dtype."""
        self._ensure_folded()
        return self.head(self.quantizer.decode(codes, state), state)
