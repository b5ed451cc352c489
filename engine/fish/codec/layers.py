"""Convolutional building blocks of the codec (spec §5.2), all causal.

Every layer takes an optional `StreamState`. Without one it pads with zeros on the left as a
whole-utterance pass does; with one it prepends the tail of the previous call's input instead,
so decoding in pieces gives the same samples as decoding at once.

Weight norm keeps the published parameter names (torch's `parametrizations.weight.original0/1`)
but the effective weight `g·v/‖v‖` is folded once into a buffer by `fold()` (Codec.fold_weight_norm)
rather than recomputed on every call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm


class StreamState:
    """Whatever a streaming decode must remember between calls, keyed by the module that owns it."""

    def __init__(self) -> None:
        self._items: dict[nn.Module, object] = {}

    def get(self, owner: nn.Module, default: object = None) -> object:
        return self._items.get(owner, default)

    def set(self, owner: nn.Module, value: object) -> None:
        self._items[owner] = value

    def with_left_context(self, owner: nn.Module, x: Tensor, size: int) -> Tensor:
        """x (B, C, T) with the last `size` steps of everything `owner` saw before prepended
        (zeros at the start), remembering the new tail for the next call."""
        tail = self._items.get(owner)
        if tail is None:
            tail = x.new_zeros(x.shape[0], x.shape[1], size)
        full = torch.cat([tail, x], dim=-1)
        # a copy, so the (possibly large) input is not kept alive between calls
        self._items[owner] = full[..., full.shape[-1] - size:].clone()
        return full


class _FoldedWeight(nn.Module):
    """Shared by the convs: `self.conv` may carry a weight-norm parametrization."""

    conv: nn.Module

    def _init_fold(self) -> None:
        self.register_buffer("folded_weight", None, persistent=False)

    def fold(self) -> None:
        if parametrize.is_parametrized(self.conv, "weight"):
            with torch.no_grad():
                self.folded_weight = self.conv.weight

    def clear_folded(self) -> None:
        self.folded_weight = None

    @property
    def weight(self) -> Tensor:
        return self.folded_weight if self.folded_weight is not None else self.conv.weight


class CausalConv1d(_FoldedWeight):
    """Conv1d padded on the left by `span - stride` and on the right just enough that the last
    partial window still yields a frame (upstream's `CausalConvNet`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, weight_normed: bool = True) -> None:
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups)
        self.conv = weight_norm(conv) if weight_normed else conv
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.span = (kernel_size - 1) * dilation + 1
        self.left_pad = self.span - stride
        self._init_fold()

    def _right_pad(self, length: int) -> int:
        padded = length + self.left_pad
        frames = -(-(padded - self.span) // self.stride) + 1
        return (frames - 1) * self.stride + self.span - padded

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        if state is not None:
            if self.stride != 1:
                raise ValueError("streaming is only defined for stride-1 convolutions")
            if self.left_pad:
                x = state.with_left_context(self, x, self.left_pad)
        elif self.stride == 1:
            # the conv's own (symmetric) zero padding, minus the outputs that only the right
            # padding produced: same values as padding on the left, without copying the input
            length = x.shape[-1]
            y = F.conv1d(x, self.weight, self.conv.bias, 1, self.left_pad, self.dilation, self.groups)
            return y[..., :length]
        else:
            x = F.pad(x, (self.left_pad, self._right_pad(x.shape[-1])))
        return F.conv1d(x, self.weight, self.conv.bias, self.stride, 0, self.dilation, self.groups)


class CausalConvTranspose1d(_FoldedWeight):
    """ConvTranspose1d whose overhang `kernel - stride` is cut from the right: T frames give
    T·stride samples. Weight norm is taken per input channel (dim 0), as upstream."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 weight_normed: bool = True) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError("kernel_size must be at least stride")
        conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.conv = weight_norm(conv, dim=0) if weight_normed else conv
        self.stride = stride
        self.overhang = kernel_size - stride
        # earlier input frames whose output still overlaps the next call's first samples
        self.context_frames = -(-self.overhang // stride)
        self._init_fold()

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        frames = x.shape[-1]
        if state is not None and self.context_frames:
            x = state.with_left_context(self, x, self.context_frames)
        y = F.conv_transpose1d(x, self.weight, self.conv.bias, self.stride)
        start = (x.shape[-1] - frames) * self.stride
        return y[..., start:start + frames * self.stride]


class Snake1d(nn.Module):
    """x + sin²(αx)/α, α per channel (the 1e-9 guards α = 0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))
        self.register_buffer("inv_alpha", None, persistent=False)

    def fold(self) -> None:
        self.inv_alpha = (self.alpha.detach() + 1e-9).reciprocal()

    def clear_folded(self) -> None:
        self.inv_alpha = None

    def forward(self, x: Tensor) -> Tensor:
        inv_alpha = self.inv_alpha if self.inv_alpha is not None else (self.alpha + 1e-9).reciprocal()
        # same arithmetic as x + (1/(α+1e-9))·sin(αx)², but in place on one buffer: these
        # tensors are the largest in the decoder and each extra pass costs memory bandwidth
        y = torch.mul(x, self.alpha).sin_()
        return y.mul_(y).mul_(inv_alpha).add_(x)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv_k(snake(x)))) with a dilated causal conv."""

    def __init__(self, channels: int, dilation: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.block = nn.ModuleList([
            Snake1d(channels),
            CausalConv1d(channels, channels, kernel_size, dilation=dilation),
            Snake1d(channels),
            CausalConv1d(channels, channels, 1),
        ])

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        snake1, conv1, snake2, conv2 = self.block
        return x + conv2(snake2(conv1(snake1(x), state)), state)


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv -> LayerNorm -> MLP (GELU) -> per-channel scale, plus the input."""

    def __init__(self, channels: int, kernel_size: int = 7, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(channels, channels, kernel_size, groups=channels, weight_normed=False)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, mlp_ratio * channels)
        self.pwconv2 = nn.Linear(mlp_ratio * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        h = self.dwconv(x, state).transpose(1, 2)
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)
