"""The quantizer between encoder and decoder (spec §5.4).

Encode: downsample (×4 fewer frames) -> pre_module -> semantic VQ stage(s) -> residual VQ stages.
Decode: sum of per-stage `out_proj(codebook[code])` -> post_module -> upsample (×4 frames).

Each VQ stage is factorised (1×1 projection to an 8-dim space) with an L2-normalised lookup.
For decoding, the per-stage projections are fused once (`fold`) into one gather and
one matmul over all stages.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.fish.codec.config import CodecConfig
from engine.fish.codec.layers import CausalConv1d, CausalConvTranspose1d, ConvNeXtBlock, StreamState
from engine.fish.codec.transformer import WindowLimitedTransformer


class WNPointwiseConv(nn.Module):
    """1×1 conv with weight norm under the legacy names `weight_g` / `weight_v` that the
    published file uses for the VQ projections."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        v = torch.empty(out_channels, in_channels, 1)
        nn.init.kaiming_uniform_(v, a=5 ** 0.5)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("folded_weight", None, persistent=False)

    def fold(self) -> None:
        with torch.no_grad():
            v = self.weight_v
            self.folded_weight = v * (self.weight_g / torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True))

    def clear_folded(self) -> None:
        self.folded_weight = None

    @property
    def weight(self) -> Tensor:
        if self.folded_weight is not None:
            return self.folded_weight
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.weight, self.bias)


class VectorQuantizer(nn.Module):
    """One stage: project to codebook space, pick the nearest L2-normalised codebook row,
    project the (un-normalised) row back."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.in_proj = WNPointwiseConv(input_dim, codebook_dim)
        self.out_proj = WNPointwiseConv(codebook_dim, input_dim)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, D, T) -> (codes (B, T), quantised (B, D, T))."""
        z_e = self.in_proj(z)
        b, d, t = z_e.shape
        enc = F.normalize(z_e.transpose(1, 2).reshape(-1, d))
        book = F.normalize(self.codebook.weight)
        # squared distance between unit vectors, written as upstream does so ties break the same way
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        codes = (-dist).max(1)[1].view(b, t)
        z_q = self.codebook(codes).transpose(1, 2)
        z_q = z_e + (z_q - z_e)  # upstream's straight-through form; same value up to rounding, kept for exact codes
        return codes, self.out_proj(z_q)

    def dequantize(self, codes: Tensor) -> Tensor:
        """codes (B, T) -> (B, D, T)."""
        return self.out_proj(self.codebook(codes).transpose(1, 2))


class ResidualVQ(nn.Module):
    """Stages applied one after another to what the previous ones left unexplained."""

    def __init__(self, n_stages: int, input_dim: int, codebook_size: int, codebook_dim: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(
            VectorQuantizer(input_dim, codebook_size, codebook_dim) for _ in range(n_stages))

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z (B, D, T) -> (codes (B, n_stages, T), sum of quantised stages (B, D, T))."""
        residual, total, codes = z, torch.zeros_like(z), []
        for stage in self.quantizers:
            c, z_q = stage.quantize(residual)
            total = total + z_q
            residual = residual - z_q
            codes.append(c)
        return torch.stack(codes, dim=1), total


class DownsampleQuantizer(nn.Module):
    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        dim = cfg.latent_dim
        self.downsample = nn.ModuleList(
            nn.ModuleList([CausalConv1d(dim, dim, f, stride=f, weight_normed=False),
                           ConvNeXtBlock(dim, cfg.convnext_kernel, cfg.convnext_mlp_ratio)])
            for f in cfg.quantizer_downsample)
        self.pre_module = self._transformer(cfg, cfg.pre_module_layers)
        self.semantic_quantizer = ResidualVQ(cfg.semantic_codebooks, dim, cfg.semantic_codebook_size,
                                             cfg.codebook_dim)
        self.quantizer = ResidualVQ(cfg.residual_codebooks, dim, cfg.residual_codebook_size, cfg.codebook_dim)
        self.post_module = self._transformer(cfg, cfg.post_module_layers)
        self.upsample = nn.ModuleList(
            nn.ModuleList([CausalConvTranspose1d(dim, dim, f, stride=f, weight_normed=False),
                           ConvNeXtBlock(dim, cfg.convnext_kernel, cfg.convnext_mlp_ratio)])
            for f in reversed(cfg.quantizer_downsample))
        # fused decode tables (fold): every stage's codebook stacked, and every
        # stage's out_proj side by side, so decoding is one gather and one matmul
        self.register_buffer("stacked_codebooks", None, persistent=False)
        self.register_buffer("code_offsets", None, persistent=False)
        self.register_buffer("fused_out_weight", None, persistent=False)
        self.register_buffer("fused_out_bias", None, persistent=False)

    @staticmethod
    def _transformer(cfg: CodecConfig, n_layers: int) -> nn.Module:
        if n_layers == 0:
            return nn.Identity()
        return WindowLimitedTransformer(cfg.transformer(cfg.latent_dim, n_layers, cfg.quantizer_window))

    @property
    def stages(self) -> list[VectorQuantizer]:
        return [*self.semantic_quantizer.quantizers, *self.quantizer.quantizers]

    def fold(self) -> None:
        stages = self.stages
        with torch.no_grad():
            self.stacked_codebooks = torch.cat([s.codebook.weight for s in stages])
            sizes = torch.tensor([s.codebook_size for s in stages])
            self.code_offsets = (torch.cumsum(sizes, 0) - sizes).to(self.stacked_codebooks.device)
            # (D, Σ codebook_dim): stage i's 1×1 out_proj acts on its own slice of the concatenation
            self.fused_out_weight = torch.cat([s.out_proj.weight[:, :, 0] for s in stages], dim=1)
            self.fused_out_bias = torch.stack([s.out_proj.bias for s in stages]).sum(0)

    def clear_folded(self) -> None:
        self.stacked_codebooks = self.code_offsets = self.fused_out_weight = self.fused_out_bias = None

    def quantize(self, z: Tensor) -> Tensor:
        """Encoder latents (B, D, T) -> codes (B, K, T / downsampling)."""
        for conv, block in self.downsample:
            z = block(conv(z))
        z = self.pre_module(z)
        semantic_codes, semantic_z = self.semantic_quantizer.quantize(z)
        residual_codes, _ = self.quantizer.quantize(z - semantic_z)
        return torch.cat([semantic_codes, residual_codes], dim=1)

    def dequantize(self, codes: Tensor, state: StreamState | None = None) -> Tensor:
        """Codes (B, K, T), already clamped -> decoder input (B, D, T · downsampling)."""
        if self.fused_out_weight is None:
            self.fold()
        b, k, t = codes.shape
        rows = codes + self.code_offsets.view(1, k, 1)
        vectors = F.embedding(rows.transpose(1, 2), self.stacked_codebooks)  # (B, T, K, codebook_dim)
        z = F.linear(vectors.reshape(b, t, -1), self.fused_out_weight, self.fused_out_bias).transpose(1, 2)
        z = self.post_module(z, state) if not isinstance(self.post_module, nn.Identity) else z
        for conv, block in self.upsample:
            z = block(conv(z, state), state)
        return z
