"""A tiny random codec in the published `codec.pth` layout, for tests and the tiny checkpoint.

Same architecture and hop (2048 samples per frame) as the published codec, with small widths.
The file mirrors the published one: new-style weight-norm names for the convs, legacy
`weight_g`/`weight_v` for the VQ projections, and the stale RoPE/mask buffers (tiny shapes) that
the loader must ignore. Weights are scaled so signals keep a sensible size through the network
and attention/ConvNeXt branches contribute visibly (tests of streaming state need that).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from engine.fish.codec.config import CodecConfig
from engine.fish.codec.model import Codec

STALE_BUFFER_POSITIONS = 32


def tiny_codec_config(num_codebooks: int = 10, semantic_codebook_size: int = 64, residual_codebook_size: int = 32,
                      encoder_dim: int = 8, latent_dim: int = 128, decoder_dim: int = 64,
                      encoder_transformer_layers: int = 1, quantizer_transformer_layers: int = 2,
                      codebook_dim: int = 8) -> CodecConfig:
    if num_codebooks < 2:
        raise ValueError("a codec needs the semantic codebook and at least one residual codebook")
    return CodecConfig(encoder_dim=encoder_dim, encoder_transformer_layers=(0, 0, 0, encoder_transformer_layers),
                       latent_dim=latent_dim, pre_module_layers=quantizer_transformer_layers,
                       post_module_layers=quantizer_transformer_layers, semantic_codebooks=1,
                       semantic_codebook_size=semantic_codebook_size, residual_codebooks=num_codebooks - 1,
                       residual_codebook_size=residual_codebook_size, codebook_dim=codebook_dim,
                       decoder_dim=decoder_dim)


def _random_tensor(key: str, shape: torch.Size, gen: torch.Generator) -> Tensor:
    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    def normal(std: float) -> Tensor:
        return std * torch.randn(shape, generator=gen)

    name = key.rsplit(".", 1)[-1]
    if name in ("original1", "weight_v") or key.endswith("codebook.weight"):
        return normal(1.0)
    if name in ("original0", "weight_g"):  # per-channel norm of the effective weight
        # residual branches (the 1x1 conv closing each unit) stay small so the sum does not grow
        return uniform(0.2, 0.4) if ".block.3.conv." in key else uniform(0.6, 1.2)
    if name == "alpha":
        return uniform(0.5, 2.0)
    if name == "gamma":
        return uniform(0.2, 0.6)
    if key.endswith(("norm.weight", "attention_norm.weight", "ffn_norm.weight")):
        return 1.0 + normal(0.1)
    if name == "bias":
        return normal(0.05)
    if ".upsample." in key:  # transposed conv (in, out, k == stride): each output sees `in` inputs
        return normal(1.0 / math.sqrt(shape[0]))
    return normal(1.0 / math.sqrt(math.prod(shape[1:])))


def _stale_buffers(prefix: str, head_dim: int) -> dict[str, Tensor]:
    n = STALE_BUFFER_POSITIONS
    angles = torch.outer(torch.arange(n).float(), 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.stack([angles.cos(), angles.sin()], dim=-1).to(torch.bfloat16)
    return {f"{prefix}freqs_cis": freqs, f"{prefix}causal_mask": torch.ones(n, n, dtype=torch.bool).tril()}


def make_tiny_codec_state_dict(seed: int = 0, num_codebooks: int = 10, semantic_codebook_size: int = 64,
                               residual_codebook_size: int = 32, **shape) -> dict[str, Tensor]:
    """Random weights in the published layout (see module doc). `shape` goes to tiny_codec_config."""
    config = tiny_codec_config(num_codebooks, semantic_codebook_size, residual_codebook_size, **shape)
    with torch.device("meta"):
        layout = Codec(config).state_dict()
    transformers = sorted({k.split("layers.")[0] for k in layout if ".layers." in k or k.startswith("layers.")})
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key, like in layout.items():
        for prefix in transformers:
            if key.startswith(prefix) and f"{prefix}freqs_cis" not in state:
                state.update(_stale_buffers(prefix, config.head_dim))
        state[key] = _random_tensor(key, like.shape, gen)
    # a quiet last conv keeps the output tanh out of saturation
    last = f"decoder.model.{len(config.decoder_strides) + 2}.conv.parametrizations.weight.original0"
    state[last] = state[last] * 0.4
    return state


def write_tiny_codec(path: str | os.PathLike[str], seed: int = 0, **kwargs) -> Path:
    """Save make_tiny_codec_state_dict(seed, **kwargs) as a `codec.pth` and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_tiny_codec_state_dict(seed, **kwargs), path)
    return path
