"""The CPU matrix-multiply forms of the codec's convolutions (`gemm_conv1d`,
`gemm_conv_transpose1d`) against torch's own conv1d / conv_transpose1d, and the layers that pick
them against those layers with the GEMM form switched off."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.fish.codec.layers import (ONEDNN_MIN_ELEMENTS, CausalConv1d, CausalConvTranspose1d, gemm_conv1d,
                                      gemm_conv_transpose1d)


@pytest.mark.parametrize("c_in,c_out,k,dilation,length,batch", [
    (64, 96, 7, 1, 12, 1), (32, 32, 7, 9, 60, 2), (48, 24, 1, 1, 300, 1), (16, 16, 3, 3, 9, 3)])
def test_gemm_conv1d_matches_conv1d(c_in, c_out, k, dilation, length, batch):
    g = torch.Generator().manual_seed(k + c_in)
    x = torch.randn(batch, c_in, length, generator=g)
    w = torch.randn(c_out, c_in, k, generator=g) / (c_in * k) ** 0.5
    b = torch.randn(c_out, generator=g)
    got = gemm_conv1d(x, w, b, dilation)
    assert got is not None and got.shape == (batch, c_out, length - (k - 1) * dilation)
    assert torch.allclose(got, F.conv1d(x, w, b, dilation=dilation), atol=1e-5)
    assert torch.allclose(gemm_conv1d(x, w, None, dilation), F.conv1d(x, w, dilation=dilation), atol=1e-5)


def test_gemm_conv1d_declines_a_long_input_with_a_small_weight():
    assert gemm_conv1d(torch.randn(1, 8, 4000), torch.randn(8, 8, 7), None, 1) is None
    # ... unless it is dilated and small enough that torch would use its slow reference kernel
    x, w = torch.randn(1, 8, 2102), torch.randn(8, 8, 7)
    assert x.numel() <= ONEDNN_MIN_ELEMENTS
    got = gemm_conv1d(x, w, None, 9)
    assert got is not None and torch.allclose(got, F.conv1d(x, w, dilation=9), atol=1e-5)
    assert gemm_conv1d(torch.randn(1, 96, 8000), torch.randn(96, 96, 7), None, 9) is None  # oneDNN's size


@pytest.mark.parametrize("c_in,c_out,stride,m,length,batch", [
    (64, 32, 8, 2, 5, 1), (16, 8, 4, 2, 40, 2), (32, 32, 2, 1, 9, 1), (8, 4, 3, 3, 7, 2)])
def test_gemm_conv_transpose1d_matches_conv_transpose1d(c_in, c_out, stride, m, length, batch):
    g = torch.Generator().manual_seed(stride * m + c_in)
    x = torch.randn(batch, c_in, length, generator=g)
    w = torch.randn(c_in, c_out, m * stride, generator=g) / c_in ** 0.5
    b = torch.randn(c_out, generator=g)
    got = gemm_conv_transpose1d(x, w.permute(0, 2, 1).contiguous(), b, stride)
    expected = F.conv_transpose1d(x, w, b, stride)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


@pytest.mark.parametrize("weight_normed", [True, False])
def test_layers_give_the_same_audio_with_and_without_the_gemm_form(weight_normed, monkeypatch):
    conv = _randomised(CausalConv1d(64, 64, 7, dilation=3, weight_normed=weight_normed), seed=1)
    up = _randomised(CausalConvTranspose1d(64, 32, 8, 4, weight_normed=weight_normed), seed=2)
    conv.fold(), up.fold()
    assert up.gemm_weight is not None
    x = torch.randn(1, 64, 10)
    with torch.inference_mode():
        fast = up(conv(x))
        up.gemm_weight = None
        monkeypatch.setattr(CausalConv1d, "_gemm_eligible", lambda self, x: False)
        plain = up(conv(x))
    assert torch.allclose(fast, plain, atol=1e-5)
