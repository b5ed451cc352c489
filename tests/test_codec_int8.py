"""The codec with int8 linear layers (`load_codec(..., quantize="int8")`): close to float32, its
streamed decode close to its own whole decode, a quarter of the linear layers' bytes."""
from __future__ import annotations

import pytest
import torch

from engine.fish.codec import StreamingDecoder, load_codec, make_tiny_codec_state_dict
from engine.fish.codec.int8 import RowExactInt8Linear
from engine.fish.quantize import weight_bytes

SIZES = (64,) + (32,) * 9


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).sum() / (reference - other).pow(2).sum())).item()


@pytest.fixture(scope="module")
def state():
    return make_tiny_codec_state_dict(seed=0)


@pytest.fixture(scope="module")
def codes():
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randint(0, n, (150,), generator=g) for n in SIZES])  # past the 128-frame window


@pytest.fixture(scope="module")
def int8_codec(state):
    return load_codec(state, quantize="int8")


def test_int8_replaces_every_quantizer_linear_and_shrinks_them(state, int8_codec):
    float_codec = load_codec(state)
    linears = [m for m in int8_codec.quantizer.modules() if isinstance(m, torch.nn.Linear)]
    packed = [m for m in int8_codec.quantizer.modules() if isinstance(m, RowExactInt8Linear)]
    assert not linears and len(packed) == 2 * 2 * 5 + 4 * 2  # two 2-layer transformers, four ConvNeXt MLPs
    assert weight_bytes(int8_codec.quantizer) < 0.6 * weight_bytes(float_codec.quantizer)


def test_int8_decode_is_within_30_db_of_float32(state, int8_codec, codes):
    ref = load_codec(state).decode(codes)
    assert snr_db(ref, int8_codec.decode(codes)) >= 30


@pytest.mark.parametrize("step", [1, 3, 4])
def test_int8_stream_is_close_to_its_whole_decode(int8_codec, codes, step):
    """Not bit-exact like float32: activations enter the int8 kernel rounded to bfloat16, which
    turns float rounding differences between chunk sizes into a bf16 step now and then."""
    whole = int8_codec.decode(codes)
    decoder = StreamingDecoder(int8_codec)
    streamed = torch.cat([decoder.push(codes[:, i:i + step]) for i in range(0, codes.shape[1], step)])
    assert snr_db(whole, streamed) >= 50


def test_int8_is_refused_where_it_cannot_run(state):
    with pytest.raises(ValueError, match="none or int8"):
        load_codec(state, quantize="int4")
    with pytest.raises(ValueError, match="CPU in float32"):
        load_codec(state, dtype=torch.bfloat16, quantize="int8")


def test_int8_codec_encodes_like_float32(state, int8_codec):
    """Encoding runs the int8 pre-module transformer on channels-first (transposed) input."""
    audio = 0.3 * torch.randn(20 * 2048, generator=torch.Generator().manual_seed(2))
    ref, got = load_codec(state).encode(audio), int8_codec.encode(audio)
    assert got.shape == ref.shape
    assert (got[0] == ref[0]).float().mean() >= 0.9  # the semantic codebook: nearest-code ties aside
