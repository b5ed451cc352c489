"""Loading codec.pth strictly: the tiny file in the published layout, both weight-norm spellings,
wrappers, and clear errors for files that do not fit."""
from __future__ import annotations

import pytest
import torch

from engine.fish.checkpoint import CheckpointError
from engine.fish.codec import CodecCheckpointError, load_codec, make_tiny_codec_state_dict, write_tiny_codec
from engine.fish.codec.config import WN_NEW, WN_OLD

STALE = ("freqs_cis", "causal_mask")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_codec(tmp_path_factory.mktemp("codec") / "codec.pth", seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny_path):
    return torch.load(tiny_path, weights_only=True)


@pytest.fixture(scope="module")
def codes():
    g = torch.Generator().manual_seed(7)
    return torch.stack([torch.randint(0, n, (12,), generator=g) for n in (64,) + (32,) * 9])


def _respelled(state: dict, to_old: bool) -> dict:
    src, dst = (WN_NEW, WN_OLD) if to_old else (WN_OLD, WN_NEW)
    out = {}
    for k, v in state.items():
        for a, b in zip(src, dst):
            if k.endswith(a):
                k = k[: -len(a)] + b
        out[k] = v
    return out


def test_tiny_file_has_the_published_layout(tiny_file):
    assert any(k.endswith(WN_NEW[1]) for k in tiny_file if k.startswith("decoder."))
    assert not any(k.endswith(WN_OLD[1]) for k in tiny_file if k.startswith(("encoder.", "decoder.")))
    assert "quantizer.semantic_quantizer.quantizers.0.in_proj.weight_g" in tiny_file
    assert "quantizer.quantizer.quantizers.8.out_proj.weight_v" in tiny_file
    stale = sorted(k for k in tiny_file if k.endswith(STALE))
    assert stale == sorted(f"{p}.{n}" for p in ("encoder.block.4.block.5", "quantizer.pre_module",
                                                "quantizer.post_module") for n in STALE)
    assert tiny_file["quantizer.post_module.freqs_cis"].dtype == torch.bfloat16
    assert tiny_file["quantizer.post_module.causal_mask"].dtype == torch.bool


def test_save_load_round_trip_keeps_every_tensor(tiny_path, tiny_file, codes):
    codec = load_codec(tiny_path)
    loaded = codec.state_dict()
    published = {k: v for k, v in tiny_file.items() if not k.endswith(STALE)}
    assert set(loaded) == set(published)
    assert all(torch.equal(loaded[k], published[k]) for k in published)
    assert (codec.sample_rate, codec.hop_length, codec.num_codebooks) == (44100, 2048, 10)
    assert codec.codebook_sizes == (64,) + (32,) * 9
    audio = codec.decode(codes)
    assert audio.shape == (12 * 2048,) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all() and audio.abs().max() > 1e-3


def test_same_seed_same_file_other_seed_other_weights():
    a, b, c = (make_tiny_codec_state_dict(seed=s) for s in (0, 0, 1))
    key = "decoder.model.1.block.1.conv" + WN_NEW[1]
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


@pytest.mark.parametrize("to_old", [True, False], ids=["all-legacy", "all-parametrization"])
def test_both_weight_norm_spellings_load_to_identical_outputs(tiny_file, codes, to_old):
    reference = load_codec(tiny_file).decode(codes)
    respelled = _respelled(tiny_file, to_old)
    assert respelled.keys() != tiny_file.keys()
    assert torch.equal(load_codec(respelled).decode(codes), reference)


def test_wrapped_and_prefixed_training_checkpoint_loads(tiny_file, codes):
    wrapped = {"state_dict": {**{f"generator.{k}": v for k, v in tiny_file.items()},
                              "discriminator.conv.weight": torch.zeros(3)}}
    assert torch.equal(load_codec(wrapped).decode(codes), load_codec(tiny_file).decode(codes))


def test_missing_key_is_named(tiny_file):
    state = dict(tiny_file)
    del state["decoder.model.2.block.3.block.1.conv.bias"]
    with pytest.raises(CodecCheckpointError, match=r"missing keys: decoder\.model\.2\.block\.3\.block\.1\.conv\.bias"):
        load_codec(state)


def test_unexpected_key_is_named(tiny_file):
    state = {**tiny_file, "quantizer.post_module.layers.0.attention.wqkv.bias": torch.zeros(384)}
    with pytest.raises(CodecCheckpointError, match=r"unexpected keys: quantizer\.post_module\.layers\.0\.attention"):
        load_codec(state)
    # stale RoPE tables are ignored only where the model has a transformer
    state = {**tiny_file, "decoder.model.1.freqs_cis": torch.zeros(4, 32, 2)}
    with pytest.raises(CodecCheckpointError, match=r"unexpected keys: decoder\.model\.1\.freqs_cis"):
        load_codec(state)


def test_shape_mismatch_is_named(tiny_file):
    state = dict(tiny_file)
    state["quantizer.upsample.0.1.pwconv1.weight"] = torch.zeros(100, 128)
    with pytest.raises(CodecCheckpointError, match=r"quantizer\.upsample\.0\.1\.pwconv1\.weight \[100, 128\]"):
        load_codec(state)


def test_both_spellings_of_one_layer_is_an_error(tiny_file):
    key = "decoder.model.0.conv" + WN_NEW[0]
    state = {**tiny_file, "decoder.model.0.conv.weight_g": tiny_file[key]}
    with pytest.raises(CodecCheckpointError, match="given twice"):
        load_codec(state)


def test_not_a_codec_is_a_clear_error(tmp_path):
    with pytest.raises(CodecCheckpointError, match="not a modded-DAC codec"):
        load_codec({"layers.0.attention.wqkv.weight": torch.zeros(3, 3)})
    with pytest.raises(CodecCheckpointError, match="not found"):
        load_codec(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(CodecCheckpointError, match="cannot read"):
        load_codec(junk)
    assert issubclass(CodecCheckpointError, CheckpointError)  # the CLI reports both alike


def test_window_is_overridable(tiny_file):
    g = torch.Generator().manual_seed(3)
    long_codes = torch.stack([torch.randint(0, n, (40,), generator=g) for n in (64,) + (32,) * 9])
    default = load_codec(tiny_file)
    narrow = load_codec(tiny_file, quantizer_window=8)
    assert narrow.config.quantizer_window == 8 and default.config.quantizer_window == 128
    a, b = default.decode(long_codes), narrow.decode(long_codes)
    # frames within the first 8 see the same keys either way; later ones do not
    assert torch.allclose(a[: 8 * 2048], b[: 8 * 2048], atol=1e-6)
    assert (a[20 * 2048:] - b[20 * 2048:]).abs().max() > 1e-3


def test_bfloat16_load_decodes_close_to_float32(tiny_file, codes):
    ref = load_codec(tiny_file).decode(codes)
    half = load_codec(tiny_file, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    out = half.decode(codes)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.1
    assert 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()) >= 30  # SNR in dB


def test_loading_new_weights_refreshes_the_folded_copies(tiny_file, codes):
    codec = load_codec(tiny_file)
    codec.decode(codes)  # weight norm folded and in use
    other = {k: v for k, v in make_tiny_codec_state_dict(seed=5).items() if not k.endswith(STALE)}
    codec.load_state_dict(other)
    assert torch.equal(codec.decode(codes), load_codec(other).decode(codes))
