"""Weight-only quantization of the Dual-AR model for CPU decoding (issue #21).

Decoding one frame reads every transformer weight once per step, so on a CPU its speed is set by
how many bytes the weights take. Here the linear layers of the slow and fast transformers keep
their weights as int8 (one scale per output channel) or int4 (a scale and zero point per group
of 32 inputs) and multiply with torch's own weight-packed kernels
(`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`, the kernels gpt-fast uses).
Embedding tables and the untied output head, which decoding only reads a few rows of, are kept
as int8 rows: that is what brings a loaded S1-mini under the memory target.

Activations stay in the model's dtype outside the kernels (norms, attention, KV caches); the
kernels take bfloat16 activations, which is the path torch vectorises on CPU.

Quantization happens at load time, one tensor at a time from the (memory-mapped) checkpoint, so
no float32 copy of the whole model is ever held.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QuantizeMode = Literal["none", "int8", "int4"]
QUANTIZE_MODES: tuple[str, ...] = ("none", "int8", "int4")
INT4_GROUP = 32  # inputs per int4 scale/zero pair: smaller groups, smaller error, more scale bytes
KERNEL_DTYPE = torch.bfloat16  # activation dtype the packed kernels are vectorised for on CPU
# More rows than this (a prompt's prefill) go through a dequantized float GEMM: the packed kernels
# are made for matrix-vector work and are ~1.5x slower than MKL's GEMM on a 260-row prefill.
DEQUANT_ROWS = 8
ROW_CHUNK = 4096  # rows quantized at a time (bounds the float32 temporaries while loading)


# Below this width a CPU decode step is bound by per-op overhead, not weight bytes, and int8's
# per-call activation quantising only adds to it: the tiny test checkpoint (dim 64) speaks 0.19-0.25
# CPU-s per call-second in float against 0.28-0.42 in int8 (bench_webrtc), sustaining 3 calls not 2.
# The published models (dim 1024 and up) are bound by weight bytes and gain from int8.
MIN_INT8_DIM = 512


def default_quantize(device: torch.device | str, model_dim: int | None = None) -> QuantizeMode:
    """int8 on a CPU (decoding there is bound by weight bytes) unless the model is narrower than
    MIN_INT8_DIM; none on a GPU (the float path with CUDA graphs is already fast and exact)."""
    if torch.device(device).type != "cpu" or (model_dim is not None and model_dim < MIN_INT8_DIM):
        return "none"
    return "int8"


def check_mode(mode: str | None) -> QuantizeMode:
    mode = mode or "none"
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


# --- the numbers


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: weight ≈ q * scale[:, None]. Returns (q int8, scale float32).
    Works through `ROW_CHUNK` rows at a time: a 160k-row embedding table never exists in float32."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.size(0), dtype=torch.float32, device=weight.device)
    for i in range(0, weight.size(0), ROW_CHUNK):
        w = weight[i:i + ROW_CHUNK].float()
        s = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q[i:i + ROW_CHUNK] = torch.round(w / s[:, None]).clamp(-127, 127)
        scale[i:i + ROW_CHUNK] = s
    return q, scale


def int4_groups(weight: Tensor, group: int = INT4_GROUP) -> tuple[Tensor, Tensor]:
    """Asymmetric int4 per group of `group` inputs: weight ≈ (q - 8) * scale + zero, the
    convention of torch's int4 kernels. Returns (q int32 in 0..15, (in/group, out, 2) scale/zero)."""
    out_f, in_f = weight.shape
    q = torch.empty(weight.shape, dtype=torch.int32, device=weight.device)
    sz = torch.empty(in_f // group, out_f, 2, dtype=torch.float32, device=weight.device)
    for i in range(0, out_f, ROW_CHUNK):
        w = weight[i:i + ROW_CHUNK].float()
        w = w.view(w.size(0), in_f // group, group)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q[i:i + ROW_CHUNK] = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).view(w.size(0), in_f)
        sz[:, i:i + ROW_CHUNK] = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1)
    return q, sz


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor) -> Tensor:
    """The float weight that (q, scales_and_zeros) from `int4_groups` stand for."""
    out_f, in_f = q.shape
    group = in_f // scales_and_zeros.size(0)
    sz = scales_and_zeros.float().transpose(0, 1)  # (out, groups, 2)
    w = (q.view(out_f, -1, group).float() - 8) * sz[..., 0:1] + sz[..., 1:2]
    return w.view(out_f, in_f)


# --- the layers


def _dequantized_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """What the packed kernels compute (bfloat16 activations in, float32 sums, bfloat16 out), as
    one float GEMM. Same numbers on both paths matter: a prompt prefilled here and the same prompt
    continued from the prefix cache through the kernel must sample the same codes."""
    y = F.linear(x.to(KERNEL_DTYPE).to(weight.dtype), weight).to(KERNEL_DTYPE).to(x.dtype)
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one float scale per output channel."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.size(1), q.size(0)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(KERNEL_DTYPE))
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Int8Linear:
        q, scale = int8_rows(weight)
        return cls(q, scale, None if bias is None else bias.to(dtype))

    def dequantize(self) -> Tensor:
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if x.numel() // shape[-1] > DEQUANT_ROWS:
            return _dequantized_linear(x, self.dequantize(), self.bias)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(KERNEL_DTYPE), self.weight_int8,
                                               self.scale.to(KERNEL_DTYPE))  # a no-op unless module.to() cast it
        y = y.view(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """nn.Linear with int4 weights (packed for torch's CPU kernel) and a scale/zero per group."""

    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, in_features: int, bias: Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, packed.size(0)
        self.group = in_features // scales_and_zeros.size(0)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(KERNEL_DTYPE))
        self.register_buffer("bias", bias)

    @staticmethod
    def supports(out_features: int, in_features: int, group: int = INT4_GROUP) -> bool:
        """Whole 32-row blocks of the CPU packing (`dequantize` reads them) and whole groups."""
        return out_features % 32 == 0 and in_features % group == 0

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None = None, dtype: torch.dtype = torch.float32,
                    group: int = INT4_GROUP) -> Int4Linear:
        q, sz = int4_groups(weight, group)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(packed, sz, weight.size(1), None if bias is None else bias.to(dtype))

    def dequantize(self) -> Tensor:
        """The float weight. The CPU packing keeps blocks of 32 output rows, each as (in, 16) bytes
        whose low nibbles are rows 0-15 of the block and high nibbles rows 16-31 (checked against
        the kernel in the tests)."""
        n, k = self.out_features, self.in_features
        blocks = self.weight_int4.view(n // 32, k, 16)
        q = torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(n, k)
        return dequantize_int4(q, self.scales_and_zeros)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if x.numel() // shape[-1] > DEQUANT_ROWS:
            return _dequantized_linear(x, self.dequantize(), self.bias)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(KERNEL_DTYPE), self.weight_int4,
                                                       self.group, self.scales_and_zeros.to(KERNEL_DTYPE))
        y = y.view(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group}"


class Int8Embedding(nn.Module):
    """An embedding table (or an output head read by rows) as int8 rows with one scale each.
    Lookups dequantize only the rows they read."""

    def __init__(self, q: Tensor, scale: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.dtype = dtype
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)

    @classmethod
    def from_weight(cls, weight: Tensor, dtype: torch.dtype = torch.float32) -> Int8Embedding:
        return cls(*int8_rows(weight), dtype=dtype)

    def rows(self, ids: Tensor) -> Tensor:
        return (self.weight_int8[ids].float() * self.scale[ids].unsqueeze(-1)).to(self.dtype)

    def dequantize(self) -> Tensor:
        return self.rows(torch.arange(self.num_embeddings, device=self.weight_int8.device))

    def forward(self, ids: Tensor) -> Tensor:
        return self.rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


QUANTIZED_TYPES = (Int8Linear, Int4Linear, Int8Embedding)


# --- which parameters, and quantizing a model as it loads

# Tables read by rows: quantized as int8 rows whatever the mode (they are most of the bytes).
ROW_TABLES = ("embeddings", "codebook_embeddings", "output")


def quantized_linear_names(model: nn.Module) -> list[str]:
    """The transformer linear layers (slow and fast, and the fast input projection)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (name.startswith(("layers.", "fast_layers.")) or name == "fast_project_in")]


def quantize_module(weight: Tensor, bias: Tensor | None, mode: QuantizeMode, dtype: torch.dtype) -> nn.Module | None:
    """A quantized replacement for a linear layer, or None where the mode can't pack its shape."""
    if mode == "int8":
        return Int8Linear.from_weight(weight, bias, dtype)
    if mode == "int4" and Int4Linear.supports(*weight.shape):
        return Int4Linear.from_weight(weight, bias, dtype)
    if mode == "int4":  # a shape the int4 packing can't hold: int8 still halves it
        return Int8Linear.from_weight(weight, bias, dtype)
    return None


def quantize_state(model: nn.Module, state: dict[str, Tensor], mode: QuantizeMode, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> int:
    """Replace `model`'s (meta) linear layers and row tables with quantized modules built from
    `state`, popping the float tensors they consumed one at a time. Returns how many modules were
    replaced; what is left in `state` loads as usual."""
    if mode == "none":
        return 0

    def take(key: str) -> Tensor | None:
        return state.pop(key, None)

    replaced = 0
    for name in quantized_linear_names(model):
        weight, bias = take(name + ".weight"), take(name + ".bias")
        module = quantize_module(weight.to(device), None if bias is None else bias.to(device), mode, dtype)
        _set_submodule(model, name, module)
        release_pages(weight)
        return_freed_heap()  # on a loading thread glibc would otherwise keep every temporary
        replaced += 1
    for name in ROW_TABLES:
        if isinstance(getattr(model, name, None), (nn.Embedding, nn.Linear)):
            weight = take(name + ".weight")
            _set_submodule(model, name, Int8Embedding.from_weight(weight.to(device), dtype))
            release_pages(weight)
            return_freed_heap()
            replaced += 1
    return replaced


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim now; file pages are re-read if touched, anonymous ones kept


def release_pages(t: Tensor) -> None:
    """Let the kernel take back the pages of a checkpoint tensor we are done with. The checkpoint
    is memory-mapped and its pages stay resident until the whole file is unmapped, so without this
    a quantized load peaks at the file's size plus the quantized model. PAGEOUT never loses data
    (a later read faults the page in again), and where it is unsupported it is simply skipped."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < (1 << 20):
        return
    try:
        import ctypes
        import mmap

        page = mmap.PAGESIZE
        start = -(-t.data_ptr() // page) * page
        end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
        if end > start:
            ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                                      _MADV_PAGEOUT)
    except (OSError, AttributeError):
        pass


def return_freed_heap() -> None:
    """Give glibc's freed heap back to the OS. Quantizing frees float temporaries that glibc keeps:
    on the server's loading thread (a thread arena, which glibc hardly ever shrinks) loading the
    full-size S1-mini as int8 peaked 1.4 GB above what it kept, in the main thread the codec
    kept ~450 MB. Called after each quantized tensor, it bounds that to one tensor's
    temporaries. A no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quantize_model(model: nn.Module, mode: QuantizeMode) -> nn.Module:
    """Quantize an already loaded float model in place (tests, benchmarks with random weights)."""
    if mode == "none":
        return model
    dtype = next(p for n, p in model.named_parameters() if n.endswith("norm.weight")).dtype
    state = {k: v for k, v in model.state_dict().items()}
    quantize_state(model, state, mode, dtype, device=next(model.parameters()).device)
    return model


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (what the weights cost in memory)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def describe(model: nn.Module) -> str:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QUANTIZED_TYPES):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    parts = [f"{n} {k}" for k, n in sorted(counts.items())]
    return (", ".join(parts) or "no quantized layers") + f"; weights {weight_bytes(model) / 2**20:.0f} MiB"

