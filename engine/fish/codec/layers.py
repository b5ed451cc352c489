"""Convolutional building blocks of the codec (spec §5.2), all causal.

Every layer takes an optional `StreamState`. Without one it pads with zeros on the left as a
whole-utterance pass does; with one it prepends the tail of the previous call's input instead,
so decoding in pieces gives the same samples as decoding at once.

Weight norm keeps the published parameter names (torch's `parametrizations.weight.original0/1`)
but the effective weight `g·v/‖v‖` is folded once into a buffer by `fold()` (Codec.fold_weight_norm)
rather than recomputed on every call.

On a CPU the convolutions whose weights outweigh their input (the wide first layers, every 1×1
conv, and the transposed convs) run as one matrix multiply instead of through oneDNN, which
re-lays out the whole weight on every call: for a streaming push of a few frames that re-layout
cost more than the arithmetic (`gemm_conv1d`, `gemm_conv_transpose1d`).
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


# Below this many input elements (and with batch 1) torch runs a CPU conv through its reference
# kernels rather than oneDNN; for a dilated conv that is `slow_conv_dilated2d`, 2-3x slower than
# the GEMM below on the small tail layers of a streaming decode (8 channels x 2102 steps: 225 vs
# 89 us, identical results). Mirrors the size test of ATen's `use_mkldnn`.
ONEDNN_MIN_ELEMENTS = 20480


def gemm_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor | None:
    """Stride-1, ungrouped conv1d of an already padded x (B, C_in, L) as one GEMM per batch row
    (im2col: the k taps as one strided view), or None where oneDNN is the better choice: a long
    input whose column matrix would outweigh the weight. A small dilated input always takes the
    GEMM: oneDNN would not get it, and torch's reference dilated kernel is the slowest path."""
    c_out, c_in, k = weight.shape
    span = (k - 1) * dilation + 1
    t_out = x.shape[-1] - span + 1
    small_dilated = dilation > 1 and x.numel() <= ONEDNN_MIN_ELEMENTS
    if k > 1 and weight.numel() < c_in * k * t_out and not small_dilated:
        return None
    w = weight.reshape(c_out, c_in * k)  # (C_out, C_in·k), columns ordered (channel, tap)
    rows = []
    for xb in x:
        # (C_in, t_out, k) windows -> (C_in, k, t_out) rows of the column matrix
        cols = xb if k == 1 else xb.unfold(-1, span, 1)[:, :, ::dilation].transpose(1, 2)
        cols = cols.reshape(c_in * k, t_out)
        rows.append(torch.mm(w, cols) if bias is None else torch.addmm(bias[:, None], w, cols))
    return torch.stack(rows)


def gemm_conv_transpose1d(x: Tensor, weight_ikc: Tensor, bias: Tensor | None, stride: int) -> Tensor:
    """conv_transpose1d(x, weight, bias, stride) for kernel = m·stride, given the weight laid out
    (C_in, kernel, C_out): one GEMM gives every input frame's m·stride output samples, and
    overlapping frames are summed with m shifted adds."""
    c_in, kernel, c_out = weight_ikc.shape
    m = kernel // stride
    b, _, t = x.shape
    out = x.new_empty(b, c_out, (t + m - 1) * stride)
    for i, xb in enumerate(x):
        z = torch.mm(xb.t(), weight_ikc.view(c_in, kernel * c_out)).view(t, m, stride, c_out)
        acc = z.new_zeros(t + m - 1, stride, c_out)
        for r in range(m):
            acc[r:r + t] += z[:, r]
        acc = acc.view(-1, c_out).t()
        if bias is None:
            out[i].copy_(acc)
        else:
            torch.add(acc, bias[:, None], out=out[i])
    return out


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
            if self._gemm_eligible(x):
                y = gemm_conv1d(F.pad(x, (self.left_pad, 0)), self.weight, self.conv.bias, self.dilation)
                if y is not None:
                    return y
            # the conv's own (symmetric) zero padding, minus the outputs that only the right
            # padding produced: same values as padding on the left, without copying the input
            length = x.shape[-1]
            y = F.conv1d(x, self.weight, self.conv.bias, 1, self.left_pad, self.dilation, self.groups)
            return y[..., :length]
        else:
            x = F.pad(x, (self.left_pad, self._right_pad(x.shape[-1])))
        if self.stride == 1 and self._gemm_eligible(x):
            y = gemm_conv1d(x, self.weight, self.conv.bias, self.dilation)
            if y is not None:
                return y
        return F.conv1d(x, self.weight, self.conv.bias, self.stride, 0, self.dilation, self.groups)

    def _gemm_eligible(self, x: Tensor) -> bool:
        return x.device.type == "cpu" and self.groups == 1


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
        # (C_in, kernel, C_out) copy of the weight for the CPU GEMM path (fold); when the weight is
        # weight-normed, folded_weight is a view of it rather than a second copy
        self.register_buffer("gemm_weight", None, persistent=False)

    def fold(self) -> None:
        if self.conv.kernel_size[0] % self.stride:
            return super().fold()
        with torch.no_grad():
            self.gemm_weight = self.weight.detach().permute(0, 2, 1).contiguous()
            if parametrize.is_parametrized(self.conv, "weight"):
                self.folded_weight = self.gemm_weight.permute(0, 2, 1)

    def clear_folded(self) -> None:
        self.folded_weight = self.gemm_weight = None

    def forward(self, x: Tensor, state: StreamState | None = None) -> Tensor:
        frames = x.shape[-1]
        if state is not None and self.context_frames:
            x = state.with_left_context(self, x, self.context_frames)
        if self.gemm_weight is not None and x.device.type == "cpu":
            y = gemm_conv_transpose1d(x, self.gemm_weight, self.conv.bias, self.stride)
        else:
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
