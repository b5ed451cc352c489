"""Codec architecture: the full-size model on the meta device has the published key names and
shapes (spec §5.3–5.5), and sizes are read back from any state dict in that layout."""
from __future__ import annotations

import pytest
import torch

from engine.fish.codec import Codec, CodecConfig, make_tiny_codec_state_dict
from engine.fish.codec.config import WN_NEW

W0, W1 = WN_NEW  # ".parametrizations.weight.original0" / "...original1"

# (key, shape) straight from the spec's tables §5.2–5.5.
PUBLISHED_SHAPES = [
    ("encoder.block.0.conv.bias", (64,)),
    ("encoder.block.0.conv" + W0, (64, 1, 1)),
    ("encoder.block.0.conv" + W1, (64, 1, 7)),
    ("encoder.block.1.block.0.block.0.alpha", (1, 64, 1)),
    ("encoder.block.1.block.0.block.1.conv" + W1, (64, 64, 7)),
    ("encoder.block.1.block.0.block.2.alpha", (1, 64, 1)),
    ("encoder.block.1.block.0.block.3.conv" + W1, (64, 64, 1)),
    ("encoder.block.1.block.2.block.1.conv" + W1, (64, 64, 7)),
    ("encoder.block.1.block.3.alpha", (1, 64, 1)),
    ("encoder.block.1.block.4.conv" + W1, (128, 64, 4)),
    ("encoder.block.2.block.4.conv" + W1, (256, 128, 8)),
    ("encoder.block.3.block.4.conv" + W1, (512, 256, 16)),
    ("encoder.block.4.block.4.conv" + W1, (1024, 512, 16)),
    ("encoder.block.4.block.4.conv" + W0, (1024, 1, 1)),
    ("encoder.block.4.block.5.layers.0.attention.wqkv.weight", (3072, 1024)),
    ("encoder.block.4.block.5.layers.3.attention.wo.weight", (1024, 1024)),
    ("encoder.block.4.block.5.layers.3.feed_forward.w1.weight", (3072, 1024)),
    ("encoder.block.4.block.5.layers.3.feed_forward.w3.weight", (3072, 1024)),
    ("encoder.block.4.block.5.layers.3.feed_forward.w2.weight", (1024, 3072)),
    ("encoder.block.4.block.5.layers.2.attention_norm.weight", (1024,)),
    ("encoder.block.4.block.5.layers.2.ffn_norm.weight", (1024,)),
    ("encoder.block.4.block.5.layers.1.attention_layer_scale.gamma", (1024,)),
    ("encoder.block.4.block.5.layers.1.ffn_layer_scale.gamma", (1024,)),
    ("encoder.block.4.block.5.norm.weight", (1024,)),
    ("encoder.block.5.alpha", (1, 1024, 1)),
    ("encoder.block.6.conv.bias", (1024,)),
    ("encoder.block.6.conv" + W0, (1024, 1, 1)),
    ("encoder.block.6.conv" + W1, (1024, 1024, 3)),
    ("quantizer.downsample.0.0.conv.weight", (1024, 1024, 2)),
    ("quantizer.downsample.1.0.conv.bias", (1024,)),
    ("quantizer.downsample.0.1.dwconv.conv.weight", (1024, 1, 7)),
    ("quantizer.downsample.0.1.dwconv.conv.bias", (1024,)),
    ("quantizer.downsample.1.1.norm.weight", (1024,)),
    ("quantizer.downsample.1.1.norm.bias", (1024,)),
    ("quantizer.downsample.1.1.pwconv1.weight", (4096, 1024)),
    ("quantizer.downsample.1.1.pwconv1.bias", (4096,)),
    ("quantizer.downsample.1.1.pwconv2.weight", (1024, 4096)),
    ("quantizer.downsample.1.1.gamma", (1024,)),
    ("quantizer.pre_module.layers.7.attention.wqkv.weight", (3072, 1024)),
    ("quantizer.pre_module.norm.weight", (1024,)),
    ("quantizer.semantic_quantizer.quantizers.0.in_proj.weight_g", (8, 1, 1)),
    ("quantizer.semantic_quantizer.quantizers.0.in_proj.weight_v", (8, 1024, 1)),
    ("quantizer.semantic_quantizer.quantizers.0.in_proj.bias", (8,)),
    ("quantizer.semantic_quantizer.quantizers.0.out_proj.weight_g", (1024, 1, 1)),
    ("quantizer.semantic_quantizer.quantizers.0.out_proj.weight_v", (1024, 8, 1)),
    ("quantizer.semantic_quantizer.quantizers.0.out_proj.bias", (1024,)),
    ("quantizer.semantic_quantizer.quantizers.0.codebook.weight", (4096, 8)),
    ("quantizer.quantizer.quantizers.0.codebook.weight", (1024, 8)),
    ("quantizer.quantizer.quantizers.8.codebook.weight", (1024, 8)),
    ("quantizer.quantizer.quantizers.8.in_proj.weight_v", (8, 1024, 1)),
    ("quantizer.quantizer.quantizers.8.out_proj.weight_g", (1024, 1, 1)),
    ("quantizer.post_module.layers.7.feed_forward.w2.weight", (1024, 3072)),
    ("quantizer.post_module.norm.weight", (1024,)),
    ("quantizer.upsample.0.0.conv.weight", (1024, 1024, 2)),
    ("quantizer.upsample.1.0.conv.bias", (1024,)),
    ("quantizer.upsample.1.1.gamma", (1024,)),
    ("decoder.model.0.conv" + W1, (1536, 1024, 7)),
    ("decoder.model.0.conv.bias", (1536,)),
    ("decoder.model.1.block.0.alpha", (1, 1536, 1)),
    ("decoder.model.1.block.1.conv" + W1, (1536, 768, 16)),
    ("decoder.model.1.block.1.conv" + W0, (1536, 1, 1)),
    ("decoder.model.1.block.1.conv.bias", (768,)),
    ("decoder.model.1.block.2.block.1.conv" + W1, (768, 768, 7)),
    ("decoder.model.1.block.4.block.3.conv" + W1, (768, 768, 1)),
    ("decoder.model.2.block.1.conv" + W1, (768, 384, 16)),
    ("decoder.model.3.block.1.conv" + W1, (384, 192, 8)),
    ("decoder.model.4.block.1.conv" + W1, (192, 96, 4)),
    ("decoder.model.4.block.4.block.2.alpha", (1, 96, 1)),
    ("decoder.model.5.alpha", (1, 96, 1)),
    ("decoder.model.6.conv" + W1, (1, 96, 7)),
    ("decoder.model.6.conv" + W0, (1, 1, 1)),
    ("decoder.model.6.conv.bias", (1,)),
]


@pytest.fixture(scope="module")
def full_state():
    with torch.device("meta"):
        return Codec(CodecConfig()).state_dict()


def test_full_size_codec_has_published_keys_and_shapes(full_state):
    for key, shape in PUBLISHED_SHAPES:
        assert key in full_state, key
        assert tuple(full_state[key].shape) == shape, key
    assert len(full_state) == 535
    assert sum(v.numel() for v in full_state.values()) == 391_430_530


def test_full_size_codec_has_nothing_beyond_the_published_layout(full_state):
    assert all(k.split(".")[0] in ("encoder", "quantizer", "decoder") for k in full_state)
    assert not any(k.endswith(("freqs_cis", "causal_mask", "folded_weight")) for k in full_state)
    assert not any(k.startswith(("encoder.block.1.block.5", "decoder.model.1.block.5")) for k in full_state)
    # the published decoder config lists transformer layers that upstream never inserts
    assert not any(".layers." in k for k in full_state if k.startswith("decoder"))
    # VQ projections keep the legacy weight-norm names, every conv the parametrization names
    assert not any(".weight_g" in k for k in full_state if not k.startswith("quantizer.semantic_quantizer")
                   and not k.startswith("quantizer.quantizer."))
    assert sum(k.endswith(W1) for k in full_state) == sum(k.endswith(W0) for k in full_state) > 0


def test_published_numbers_are_derived():
    cfg = CodecConfig()
    assert cfg.hop_length == 2048 and cfg.encoder_hop == 512
    assert cfg.num_codebooks == 10
    assert cfg.codebook_sizes == (4096,) + (1024,) * 9


def test_config_is_read_back_from_the_published_layout(full_state):
    assert CodecConfig.from_state_dict(full_state) == CodecConfig()


def test_config_is_read_back_from_other_sizes():
    state = make_tiny_codec_state_dict(seed=1, num_codebooks=5, semantic_codebook_size=48, residual_codebook_size=24,
                                       encoder_dim=4, latent_dim=64, decoder_dim=32, quantizer_transformer_layers=1)
    cfg = CodecConfig.from_state_dict(state)
    assert cfg.num_codebooks == 5 and cfg.codebook_sizes == (48, 24, 24, 24, 24)
    assert (cfg.encoder_dim, cfg.latent_dim, cfg.decoder_dim) == (4, 64, 32)
    assert cfg.pre_module_layers == cfg.post_module_layers == 1 and cfg.encoder_transformer_layers == (0, 0, 0, 1)
    assert cfg.encoder_strides == (2, 4, 8, 8) and cfg.decoder_strides == (8, 8, 4, 2) and cfg.hop_length == 2048
    # what the weights cannot say can be overridden
    assert CodecConfig.from_state_dict(state, quantizer_window=16).quantizer_window == 16
    with pytest.raises(TypeError, match="quantiser_window"):
        CodecConfig.from_state_dict(state, quantiser_window=16)
