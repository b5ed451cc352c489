"""A tiny random Firefly codec in the published generator-file layout, for tests and the tiny
fish-speech-1.5 checkpoint: the same architecture, hop (2048) and FSQ (8 × 1000 codes) as the
published one, with small widths and few blocks. Weights are scaled so signals keep a sensible
size through the network and streaming state visibly matters."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from engine.fish.firefly.config import FireflyConfig
from engine.fish.firefly.model import FireflyCodec


def tiny_firefly_config() -> FireflyConfig:
    return FireflyConfig(n_mels=160, backbone_depths=(1, 1, 1, 1), backbone_dims=(16, 16, 32, 64),
                         fsq_groups=8, head_initial_channels=64)


def _random_tensor(key: str, shape: torch.Size, gen: torch.Generator) -> Tensor:
    name = key.rsplit(".", 1)[-1]
    if name in ("original1", "weight_v"):
        return torch.randn(shape, generator=gen)
    if name in ("original0", "weight_g"):  # per-channel norm of the effective weight
        return 0.4 + 0.4 * torch.rand(shape, generator=gen)
    if name == "gamma":
        return 0.2 + 0.4 * torch.rand(shape, generator=gen)
    if name == "bias":
        return 0.05 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # layer-norm scales
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if ".upsample." in key:  # transposed conv (in, out, k == stride)
        return torch.randn(shape, generator=gen) / math.sqrt(shape[0])
    if "project_in" in key:  # wide enough that every FSQ digit gets used
        return 2.0 * torch.randn(shape, generator=gen) / math.sqrt(shape[1])
    return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))


def make_tiny_firefly_state_dict(seed: int = 0, config: FireflyConfig | None = None) -> dict[str, Tensor]:
    config = config or tiny_firefly_config()
    with torch.device("meta"):
        layout = FireflyCodec(config).state_dict()
    gen = torch.Generator().manual_seed(seed)
    state = {key: _random_tensor(key, like.shape, gen) for key, like in layout.items()}
    # a quiet last conv keeps the output tanh out of saturation
    g = "head.conv_post.conv.parametrizations.weight.original0"
    state[g] = state[g] * 0.3
    return state


def write_tiny_firefly(path: str | os.PathLike[str], seed: int = 0, generator_prefix: bool = True) -> Path:
    """Save a tiny random generator file. Like upstream's training exports, keys carry a
    `generator.` prefix by default (the loader strips it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = make_tiny_firefly_state_dict(seed)
    if generator_prefix:
        state = {"generator." + k: v for k, v in state.items()}
    torch.save(state, path)
    return path
