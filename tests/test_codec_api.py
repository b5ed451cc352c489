"""Codec encode/decode semantics on the tiny codec: lengths, causality, clamping, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from engine.fish.codec import load_codec, make_tiny_codec_state_dict

HOP = 2048
SIZES = (64,) + (32,) * 9


@pytest.fixture(scope="module")
def codec():
    return load_codec(make_tiny_codec_state_dict(seed=0))


def _codes(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (frames,), generator=g) for n in SIZES])


def _speechlike(samples: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 44100
    tone = 0.4 * torch.sin(2 * math.pi * 180 * t) * torch.sin(2 * math.pi * 2.1 * t)
    return tone + 0.03 * torch.randn(samples, generator=g)


@pytest.mark.parametrize("samples", [1, 2047, 2048, 2049, 44100])
def test_encode_returns_ceil_frames_of_in_range_codes(codec, samples):
    codes = codec.encode(_speechlike(samples))
    assert codes.dtype == torch.long and codes.shape == (10, math.ceil(samples / HOP))
    for row, size in zip(codes, SIZES):
        assert 0 <= int(row.min()) and int(row.max()) < size


def test_encode_pads_with_zeros_and_batches(codec):
    audio = _speechlike(3 * HOP + 100)
    padded = torch.cat([audio, torch.zeros(4 * HOP - audio.numel())])
    single = codec.encode(audio)
    assert torch.equal(single, codec.encode(padded))
    batch = torch.stack([audio, _speechlike(audio.numel(), seed=1)])[:, None]
    both = codec.encode(batch)
    assert both.shape == (2, 10, 4) and torch.equal(both[0], single)
    assert torch.equal(codec.encode(batch[:, 0]), both)  # [B, L] too
    assert not torch.equal(both[0], both[1])


def test_encode_is_causal(codec):
    audio = _speechlike(10 * HOP, seed=2)
    assert torch.equal(codec.encode(audio[: 5 * HOP]), codec.encode(audio)[:, :5])


def test_decode_length_and_batching(codec):
    codes = _codes(9)
    audio = codec.decode(codes)
    assert audio.shape == (9 * HOP,) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all() and audio.abs().max() > 1e-3 and audio.abs().max() <= 1
    batch = codec.decode(torch.stack([codes, _codes(9, seed=1)]))
    assert batch.shape == (2, 9 * HOP)
    assert torch.allclose(batch[0], audio, atol=1e-6)
    assert codec.decode(codes[:, :0]).shape == (0,)


def test_decode_is_causal(codec):
    codes = _codes(10, seed=3)
    whole = codec.decode(codes)
    prefix = codec.decode(codes[:, :6])
    assert (prefix - whole[: 6 * HOP]).abs().max() < 1e-5
    # and the future does matter for later samples
    other = codes.clone()
    other[:, 6:] = _codes(4, seed=4)
    assert (codec.decode(other)[6 * HOP:] - whole[6 * HOP:]).abs().max() > 1e-3


def test_out_of_range_codes_are_clamped_without_touching_the_input(codec):
    codes = _codes(6, seed=5)
    wild = codes.clone()
    wild[0, 1], wild[3, 2], wild[9, 4] = 5000, 999, 1023
    before = wild.clone()
    clamped = wild.clone()
    clamped[0, 1], clamped[3, 2], clamped[9, 4] = 63, 31, 31
    assert torch.equal(codec.decode(wild), codec.decode(clamped))
    assert torch.equal(wild, before)
    assert not torch.equal(codec.decode(wild), codec.decode(codes))


def test_bad_input_is_a_clear_error(codec):
    with pytest.raises(ValueError, match=r"codes must be shaped \[10, T\]"):
        codec.decode(torch.zeros(9, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        codec.decode(torch.zeros(10, 4))
    with pytest.raises(ValueError, match="empty"):
        codec.encode(torch.zeros(0))
    with pytest.raises(ValueError, match=r"\[B, 1, L\]"):
        codec.encode(torch.zeros(1, 2, 100))
    with pytest.raises(ValueError, match="floating point"):
        codec.encode(torch.zeros(100, dtype=torch.int16))
