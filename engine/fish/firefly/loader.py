"""Loading the Firefly generator file (`firefly-gan-vq-fsq-8x1024-21hz-generator.pth`) strictly.

Accepted variations, as upstream's loader accepts them: a wrapping `{"state_dict": ...}` and a
`generator.` prefix (training checkpoints also hold a discriminator: only `generator.*` keys are
kept). Weight-normed layers may be stored in either weight-norm spelling or as a plain folded
`weight` (an export with the parametrizations removed). Anything else missing or unexpected is
an error that names the keys.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from engine.fish.codec.config import WN_NEW
from engine.fish.codec.loader import _respell_weight_norm, load_checked, read_state_dict
from engine.fish.firefly.config import FireflyConfig
from engine.fish.firefly.model import FireflyCodec


def _unfold_plain_weights(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A plain `X.weight` where the model has weight norm becomes g = ‖w‖ (per dim-0 slice), v = w,
    which gives back exactly w."""
    out = dict(state)
    for key in list(state):
        if not key.endswith(".weight") or key in expected:
            continue
        stem = key[: -len(".weight")]
        g_key, v_key = stem + WN_NEW[0], stem + WN_NEW[1]
        if g_key in expected and v_key in expected and g_key not in out and v_key not in out:
            w = out.pop(key)
            out[g_key] = torch.linalg.vector_norm(w.float(), dim=tuple(range(1, w.dim())), keepdim=True).to(w.dtype)
            out[v_key] = w
    return out


def load_firefly(source: str | os.PathLike[str] | Mapping[str, Tensor], device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, **config_overrides) -> FireflyCodec:
    """Build the Firefly codec that a generator file (path or state dict) describes and load it
    strictly. Weight norm is folded in float32 before the cast to `dtype`."""
    state = read_state_dict(source)
    config = FireflyConfig.from_state_dict(state, **config_overrides)
    with torch.device("meta"):
        codec = FireflyCodec(config)
    expected = codec.state_dict()
    state = _unfold_plain_weights(_respell_weight_norm(state, expected), expected)
    load_checked(codec, state, "Firefly codec")
    codec = codec.to(device=device or "cpu", dtype=dtype or torch.float32)
    codec.spec_transform.init_buffers(codec.device)  # the mel front end stays float32
    return codec


def find_firefly_file(directory: Path) -> Path | None:
    """The generator file of a fish-speech-1.5 directory: the published name, else the one
    `firefly-gan-vq*.pth` there."""
    from engine.fish.config import FIREFLY_CODEC_FILE, FIREFLY_CODEC_GLOB

    published = directory / FIREFLY_CODEC_FILE
    if published.is_file():
        return published
    found = sorted(directory.glob(FIREFLY_CODEC_GLOB))
    return found[0] if found else None

