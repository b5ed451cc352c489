"""The codec's causal, window-limited transformer (spec §5.2).

Pre-norm blocks with LayerScale, RMSNorm in float32, SwiGLU, interleaved-pair RoPE whose cos/sin
are rounded to bfloat16. A query at position i sees keys i-window+1 … i. Positions are absolute:
a streaming decode keeps counting where the previous call stopped and keeps the last window-1
keys/values, so it reproduces a whole-utterance pass exactly.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TransformerShape
from .layers import StreamState

_ROPE_LOCK = threading.Lock()
_ROPE_TABLES: dict[tuple[int, float, torch.device], Tensor] = {}


def rope_table(start: int, length: int, head_dim: int, base: float, device: torch.device) -> Tensor:
    """(length, head_dim/2, 2) cos/sin for positions start … start+length-1, in fp32 holding
    bf16-rounded values. Computed on the CPU like upstream's table (so the rounding matches on
    any device) and cached per device, growing by doubling."""
    key = (head_dim, float(base), torch.device(device))
    end = start + length
    table = _ROPE_TABLES.get(key)
    if table is None or table.shape[0] < end:
        with _ROPE_LOCK, torch.inference_mode(False):
            table = _ROPE_TABLES.get(key)
            if table is None or table.shape[0] < end:
                size = max(4096, 1 << (end - 1).bit_length())
                inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
                angles = torch.outer(torch.arange(size).float(), inv_freq)
                rot = torch.polar(torch.ones_like(angles), angles)
                table = torch.stack([rot.real, rot.imag], dim=-1).to(torch.bfloat16).float().to(device)
                _ROPE_TABLES[key] = table
    return table[start:end]


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """x (B, T, H, D), table (T, D/2, 2): rotate pairs (2m, 2m+1) in fp32, cast back."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, xf.shape[1], 1, xf.shape[3], 2)
    cos, sin = t[..., 0], t[..., 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3).type_as(x)


def window_mask(q_start: int, q_len: int, k_start: int, k_len: int, window: int, device: torch.device) -> Tensor:
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k = torch.arange(k_start, k_start + k_len, device=device)[None, :]
    return (k <= q) & (k > q - window)


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int, window: int) -> Tensor:
    """Causal attention limited to `window` keys. q (B, H, n, D) sits at absolute positions
    q_start…; k/v (B, H, m, D) at k_start… and end with the last query. Long inputs go in query
    blocks of `window` so memory is O(n·window), not O(n²)."""
    n = q.shape[2]
    if n == 1 and k.shape[2] <= window:
        return F.scaled_dot_product_attention(q, k, v)
    block = max(window, 1)
    if n <= block:
        lo = max(0, q_start - window + 1 - k_start)
        mask = window_mask(q_start, n, k_start + lo, k.shape[2] - lo, window, q.device)
        return F.scaled_dot_product_attention(q, k[:, :, lo:], v[:, :, lo:], attn_mask=mask)
    outs = []
    for a in range(0, n, block):
        b = min(n, a + block)
        q0 = q_start + a
        lo = max(0, q0 - window + 1 - k_start)
        hi = q_start + b - k_start
        mask = window_mask(q0, b - a, k_start + lo, hi - lo, window, q.device)
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask))
    return torch.cat(outs, dim=2)


class RMSNorm(nn.Module):
    """Normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-2) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.window = shape.n_heads, shape.head_dim, shape.window
        inner = shape.n_heads * shape.head_dim
        self.wqkv = nn.Linear(shape.dim, 3 * inner, bias=False)
        self.wo = nn.Linear(inner, shape.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, start: int, state: StreamState | None) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope).transpose(1, 2), apply_rope(k, rope).transpose(1, 2)
        v = v.transpose(1, 2)
        k_start = start
        if state is not None:
            cached = state.get(self)
            if cached is not None:
                k, v = torch.cat([cached[0], k], dim=2), torch.cat([cached[1], v], dim=2)
                k_start = start - cached[0].shape[2]
            keep = min(self.window - 1, k.shape[2])
            state.set(self, (k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]))
        y = windowed_attention(q, k, v, start, k_start, self.window)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.attention = Attention(shape)
        self.feed_forward = FeedForward(shape.dim, shape.ffn_dim)
        self.attention_norm = RMSNorm(shape.dim, shape.norm_eps)
        self.ffn_norm = RMSNorm(shape.dim, shape.norm_eps)
        self.attention_layer_scale = LayerScale(shape.dim)
        self.ffn_layer_scale = LayerScale(shape.dim)

    def forward(self, x: Tensor, rope: Tensor, start: int, state: StreamState | None) -> Tensor:
        h = x + self.attention_layer_scale(self.attention(self.attention_norm(x), rope, start, state))
        return h + self.ffn_layer_scale(self.feed_forward(self.ffn_norm(h)))


class WindowLimitedTransformer(nn.Module):
    """Channels-first in and out: (B, C, T) -> (B, C, T)."""

    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.shape = shape
        self.layers = nn.ModuleList(TransformerBlock(shape) for _ in range(shape.n_layers))
        self.norm = RMSNorm(shape.dim, shape.norm_eps)

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        start = 0 if state is None else state.get(self, 0)
        h = x.transpose(1, 2)
        rope = rope_table(start, h.shape[1], self.shape.head_dim, self.shape.rope_base, h.device)
        for layer in self.layers:
            h = layer(h, rope, start, state)
        if state is not None:
            state.set(self, start + h.shape[1])
        return self.norm(h).transpose(1, 2)
