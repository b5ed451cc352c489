"""Codec building blocks against plain re-derivations of the spec's formulas (§5.2, §5.4), so a
layout-preserving mistake (wrong head split, wrong padding side, wrong norm axis) cannot hide
behind the streaming-equals-whole checks, which would agree with themselves."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.fish.codec import load_codec, make_tiny_codec_state_dict
from engine.fish.codec.config import TransformerShape
from engine.fish.codec.layers import CausalConv1d, CausalConvTranspose1d, Snake1d
from engine.fish.codec.transformer import WindowLimitedTransformer, rope_table

torch.manual_seed(0)


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() < 2 else 1 / math.sqrt(p.shape[-1])))
    return module.eval()


@pytest.mark.parametrize("kernel,stride,dilation,length", [(7, 1, 1, 50), (7, 1, 9, 80), (4, 2, 1, 33), (16, 8, 1, 70),
                                                           (3, 1, 1, 5)])
def test_causal_conv_pads_left_and_keeps_the_last_partial_window(kernel, stride, dilation, length):
    conv = _randomise(CausalConv1d(3, 5, kernel, stride=stride, dilation=dilation), seed=kernel + stride)
    x = torch.randn(2, 3, length)
    span = (kernel - 1) * dilation + 1
    frames = math.ceil((length - span + span - stride) / stride + 1)
    extra = (frames - 1) * stride + span - (span - stride) - length
    g, v = conv.conv.parametrizations.weight.original0, conv.conv.parametrizations.weight.original1
    weight = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1)  # per output channel
    expected = F.conv1d(F.pad(x, (span - stride, extra)), weight, conv.conv.bias, stride, 0, dilation)
    with torch.no_grad():
        got = conv(x)
        conv.fold()
        folded = conv(x)
    assert got.shape == (2, 5, frames)
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(folded, expected, atol=1e-5)
    # causal: the first outputs do not change when the input's future changes
    x2 = x.clone()
    x2[..., -1] += 1.0
    with torch.no_grad():
        cut = (length - 1 - (span - stride)) // stride  # outputs that cannot see the last sample
        assert torch.allclose(conv(x2)[..., :cut], got[..., :cut], atol=1e-6)


def test_causal_transposed_conv_trims_the_right_and_norms_per_input_channel():
    conv = _randomise(CausalConvTranspose1d(6, 4, 8, stride=4), seed=3)
    x = torch.randn(1, 6, 9)
    g, v = conv.conv.parametrizations.weight.original0, conv.conv.parametrizations.weight.original1
    weight = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1)  # dim 0 = input channels here
    full = F.conv_transpose1d(x, weight, conv.conv.bias, 4)
    with torch.no_grad():
        got = conv(x)
    assert got.shape == (1, 4, 9 * 4)
    assert torch.allclose(got, full[..., : 9 * 4], atol=1e-5)


def test_snake_formula():
    snake = Snake1d(4)
    with torch.no_grad():
        snake.alpha.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]).view(1, 4, 1))
    x = torch.randn(2, 4, 10)
    alpha = snake.alpha
    assert torch.allclose(snake(x), x + torch.sin(alpha * x) ** 2 / (alpha + 1e-9), atol=1e-6)


def test_rope_table_is_bf16_rounded_cos_sin_at_absolute_positions():
    table = rope_table(100, 30, 64, 10000.0, torch.device("cpu"))
    pos = torch.arange(100, 130, dtype=torch.float64)[:, None]
    angle = pos * 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.equal(table, table.bfloat16().float())  # exactly representable in bf16
    assert (table[..., 0] - angle.cos()).abs().max() <= 2 ** -8  # within one bf16 rounding
    assert (table[..., 1] - angle.sin()).abs().max() <= 2 ** -8
    assert torch.equal(table, rope_table(0, 130, 64, 10000.0, torch.device("cpu"))[100:])


def _reference_transformer(module: WindowLimitedTransformer, x: torch.Tensor) -> torch.Tensor:
    """Pre-norm blocks with LayerScale, full-matrix attention and an explicit window mask."""
    s = module.shape
    h = x.transpose(1, 2)
    t = h.shape[1]
    table = rope_table(0, t, s.head_dim, s.rope_base, x.device)
    rot = torch.complex(table[..., 0], table[..., 1])  # (T, D/2)

    def rms(z, w):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + s.norm_eps) * w

    def rope(z):  # (B, T, H, D), pairs (2m, 2m+1)
        zc = torch.view_as_complex(z.reshape(*z.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(zc * rot[None, :, None]).flatten(-2)

    qi, kj = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (kj <= qi) & (kj >= qi - s.window + 1)
    for layer in module.layers:
        a = rms(h, layer.attention_norm.weight)
        q, k, v = (a @ layer.attention.wqkv.weight.T).split(s.n_heads * s.head_dim, dim=-1)
        q, k, v = (z.reshape(*z.shape[:2], s.n_heads, s.head_dim) for z in (q, k, v))
        q, k = rope(q), rope(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(s.head_dim)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*h.shape[:2], -1)
        h = h + layer.attention_layer_scale.gamma * (out @ layer.attention.wo.weight.T)
        f = rms(h, layer.ffn_norm.weight)
        ff = layer.feed_forward
        h = h + layer.ffn_layer_scale.gamma * ((F.silu(f @ ff.w1.weight.T) * (f @ ff.w3.weight.T)) @ ff.w2.weight.T)
    return rms(h, module.norm.weight).transpose(1, 2)


@pytest.mark.parametrize("window,length", [(8, 30), (64, 30), (5, 12)])
def test_transformer_matches_a_plain_reference(window, length):
    shape = TransformerShape(dim=128, n_layers=2, n_heads=2, head_dim=64, ffn_dim=384, window=window,
                             rope_base=10000.0, norm_eps=1e-5)
    module = _randomise(WindowLimitedTransformer(shape), seed=window)
    x = torch.randn(2, 128, length)
    with torch.no_grad():
        assert torch.allclose(module(x), _reference_transformer(module, x), atol=2e-5)


@pytest.fixture(scope="module")
def tiny():
    return load_codec(make_tiny_codec_state_dict(seed=2))


def test_fused_vq_decode_equals_the_sum_of_stages(tiny):
    g = torch.Generator().manual_seed(1)
    codes = torch.stack([torch.randint(0, n, (1, 9), generator=g)[0] for n in tiny.codebook_sizes])[None]
    q = tiny.quantizer
    summed = sum(stage.dequantize(codes[:, i]) for i, stage in enumerate(q.stages))
    expected = q.post_module(summed)
    for conv, block in q.upsample:
        expected = block(conv(expected))
    with torch.inference_mode():
        assert torch.allclose(q.dequantize(codes), expected, atol=1e-5)


def test_vq_picks_the_most_cosine_similar_codebook_row(tiny):
    stage = tiny.quantizer.stages[0]
    z = torch.randn(2, 128, 15)
    with torch.inference_mode():
        codes, quantised = stage.quantize(z)
        z_e = stage.in_proj(z).transpose(1, 2)
        cosine = F.normalize(z_e, dim=-1) @ F.normalize(stage.codebook.weight, dim=-1).T
        assert torch.equal(codes, cosine.argmax(-1))
        assert torch.allclose(quantised, stage.dequantize(codes), atol=1e-5)  # the row itself, not normalised
