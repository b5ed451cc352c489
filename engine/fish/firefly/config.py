"""Firefly VQGAN hyper-parameters (spec §5.9). Widths and depths are read from the weights'
shapes, so a tiny random codec and the published one load through the same code; strides and
kernels are the published values (the weights cannot tell a stride)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor

from engine.fish.codec.config import WN_NEW, WN_OLD
from engine.fish.codec.errors import CodecCheckpointError


@dataclasses.dataclass(frozen=True)
class FireflyConfig:
    sample_rate: int = 44100
    n_fft: int = 2048
    win_length: int = 2048
    mel_hop: int = 512
    n_mels: int = 160
    backbone_depths: tuple[int, ...] = (3, 3, 9, 3)
    backbone_dims: tuple[int, ...] = (128, 256, 384, 512)
    backbone_kernel: int = 7
    downsample_factors: tuple[int, ...] = (2, 2)
    fsq_groups: int = 8
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)
    head_initial_channels: int = 512
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2, 2)
    upsample_kernels: tuple[int, ...] = (16, 16, 4, 4, 4)
    resblock_kernels: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[int, ...] = (1, 3, 5)
    pre_conv_kernel: int = 13
    post_conv_kernel: int = 13

    def __post_init__(self) -> None:
        if len(self.backbone_depths) != len(self.backbone_dims):
            raise ValueError("backbone_depths and backbone_dims must have the same length")
        if len(self.upsample_rates) != len(self.upsample_kernels):
            raise ValueError("upsample_rates and upsample_kernels must have the same length")
        if self.latent_dim % self.fsq_groups:
            raise ValueError("the latent width must split evenly into the FSQ groups")
        up = 1
        for r in self.upsample_rates:
            up *= r
        if up != self.mel_hop:
            raise ValueError(f"the head upsamples by {up} but the mel hop is {self.mel_hop}")

    @property
    def latent_dim(self) -> int:
        return self.backbone_dims[-1]

    @property
    def downsample(self) -> int:
        out = 1
        for f in self.downsample_factors:
            out *= f
        return out

    @property
    def hop_length(self) -> int:
        """Audio samples per code frame (2048 = 512-sample mel hop × 4)."""
        return self.mel_hop * self.downsample

    @property
    def codebook_size(self) -> int:
        out = 1
        for n in self.fsq_levels:
            out *= n
        return out

    @property
    def num_codebooks(self) -> int:
        return self.fsq_groups

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.fsq_groups

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], **overrides) -> FireflyConfig:
        """Widths, depths, mel count and group count from the tensors' shapes."""
        def shape(key: str) -> tuple[int, ...]:
            for k in (key + ".weight", key + WN_NEW[1], key + WN_OLD[1]):
                if k in state:
                    return tuple(state[k].shape)
            raise CodecCheckpointError(f"Firefly codec weights lack {key}.weight: is this a Firefly VQGAN generator?")

        stem = shape("backbone.downsample_layers.0.0.conv")  # (dims[0], n_mels, k)
        dims = [stem[0]]
        stage = 0
        while f"backbone.stages.{stage}.0.gamma" in state:
            if stage > 0:
                dims.append(shape(f"backbone.downsample_layers.{stage}.1")[0])
            stage += 1
        depths = [_count_blocks(state, s) for s in range(stage)]
        if not depths:
            raise CodecCheckpointError("Firefly codec weights hold no backbone stages")
        groups = 0
        while f"quantizer.residual_fsq.rvqs.{groups}.project_in.weight" in state:
            groups += 1
        if not groups:
            raise CodecCheckpointError("Firefly codec weights hold no FSQ groups (quantizer.residual_fsq.rvqs.*)")
        values: dict = {"n_mels": stem[1], "backbone_dims": tuple(dims), "backbone_depths": tuple(depths),
                        "fsq_groups": groups,
                        "head_initial_channels": shape("head.conv_pre.conv")[0]}
        values.update(overrides)
        try:
            return cls(**values)
        except ValueError as exc:
            raise CodecCheckpointError(f"Firefly codec weights do not fit together: {exc}") from exc


def _count_blocks(state: Mapping[str, Tensor], stage: int) -> int:
    n = 0
    while f"backbone.stages.{stage}.{n}.gamma" in state:
        n += 1
    return n
