"""Shapes of the modded-DAC codec (spec §5), and how to read them off a state dict.

Defaults are the published `codec.pth`; `CodecConfig.from_state_dict` derives every size from
tensor shapes so a smaller or larger codec in the same layout loads too. What the weights cannot
tell (attention head size, attention windows, sample rate, dilations) keeps the published value
unless the caller overrides it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

from torch import Tensor

from engine.fish.codec.errors import CodecCheckpointError

WN_NEW = (".parametrizations.weight.original0", ".parametrizations.weight.original1")
WN_OLD = (".weight_g", ".weight_v")


@dataclasses.dataclass(frozen=True)
class TransformerShape:
    """One window-limited codec transformer."""

    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    ffn_dim: int
    window: int
    rope_base: float
    norm_eps: float


@dataclasses.dataclass(frozen=True)
class CodecConfig:
    sample_rate: int = 44100
    # encoder: conv(1 -> encoder_dim), one block per stride doubling the channels, snake, conv -> latent
    encoder_dim: int = 64
    encoder_strides: tuple[int, ...] = (2, 4, 8, 8)
    encoder_transformer_layers: tuple[int, ...] = (0, 0, 0, 4)
    encoder_in_kernel: int = 7
    encoder_out_kernel: int = 3
    latent_dim: int = 1024
    # quantizer: causal strided convs + ConvNeXt, transformers, semantic and residual VQ stages
    quantizer_downsample: tuple[int, ...] = (2, 2)
    pre_module_layers: int = 8
    post_module_layers: int = 8
    semantic_codebooks: int = 1
    semantic_codebook_size: int = 4096
    residual_codebooks: int = 9
    residual_codebook_size: int = 1024
    codebook_dim: int = 8
    convnext_kernel: int = 7
    convnext_mlp_ratio: int = 4
    # decoder: conv(latent -> decoder_dim), one block per stride halving the channels, snake, conv -> 1
    decoder_dim: int = 1536
    decoder_strides: tuple[int, ...] = (8, 8, 4, 2)
    decoder_in_kernel: int = 7
    decoder_out_kernel: int = 7
    # shared by every residual unit and transformer
    residual_kernel: int = 7
    residual_dilations: tuple[int, ...] = (1, 3, 9)
    ffn_ratio: int = 3
    head_dim: int = 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    encoder_window: int = 512
    quantizer_window: int = 128

    def __post_init__(self) -> None:
        if len(self.encoder_transformer_layers) != len(self.encoder_strides):
            raise ValueError("encoder_transformer_layers needs one entry per encoder stride")
        dims = [self.encoder_dim * 2 ** (i + 1) for i, n in enumerate(self.encoder_transformer_layers) if n]
        for dim in dims + ([self.latent_dim] if self.pre_module_layers or self.post_module_layers else []):
            if dim % self.head_dim:
                raise ValueError(f"transformer width {dim} is not a multiple of head_dim {self.head_dim}")
        if self.decoder_dim % 2 ** len(self.decoder_strides):
            raise ValueError("decoder_dim must halve cleanly once per decoder stride")
        if self.encoder_window < 1 or self.quantizer_window < 1:
            raise ValueError("attention windows must be positive")

    # --- derived sizes
    @property
    def encoder_hop(self) -> int:
        return math.prod(self.encoder_strides)

    @property
    def hop_length(self) -> int:
        """Audio samples per code frame (2048 published)."""
        return self.encoder_hop * math.prod(self.quantizer_downsample)

    @property
    def num_codebooks(self) -> int:
        return self.semantic_codebooks + self.residual_codebooks

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.semantic_codebook_size,) * self.semantic_codebooks + \
            (self.residual_codebook_size,) * self.residual_codebooks

    def transformer(self, dim: int, n_layers: int, window: int) -> TransformerShape:
        return TransformerShape(dim=dim, n_layers=n_layers, n_heads=dim // self.head_dim, head_dim=self.head_dim,
                                ffn_dim=dim * self.ffn_ratio, window=window, rope_base=self.rope_base,
                                norm_eps=self.norm_eps)

    # --- reading a state dict
    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], **overrides) -> CodecConfig:
        """Derive every size from tensor shapes; `overrides` set what weights cannot say
        (head_dim, windows, sample_rate, rope_base, norm_eps, residual_dilations)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown codec setting(s): {', '.join(sorted(unknown))}")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        try:
            found = _infer(shapes)
        except KeyError as exc:
            raise CodecCheckpointError(f"not a modded-DAC codec state dict: no tensor {exc.args[0]!r}") from None
        try:
            return cls(**{**found, **overrides})
        except (TypeError, ValueError) as exc:
            raise CodecCheckpointError(f"codec state dict describes an unusable model: {exc}") from None


def _wn_weight(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> tuple[int, ...] | None:
    """Shape of a weight-normed weight (v) under either spelling, or None."""
    for key in (prefix + WN_NEW[1], prefix + WN_OLD[1], prefix + ".weight"):
        if key in shapes:
            return shapes[key]
    return None


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    """Number of consecutive numbered children `prefix.{i}.` present."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    n = 0
    while n in found:
        n += 1
    return n


def _require(shape: tuple[int, ...] | None, key: str) -> tuple[int, ...]:
    if shape is None:
        raise KeyError(key)
    return shape


def _stride_of(kernel: int, key: str) -> int:
    if kernel % 2:
        raise CodecCheckpointError(f"{key}: kernel {kernel} is not twice a stride")
    return kernel // 2


def _infer(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    found: dict = {}
    first = _require(_wn_weight(shapes, "encoder.block.0.conv"), "encoder.block.0.conv" + WN_NEW[1])
    found["encoder_dim"], found["encoder_in_kernel"] = first[0], first[2]

    strides, enc_layers = [], []
    i = 1
    while (down := _wn_weight(shapes, f"encoder.block.{i}.block.4.conv")) is not None:
        strides.append(_stride_of(down[2], f"encoder.block.{i}.block.4.conv"))
        enc_layers.append(_count(shapes, f"encoder.block.{i}.block.5.layers"))
        i += 1
    if not strides:
        raise KeyError("encoder.block.1.block.4.conv" + WN_NEW[1])
    found["encoder_strides"], found["encoder_transformer_layers"] = tuple(strides), tuple(enc_layers)
    last = _require(_wn_weight(shapes, f"encoder.block.{i + 1}.conv"), f"encoder.block.{i + 1}.conv" + WN_NEW[1])
    found["latent_dim"], found["encoder_out_kernel"] = last[0], last[2]
    found["residual_kernel"] = _require(_wn_weight(shapes, "encoder.block.1.block.0.block.1.conv"),
                                        "encoder.block.1.block.0.block.1.conv" + WN_NEW[1])[2]

    q = "quantizer"
    n_down = _count(shapes, f"{q}.downsample")
    found["quantizer_downsample"] = tuple(
        _require(shapes.get(f"{q}.downsample.{j}.0.conv.weight"), f"{q}.downsample.{j}.0.conv.weight")[2]
        for j in range(n_down))
    if n_down:
        dw = _require(shapes.get(f"{q}.downsample.0.1.dwconv.conv.weight"), f"{q}.downsample.0.1.dwconv.conv.weight")
        pw = _require(shapes.get(f"{q}.downsample.0.1.pwconv1.weight"), f"{q}.downsample.0.1.pwconv1.weight")
        found["convnext_kernel"], found["convnext_mlp_ratio"] = dw[2], pw[0] // pw[1]
    found["pre_module_layers"] = _count(shapes, f"{q}.pre_module.layers")
    found["post_module_layers"] = _count(shapes, f"{q}.post_module.layers")

    for name, field in (("semantic_quantizer", "semantic"), ("quantizer", "residual")):
        n = _count(shapes, f"{q}.{name}.quantizers")
        if n == 0:
            raise KeyError(f"{q}.{name}.quantizers.0.codebook.weight")
        size, dim = _require(shapes.get(f"{q}.{name}.quantizers.0.codebook.weight"),
                             f"{q}.{name}.quantizers.0.codebook.weight")
        found[f"{field}_codebooks"], found[f"{field}_codebook_size"] = n, size
        found["codebook_dim"] = dim

    w1 = next((shapes[k] for k in sorted(shapes) if k.endswith(".feed_forward.w1.weight")), None)
    if w1 is not None:
        found["ffn_ratio"] = w1[0] // w1[1]

    first_dec = _require(_wn_weight(shapes, "decoder.model.0.conv"), "decoder.model.0.conv" + WN_NEW[1])
    found["decoder_dim"], found["decoder_in_kernel"] = first_dec[0], first_dec[2]
    dec_strides = []
    i = 1
    while (up := _wn_weight(shapes, f"decoder.model.{i}.block.1.conv")) is not None:
        dec_strides.append(_stride_of(up[2], f"decoder.model.{i}.block.1.conv"))
        i += 1
    found["decoder_strides"] = tuple(dec_strides)
    out = _require(_wn_weight(shapes, f"decoder.model.{i + 1}.conv"), f"decoder.model.{i + 1}.conv" + WN_NEW[1])
    found["decoder_out_kernel"] = out[2]
    return found
