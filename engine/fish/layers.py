"""Building blocks shared by the Dual-AR transformer and the codec's transformers: RMSNorm,
SwiGLU, and interleaved-pair RoPE with bf16-rounded tables (spec §2.4, §5.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Normalise in float32, cast back, then scale (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_table(length: int, head_dim: int, base: float) -> Tensor:
    """(length, head_dim/2, 2) cos/sin for positions 0..length-1, rounded to bfloat16 as upstream
    does and kept in float32. Built on the CPU through torch.polar like upstream: cos/sin differ in
    rare last bits otherwise, which the bf16 rounding turns into whole-step differences."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cis = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([cis.real, cis.imag], dim=-1).to(torch.bfloat16).float()


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate interleaved pairs (2m, 2m+1) of x (B, T, ..., D) in fp32 and cast back. `table` is
    (T, D/2, 2) shared by the batch, or (B, T, D/2, 2) when each row has its own positions."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    rows = table.size(0) if table.dim() == 4 else 1
    t = table.view(rows, xf.shape[1], *([1] * (xf.dim() - 4)), xf.shape[-2], 2)
    cos, sin = t[..., 0], t[..., 1]
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).type_as(x)
