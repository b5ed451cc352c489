"""Streaming decode: pushing frames in any split reproduces the whole-utterance decode, including
past the post-module attention window, with state that stays bounded."""
from __future__ import annotations

import random

import pytest
import torch

from engine.fish.codec import StreamingDecoder, load_codec, make_tiny_codec_state_dict

HOP = 2048
SIZES = (64,) + (32,) * 9
TOL = 2e-5


@pytest.fixture(scope="module")
def state():
    return make_tiny_codec_state_dict(seed=0)


@pytest.fixture(scope="module")
def codec(state):
    return load_codec(state)


@pytest.fixture(scope="module")
def narrow(state):
    """Same weights with an 8-frame attention window: many window lengths in a short utterance."""
    return load_codec(state, quantizer_window=8)


def _codes(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (frames,), generator=g) for n in SIZES])


def _stream(codec, codes: torch.Tensor, splits: list[int]) -> torch.Tensor:
    decoder = StreamingDecoder(codec)
    out, start = [], 0
    for n in splits:
        out.append(decoder.push(codes[:, start:start + n]))
        assert out[-1].shape == (n * HOP,)
        start += n
    assert start == codes.shape[1] and decoder.frames_decoded == start
    return torch.cat(out)


def _random_splits(total: int, seed: int, most: int = 9) -> list[int]:
    rng = random.Random(seed)
    splits = []
    while sum(splits) < total:
        splits.append(min(rng.randint(1, most), total - sum(splits)))
    return splits


@pytest.fixture(scope="module")
def long_codes():
    return _codes(150, seed=1)  # longer than the published 128-frame window


@pytest.fixture(scope="module")
def long_whole(codec, long_codes):
    return codec.decode(long_codes)


@pytest.mark.parametrize("pattern", ["ones", "threes", "random", "window-sized", "all-at-once"])
def test_stream_decode_matches_whole_past_the_window(codec, long_codes, long_whole, pattern):
    total = long_codes.shape[1]
    splits = {"ones": [1] * total, "threes": [3] * (total // 3), "random": _random_splits(total, seed=2),
              "window-sized": [127, 23], "all-at-once": [total]}[pattern]
    streamed = _stream(codec, long_codes, splits)
    assert streamed.shape == long_whole.shape
    assert (streamed - long_whole).abs().max() < TOL


@pytest.mark.parametrize("seed", [3, 4])
def test_stream_decode_matches_whole_across_many_windows(narrow, seed):
    codes = _codes(45, seed=seed)
    whole = narrow.decode(codes)
    for splits in ([1] * 45, _random_splits(45, seed=seed, most=12), [2, 20, 23]):
        assert (_stream(narrow, codes, splits) - whole).abs().max() < TOL


def test_state_is_what_makes_the_stream_exact(codec):
    """Restarting the decoder mid-utterance (fresh convolution tails, KV cache and positions)
    changes the audio: the test above would catch any state that is not carried."""
    codes = _codes(20, seed=5)
    whole = codec.decode(codes)
    restarted = torch.cat([StreamingDecoder(codec).push(codes[:, :10]), StreamingDecoder(codec).push(codes[:, 10:])])
    assert (restarted[10 * HOP:] - whole[10 * HOP:]).abs().max() > 1e-3


def test_stream_state_stays_bounded(narrow):
    """O(new frames) per push: what is kept does not grow with the utterance."""
    decoder = StreamingDecoder(narrow)
    codes = _codes(40, seed=6)
    sizes = []
    for i in range(0, 40, 2):
        decoder.push(codes[:, i:i + 2])
        kept = [v for v in decoder._state._items.values() if isinstance(v, (torch.Tensor, tuple))]
        sizes.append(sum(t.numel() for v in kept for t in (v if isinstance(v, tuple) else (v,))))
    assert sizes[5] == sizes[-1]  # constant once the 8-frame window is full


def test_batched_stream_and_reset(codec):
    a, b = _codes(12, seed=7), _codes(12, seed=8)
    batch = torch.stack([a, b])
    decoder = StreamingDecoder(codec)
    out = torch.cat([decoder.push(batch[..., i:i + 5]) for i in range(0, 12, 5)], dim=-1)
    assert out.shape == (2, 12 * HOP)
    assert (out - codec.decode(batch)).abs().max() < TOL
    with pytest.raises(ValueError, match="batch size changed"):
        decoder.push(a[:, :1])
    decoder.reset()
    assert decoder.frames_decoded == 0
    assert (decoder.push(a) - codec.decode(a)).abs().max() < TOL
    assert decoder.push(a[:, :0]).shape == (0,)


def test_stream_clamps_without_touching_the_input(codec):
    codes = _codes(6, seed=9)
    codes[0, 2], codes[5, 1] = 4095, 1023
    before = codes.clone()
    decoder = StreamingDecoder(codec)
    streamed = torch.cat([decoder.push(codes[:, :3]), decoder.push(codes[:, 3:])])
    assert torch.equal(codes, before)
    assert (streamed - codec.decode(codes)).abs().max() < TOL
