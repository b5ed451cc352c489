"""The Firefly VQGAN codec of fish-speech-1.5: layout of the published generator file, strict
loading (prefix, wrapping, weight-norm spellings), the mel front end, FSQ arithmetic, causal
encode, and exact streaming decode (any split equals the whole decode)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.fish.codec import CodecCheckpointError, StreamingDecoder
from engine.fish.firefly import (FireflyCodec, FireflyConfig, load_firefly, make_tiny_firefly_state_dict,
                                 write_tiny_firefly)
from engine.fish.firefly.mel import hz_to_mel, mel_to_hz, slaney_mel_filterbank
from engine.fish.firefly.model import FSQGroup

HOP = 2048


@pytest.fixture(scope="module")
def state():
    return make_tiny_firefly_state_dict(seed=0)


@pytest.fixture(scope="module")
def codec(state):
    return load_firefly(state)


def _codes(frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (8, frames), generator=g)


def _voice(seconds: float, seed: int = 0) -> torch.Tensor:
    rate = 44100
    t = torch.arange(int(seconds * rate)) / rate
    g = torch.Generator().manual_seed(seed)
    pcm = sum(torch.sin(2 * torch.pi * f * t) / (i + 1) for i, f in enumerate((140.0, 280.0, 420.0, 700.0)))
    return 0.2 * pcm / pcm.abs().max() + 0.01 * torch.randn(t.shape, generator=g)


def test_published_layout_key_names_and_shapes():
    """A full-size model lists the generator file's keys with the shapes of spec §5.9."""
    with torch.device("meta"):
        keys = {k: tuple(v.shape) for k, v in FireflyCodec(FireflyConfig()).state_dict().items()}
    expected = {
        "backbone.downsample_layers.0.0.conv.weight": (128, 160, 7),
        "backbone.downsample_layers.0.1.weight": (128,),
        "backbone.downsample_layers.1.0.weight": (128,),
        "backbone.downsample_layers.1.1.weight": (256, 128, 1),
        "backbone.downsample_layers.3.1.weight": (512, 384, 1),
        "backbone.stages.2.8.dwconv.conv.weight": (384, 1, 7),
        "backbone.stages.3.2.pwconv1.weight": (2048, 512),
        "backbone.norm.bias": (512,),
        "quantizer.downsample.1.0.conv.weight": (512, 512, 2),
        "quantizer.upsample.0.0.conv.weight": (512, 512, 2),
        "quantizer.upsample.1.1.gamma": (512,),
        "quantizer.residual_fsq.rvqs.7.project_in.weight": (4, 64),
        "quantizer.residual_fsq.rvqs.7.project_out.weight": (64, 4),
        "head.conv_pre.conv.parametrizations.weight.original0": (512, 1, 1),
        "head.conv_pre.conv.parametrizations.weight.original1": (512, 512, 13),
        "head.ups.0.conv.parametrizations.weight.original1": (512, 256, 16),
        "head.ups.4.conv.parametrizations.weight.original1": (32, 16, 4),
        "head.resblocks.0.blocks.2.convs1.2.conv.parametrizations.weight.original1": (256, 256, 11),
        "head.resblocks.4.blocks.0.convs2.0.conv.parametrizations.weight.original1": (16, 16, 3),
        "head.conv_post.conv.parametrizations.weight.original1": (1, 16, 13),
    }
    for key, shape in expected.items():
        assert keys.get(key) == shape, key
    assert not any("codebook" in k or "spec_transform" in k for k in keys)  # FSQ is implicit, mel derived
    params = sum(int(np.prod(s)) for s in keys.values())
    assert params == 47_065_218  # spec §2.7: the published generator's parameter count


def test_slaney_mel_scale_and_filterbank():
    assert mel_to_hz(hz_to_mel(np.array([0.0, 500.0, 1000.0, 4000.0, 22050.0]))) == pytest.approx(
        [0.0, 500.0, 1000.0, 4000.0, 22050.0])
    assert hz_to_mel(np.array([1000.0]))[0] == pytest.approx(15.0)  # linear part: 200/3 Hz per mel
    fb = slaney_mel_filterbank(1025, 160, 44100)
    assert fb.shape == (1025, 160) and (fb >= 0).all()
    # Slaney normalisation: every triangle has unit area on the continuous frequency axis
    bin_hz = 22050 / 1024
    areas = fb.sum(0) * bin_hz
    assert np.allclose(areas[80:], 1.0, rtol=0.02)  # the narrow low triangles span too few bins to sum well


def test_mel_frames_and_values(codec):
    audio = _voice(1.0)
    mel = codec.spec_transform(audio[None])
    assert mel.shape == (1, 160, len(audio) // 512)
    assert mel.max() < 5 and mel.min() >= np.log(1e-5) - 1e-6
    # a 700 Hz partial lands in the filter whose centre is nearest 700 Hz
    edges = mel_to_hz(np.linspace(0, hz_to_mel(np.array([22050.0]))[0], 162))
    peak = int(mel[0, :, 10].argmax())
    assert abs(edges[peak + 1] - 140) < 40  # the strongest partial (140 Hz, amplitude 1)


def test_fsq_digits_and_bounds():
    group = FSQGroup(4, (8, 5, 5, 5))
    with torch.no_grad():
        for lin in (group.project_in, group.project_out):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
    indices = torch.arange(1000)[None]
    values = group.decode(indices)  # (1, 1000, 4): digit d of level n stands for (d - n//2) / (n//2)
    digits = torch.stack([indices[0] % 8, indices[0] // 8 % 5, indices[0] // 40 % 5, indices[0] // 200], -1)
    half = torch.tensor([4.0, 2, 2, 2])
    assert torch.equal(values[0], (digits.float() - half) / half)
    # bound() keeps every digit reachable and centred: large inputs give the extremes, 0 the middle
    assert group.encode(torch.full((1, 1, 4), 10.0)).item() == 999
    assert group.encode(torch.full((1, 1, 4), -10.0)).item() == 0
    assert group.encode(torch.zeros(1, 1, 4)).item() == 4 + 2 * 8 + 2 * 40 + 2 * 200
    # monotone per digit: a larger input never gives a smaller digit
    ramp = torch.linspace(-6, 6, 200)[:, None].repeat(1, 4)[None]
    enc = group.encode(ramp)[0]
    assert torch.all(torch.diff(enc % 8) >= 0) and len(torch.unique(enc % 8)) == 8


def test_loader_accepts_prefix_wrapping_and_weight_norm_spellings(state, tmp_path):
    codes = _codes(6)
    reference = load_firefly(state).decode(codes)
    path = write_tiny_firefly(tmp_path / "gen.pth", seed=0)  # `generator.` prefix, as training exports
    assert torch.equal(load_firefly(path).decode(codes), reference)
    wrapped = {"state_dict": {"generator." + k: v for k, v in state.items()},
               **{"discriminator.x": torch.zeros(1)}}
    assert torch.allclose(load_firefly(wrapped["state_dict"]).decode(codes), reference)
    old = {}
    for k, v in state.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1",
                                                                             ".weight_v")
        old[k] = v
    assert torch.allclose(load_firefly(old).decode(codes), reference, atol=1e-6)
    # an export with weight norm removed: plain folded weights
    folded = {}
    for k, v in state.items():
        if k.endswith("original0"):
            continue
        if k.endswith("original1"):
            stem = k[: -len(".parametrizations.weight.original1")]
            g = state[stem + ".parametrizations.weight.original0"]
            v = g * v / torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True)
            k = stem + ".weight"
        folded[k] = v
    assert torch.allclose(load_firefly(folded).decode(codes), reference, atol=1e-5)


def test_loader_is_strict(state, tmp_path):
    missing = dict(state)
    del missing["head.ups.2.conv.parametrizations.weight.original1"]
    with pytest.raises(CodecCheckpointError, match="missing keys: head.ups.2.conv"):
        load_firefly(missing)
    extra = {**state, "head.extra.weight": torch.zeros(3)}
    with pytest.raises(CodecCheckpointError, match="unexpected keys: head.extra.weight"):
        load_firefly(extra)
    wrong = {**state, "quantizer.residual_fsq.rvqs.0.project_out.weight": torch.zeros(5, 4)}
    with pytest.raises(CodecCheckpointError, match="inconsistent shapes"):
        load_firefly(wrong)
    with pytest.raises(CodecCheckpointError, match="lack"):
        load_firefly({"something.else": torch.zeros(1)})
    no_fsq = {k: v for k, v in state.items() if ".residual_fsq." not in k}
    with pytest.raises(CodecCheckpointError, match="no FSQ groups"):
        load_firefly(no_fsq)
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(CodecCheckpointError):
        load_firefly(tmp_path / "bad.pth")


def test_encode_shapes_range_and_causality(codec):
    audio = _voice(2.0)
    codes = codec.encode(audio)
    frames = -(-(len(audio) // 512) // 4)
    assert codes.shape == (8, frames) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 1000
    assert len(torch.unique(codes)) > 20  # the tiny random codec uses many codes, not one
    # causal: a prefix of whole frames encodes to the same codes as the prefix of the full encoding
    # (the reflect padding of the mel front end reaches 768 samples past the end: compare
    # frames whose input lies well inside)
    prefix = codec.encode(audio[: 12 * HOP])
    assert torch.equal(prefix[:, :11], codes[:, :11])
    batched = codec.encode(torch.stack([audio, audio.flip(0)]))
    assert batched.shape == (2, 8, frames) and torch.equal(batched[0], codes)
    with pytest.raises(ValueError, match="too short"):
        codec.encode(torch.zeros(100))
    with pytest.raises(ValueError, match="floating point"):
        codec.encode(torch.zeros(5000, dtype=torch.int16))


def test_decode_shapes_and_clamping(codec):
    codes = _codes(5)
    audio = codec.decode(codes)
    assert audio.shape == (5 * HOP,) and audio.dtype == torch.float32
    assert 0.01 < float(audio.abs().max()) < 1.0  # a signal, and not a saturated one
    assert codec.decode(torch.stack([codes, codes])).shape == (2, 5 * HOP)
    high = codes.clone()
    high[3, 2] = 1023  # the model's heads have 1024 entries; the codec has 1000
    assert torch.equal(codec.decode(high), codec.decode(torch.where(high > 999, 999, high)))
    assert high[3, 2] == 1023  # the caller's tensor is not modified
    with pytest.raises(ValueError, match="shaped"):
        codec.decode(torch.zeros(10, 4, dtype=torch.long))


@pytest.mark.parametrize("splits", [[1] * 12, [5, 7], [2, 3, 1, 6], [12]])
def test_stream_decode_matches_whole(codec, splits):
    codes = _codes(12, seed=3)
    whole = codec.decode(codes)
    decoder = StreamingDecoder(codec)
    out, start = [], 0
    for n in splits:
        out.append(decoder.push(codes[:, start:start + n]))
        start += n
    streamed = torch.cat(out)
    assert streamed.shape == whole.shape
    assert torch.allclose(streamed, whole, atol=2e-5), float((streamed - whole).abs().max())
    # the state mattered: decoding the second half alone differs
    assert not torch.allclose(codec.decode(codes[:, 6:]), whole[6 * HOP:], atol=1e-3)


def test_random_splits_and_reset(codec):
    rng = random.Random(0)
    codes = _codes(20, seed=5)
    whole = codec.decode(codes)
    decoder = StreamingDecoder(codec)
    for _ in range(2):  # after reset a new utterance starts at position 0
        out, start = [], 0
        while start < 20:
            n = rng.randint(1, 4)
            out.append(decoder.push(codes[:, start:start + n]))
            start += n
        assert torch.allclose(torch.cat(out), whole, atol=2e-5)
        decoder.reset()
