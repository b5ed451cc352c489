"""Weight-only int8 for the codec's linear layers (the quantizer's transformers and ConvNeXt MLPs).

They hold 250M of the published codec's 391M parameters, and a streaming push of a few frames
reads every one of them for a handful of rows, which on a CPU is bound by memory bandwidth. As
int8 (`engine.fish.quantize.Int8Linear`, bfloat16 activations into torch's packed kernel) they
take a quarter of the bytes. The convolutions, where the decoder spends its arithmetic, stay float32.

Every row count goes through the same packed kernel, whose rows do not depend on each other, so a
streamed decode still equals the whole-utterance decode of the same quantized codec.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.fish.quantize import Int8Linear, release_pages, return_freed_heap


class RowExactInt8Linear(Int8Linear):
    """Int8Linear that never switches to its dequantized GEMM for many rows: that GEMM rounds
    differently, and a whole-utterance decode (many rows) must match a streamed one (few)."""

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(self.scale.dtype).contiguous()  # the kernel needs unit stride
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        y = y.view(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_codec_linears(codec: nn.Module) -> int:
    """Replace every nn.Linear under `codec.quantizer` by its int8 form, in place (CPU only).
    Returns how many were replaced."""
    names = [name for name, m in codec.quantizer.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        linear = codec.quantizer.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        q = RowExactInt8Linear.from_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())
        setattr(codec.quantizer.get_submodule(parent) if parent else codec.quantizer, leaf, q)
        release_pages(linear.weight)  # the float weight may be a memory-mapped checkpoint page
        return_freed_heap()
    return len(names)

