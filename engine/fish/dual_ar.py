"""The Dual-AR text-to-semantic transformer (spec §2): a slow transformer along time and a fast
transformer along the codebook axis. Parameter names match the published state dicts.

Numerics that fidelity depends on (spec §2.4): interleaved-pair RoPE whose cos/sin tables are
rounded to bfloat16, RMSNorm computed in float32, the √(K+1) scale of semantic-position
embeddings, and the pre- vs post-norm hidden state handed to the fast transformer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.fish.layers import FeedForward, RMSNorm, apply_rope, rope_table
from engine.fish.config import DualARConfig


class HeadRMSNorm(nn.Module):
    """Per-head q/k norm. Upstream uses the stock framework module; computing in fp32 is the safe
    equivalent (spec §10.8)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.type_as(x)


class KVCache:
    """Per-layer key/value storage (B, G, capacity, D) that grows on demand.

    Growing (rather than allocating max_seq_len up front) keeps one request's cache at the size it
    needs, so many concurrent requests fit in memory.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device, max_capacity: int) -> None:
        self.max_capacity = max_capacity
        capacity = min(capacity, max_capacity)
        self.k = torch.zeros(batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @classmethod
    def over(cls, k: Tensor, v: Tensor) -> KVCache:
        """A fixed-size cache over existing storage (e.g. one slot of a static batch cache)."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_capacity = k, v, k.size(2)
        return cache

    def reserve(self, length: int) -> None:
        cap = self.k.size(2)
        if length <= cap:
            return
        if length > self.max_capacity:
            raise ValueError(f"sequence of {length} positions exceeds the model context of {self.max_capacity}")
        new_cap = min(max(length, 2 * cap), self.max_capacity)
        grow = new_cap - cap
        pad = self.k.new_zeros(*self.k.shape[:2], grow, self.k.size(3))
        self.k = torch.cat([self.k, pad], dim=2)
        self.v = torch.cat([self.v, pad.clone()], dim=2)

    def write(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v (B, G, T, D) at [start, start+T) and return the whole cache. Attention masks
        the unused tail: a fixed shape per capacity lets CPU kernels and CUDA graphs be reused
        across steps instead of being rebuilt for every new length."""
        end = start + k.size(2)
        self.reserve(end)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k, self.v


def causal_mask(start: int, t: int, length: int, device: torch.device) -> Tensor:
    """Queries at absolute positions start..start+t-1 may see keys 0..their own position."""
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    return q_pos >= torch.arange(length, device=device)[None, :]


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_local_heads: int, head_dim: int, norm_eps: float,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = n_head, n_local_heads, head_dim
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_local_heads) * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=o_bias)
        if qk_norm:
            self.q_norm = HeadRMSNorm(head_dim, norm_eps)
            self.k_norm = HeadRMSNorm(head_dim, norm_eps)
        self.qk_norm = qk_norm

    def _project(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (B, heads, T, D), normed and rotated."""
        b, t, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, self.n_head, self.head_dim)
        k = k.view(b, t, self.n_local_heads, self.head_dim)
        v = v.view(b, t, self.n_local_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        # GQA without copying the cache: query head h reads KV head h // (n_head / n_local_heads).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_local_heads)

    def forward_rows(self, x: Tensor, rope: Tensor, caches: list[KVCache], starts: list[int]) -> Tensor:
        """One new position per row, each row with its own cache and position: the projections
        run batched (one read of the weights), only the attention itself runs per row."""
        b = x.size(0)
        q, k, v = self._project(x, rope)
        ys = []
        for i in range(b):
            ki, vi = caches[i].write(starts[i], k[i:i + 1], v[i:i + 1])
            ys.append(self._attend(q[i:i + 1], ki, vi, causal_mask(starts[i], 1, ki.size(2), x.device)))
        y = torch.cat(ys, dim=0)
        return self.wo(y.transpose(1, 2).reshape(b, 1, self.n_head * self.head_dim))

    def forward_static(self, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                       mask: Tensor, length: int) -> Tensor:
        """One new position per row at device-side positions `pos` (B,), written into fixed
        caches (B, G, capacity, D); attends over the first `length` positions. No host syncs, so
        it can be captured in a CUDA graph."""
        b = x.size(0)
        q, k, v = self._project(x, rope)
        rows = torch.arange(b, device=x.device)
        k_cache[rows, :, pos] = k[:, :, 0]
        v_cache[rows, :, pos] = v[:, :, 0]
        y = self._attend(q, k_cache[:, :, :length], v_cache[:, :, :length], mask)
        return self.wo(y.transpose(1, 2).reshape(b, 1, self.n_head * self.head_dim))

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None, start: int) -> Tensor:
        b, t, _ = x.shape
        q_size = self.n_head * self.head_dim
        q, k, v = self._project(x, rope)
        if cache is not None:
            k, v = cache.write(start, k, v)
            if t > 1:  # prefill: attend over the filled part only (3x fewer keys than capacity)
                k, v = k[:, :, :start + t], v[:, :, :start + t]
        y = self._attend(q, k, v, causal_mask(start, t, k.size(2), x.device))
        return self.wo(y.transpose(1, 2).reshape(b, t, q_size))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_head: int, n_local_heads: int, head_dim: int, hidden: int, norm_eps: float,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.attention = Attention(dim, n_head, n_local_heads, head_dim, norm_eps, qkv_bias, o_bias, qk_norm)
        self.feed_forward = FeedForward(dim, hidden)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None, start: int) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache, start)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_static(self, x: Tensor, rope: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                       mask: Tensor, length: int) -> Tensor:
        h = x + self.attention.forward_static(self.attention_norm(x), rope, k_cache, v_cache, pos, mask, length)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_rows(self, x: Tensor, rope: Tensor, caches: list[KVCache], starts: list[int]) -> Tensor:
        h = x + self.attention.forward_rows(self.attention_norm(x), rope, caches, starts)
        return h + self.feed_forward(self.ffn_norm(h))


class DualARTransformer(nn.Module):
    """Slow + fast transformers. Parameter names equal the published internal key names."""

    def __init__(self, config: DualARConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.codebook_embeddings = nn.Embedding(c.codebook_size * c.num_codebooks, c.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim, c.n_head, c.n_local_heads, c.head_dim, c.intermediate_size, c.norm_eps,
                             c.attention_qkv_bias, c.attention_o_bias, c.attention_qk_norm)
            for _ in range(c.n_layer)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        if not c.tie_word_embeddings:
            self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.fast_dim != c.dim:
            self.fast_project_in = nn.Linear(c.dim, c.fast_dim)
        self.fast_embeddings = nn.Embedding(c.codebook_size, c.fast_dim)
        self.fast_layers = nn.ModuleList(
            TransformerBlock(c.fast_dim, c.fast_n_head, c.fast_n_local_heads, c.fast_head_dim,
                             c.fast_intermediate_size, c.norm_eps, c.fast_attention_qkv_bias,
                             c.fast_attention_o_bias, c.fast_attention_qk_norm)
            for _ in range(c.n_fast_layer)
        )
        self.fast_norm = RMSNorm(c.fast_dim, c.norm_eps)
        self.fast_output = nn.Linear(c.fast_dim, c.codebook_size, bias=False)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """RoPE tables are derived, never stored (non-persistent buffers); rebuilt after a meta-device
        construction. They stay float32 whatever the weight dtype (bf16-rounded values, fp32 math)."""
        c = self.config
        self.register_buffer("rope", rope_table(c.max_seq_len, c.head_dim, c.rope_base).to(device),
                             persistent=False)
        self.register_buffer("fast_rope", rope_table(c.num_codebooks, c.fast_head_dim, c.rope_base).to(device),
                             persistent=False)

    # --- embeddings and heads
    def embed(self, inp: Tensor) -> Tensor:
        """inp: (B, K+1, T) -> (B, T, dim), spec §2.4 'Embedding'."""
        c = self.config
        offsets = torch.arange(c.num_codebooks, device=inp.device).view(1, -1, 1) * c.codebook_size
        vq = self.codebook_embeddings(inp[:, 1:] + offsets).sum(dim=1)  # (B, T, dim)
        tokens = inp[:, 0]
        semantic = (tokens >= c.semantic_begin_id) & (tokens <= c.semantic_end_id)
        x = self.embeddings(tokens) + vq * semantic.unsqueeze(-1).to(vq.dtype)
        if c.scale_codebook_embeddings:
            x = torch.where(semantic.unsqueeze(-1), x / math.sqrt(c.num_codebooks + 1), x)
        return x

    def head_weight(self) -> Tensor:
        head = self.embeddings if self.config.tie_word_embeddings else self.output
        return head.dequantize() if hasattr(head, "dequantize") else head.weight

    def head_rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` of the output head in the compute dtype (only these rows of a quantized
        head are dequantized)."""
        head = self.embeddings if self.config.tie_word_embeddings else self.output
        return head.rows(ids) if hasattr(head, "rows") else head.weight[ids]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (of activations and KV caches), also when the weights are quantized."""
        return self.norm.weight.dtype

    def to_fast_input(self, hidden: Tensor, normed: Tensor) -> Tensor:
        x = normed if self.config.norm_fastlayer_input else hidden
        return self.fast_project_in(x) if hasattr(self, "fast_project_in") else x

    # --- forward passes
    def forward_slow(self, inp: Tensor, caches: list[KVCache] | None, start: int) -> tuple[Tensor, Tensor]:
        """Run the slow transformer over positions [start, start+T) and return, for the LAST
        position only, (pre-norm hidden, post-norm hidden), each (B, 1, dim)."""
        x = self.embed(inp)
        rope = self.rope[start:start + x.size(1)]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, caches[i] if caches is not None else None, start)
        x = x[:, -1:]
        return x, self.norm(x)

    def forward_slow_rows(self, inp: Tensor, caches: list[list[KVCache]], starts: list[int]) -> tuple[Tensor, Tensor]:
        """Decode one position for each of B independent sequences. inp: (B, K+1, 1);
        caches[b] is sequence b's per-layer cache list; starts[b] its position."""
        x = self.embed(inp)
        rope = self.rope[torch.tensor(starts, device=x.device)].unsqueeze(1)  # (B, 1, D/2, 2)
        for i, layer in enumerate(self.layers):
            x = layer.forward_rows(x, rope, [c[i] for c in caches], starts)
        return x, self.norm(x)

    def forward_fast(self, x: Tensor, caches: list[KVCache], pos: int) -> Tensor:
        """One fast step at codebook position `pos` for input (B, 1, fast_dim); returns the
        normalised hidden (B, 1, fast_dim) for the caller's (possibly row-restricted) head."""
        rope = self.fast_rope[pos:pos + 1]
        for layer, cache in zip(self.fast_layers, caches):
            x = layer(x, rope, cache, pos)
        return self.fast_norm(x)

    def new_slow_caches(self, batch: int, capacity: int) -> list[KVCache]:
        c, p = self.config, self.norm.weight
        return [KVCache(batch, c.n_local_heads, c.head_dim, capacity, p.dtype, p.device, c.max_seq_len)
                for _ in range(c.n_layer)]

    def new_fast_caches(self, batch: int) -> list[KVCache]:
        c, p = self.config, self.norm.weight
        return [KVCache(batch, c.fast_n_local_heads, c.fast_head_dim, c.num_codebooks, p.dtype, p.device,
                        c.num_codebooks) for _ in range(c.n_fast_layer)]
