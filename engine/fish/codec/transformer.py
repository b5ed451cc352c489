"""The codec's causal, window-limited transformer (spec §5.2).

Pre-norm blocks with LayerScale, RMSNorm in float32, SwiGLU, interleaved-pair RoPE whose cos/sin
are rounded to bfloat16. A query at position i sees keys i-window+1 … i. Positions are absolute:
a streaming decode keeps counting where the previous call stopped and keeps the last window-1
keys/values, so it reproduces a whole-utterance pass exactly.
"""
from __future__ import annotations

import dataclasses
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.fish.layers import FeedForward, RMSNorm, apply_rope
from engine.fish.layers import rope_table as bf16_rope_table
from engine.fish.codec.config import TransformerShape
from engine.fish.codec.layers import StreamState

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
                table = bf16_rope_table(size, head_dim, base).to(device)
                _ROPE_TABLES[key] = table
    return table[start:end]


@dataclasses.dataclass(frozen=True)
class AttentionBlock:
    """Queries [q0, q1) attend keys [k0, k1) (indices into this call's query / key tensors)
    under `mask` (None: all allowed)."""

    q0: int
    q1: int
    k0: int
    k1: int
    mask: Tensor | None


def plan_attention(q_start: int, n: int, k_start: int, window: int, device: torch.device) -> list[AttentionBlock]:
    """How n queries at absolute positions q_start… attend keys at k_start … q_start+n-1 with a
    causal window: in query blocks of `window`, so memory is O(n·window) rather than O(n²).
    The same plan serves every layer of one call."""
    if n == 1 and q_start - k_start < window:
        return [AttentionBlock(0, 1, 0, q_start - k_start + 1, None)]
    blocks = []
    for a in range(0, n, window):
        b = min(n, a + window)
        lo = max(0, q_start + a - window + 1 - k_start)
        hi = q_start + b - k_start
        q = torch.arange(q_start + a, q_start + b, device=device)[:, None]
        k = torch.arange(k_start + lo, k_start + hi, device=device)[None, :]
        blocks.append(AttentionBlock(a, b, lo, hi, (k <= q) & (k > q - window)))
    return blocks


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, plan: list[AttentionBlock]) -> Tensor:
    """q (B, H, n, D), k/v (B, H, m, D) -> (B, H, n, D) following `plan`."""
    if len(plan) == 1 and plan[0].q0 == 0 and plan[0].q1 == q.shape[2]:
        p = plan[0]
        return F.scaled_dot_product_attention(q, k[:, :, p.k0:p.k1], v[:, :, p.k0:p.k1], attn_mask=p.mask)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, p.q0:p.q1], k[:, :, p.k0:p.k1], v[:, :, p.k0:p.k1],
                                                     attn_mask=p.mask) for p in plan], dim=2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-2) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, shape: TransformerShape) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.window = shape.n_heads, shape.head_dim, shape.window
        inner = shape.n_heads * shape.head_dim
        self.wqkv = nn.Linear(shape.dim, 3 * inner, bias=False)
        self.wo = nn.Linear(inner, shape.dim, bias=False)

    def forward(self, x: Tensor, rope: Tensor, plan: list[AttentionBlock], state: StreamState | None) -> Tensor:
        b, t, _ = x.shape
        qkv = self.wqkv(x).view(b, t, 3, self.n_heads, self.head_dim)
        q, k = apply_rope(qkv[:, :, :2], rope).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) each
        v = qkv[:, :, 2].transpose(1, 2)
        if state is not None:
            cached = state.get(self)
            if cached is not None:
                k, v = torch.cat([cached[0], k], dim=2), torch.cat([cached[1], v], dim=2)
            keep = min(self.window - 1, k.shape[2])
            state.set(self, (k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]))
        y = windowed_attention(q, k, v, plan)
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

    def forward(self, x: Tensor, rope: Tensor, plan: list[AttentionBlock], state: StreamState | None) -> Tensor:
        h = x + self.attention_layer_scale(self.attention(self.attention_norm(x), rope, plan, state))
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
        n = h.shape[1]
        rope = rope_table(start, n, self.shape.head_dim, self.shape.rope_base, h.device)
        # every layer has cached the last min(window-1, start) keys of earlier calls
        plan = plan_attention(start, n, start - min(self.shape.window - 1, start), self.shape.window, h.device)
        for layer in self.layers:
            h = layer(h, rope, plan, state)
        if state is not None:
            state.set(self, start + n)
        return self.norm(h).transpose(1, 2)
