"""Token sampling (spec §4): top-p on the untempered softmax, top-k, temperature, an
exponential-race draw, a windowed repetition penalty, and repetition-aware resampling (RAS).

Everything works on float32 logits over an already-restricted candidate set; restricting the
set (semantic tokens + <|im_end|> for the slow head) is exact because upstream gives every other
token a -inf bias.
"""
from __future__ import annotations

import torch
from torch import Tensor

RAS_WINDOW = 10
RAS_TEMPERATURE = 1.0
RAS_TOP_P = 0.9
REPETITION_WINDOW = 16


def filtered_probs(logits: Tensor, temperature: float | Tensor, top_p: float | Tensor, top_k: int | Tensor) -> Tensor:
    """Probabilities after removing candidates beyond top_p cumulative mass (measured before
    temperature) or beyond rank top_k; the best candidate always survives. The settings are
    numbers, or (B, 1) tensors giving each row of a (B, V) batch its own (the static decoder)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    ranks = torch.arange(sorted_logits.size(-1), device=logits.device)
    remove_sorted = (cum > top_p) | (ranks >= top_k)
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    temperature = temperature.clamp(min=1e-5) if isinstance(temperature, Tensor) else max(temperature, 1e-5)
    return torch.softmax(logits.masked_fill(remove, float("-inf")) / temperature, dim=-1)


def draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Categorical draw via the exponential race argmax(p / q), q ~ Exp(1)."""
    q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / q, dim=-1)


def apply_repetition_penalty(logits: Tensor, previous: Tensor, penalty: float | Tensor,
                             valid: Tensor | None = None) -> Tensor:
    """Divide positive (multiply negative) logits of recently emitted ids by `penalty`. Batched
    callers pass (B, W) ids with `valid` marking the real ones and a (B, 1) penalty per row."""
    if isinstance(penalty, float) and penalty == 1.0 or previous.numel() == 0:
        return logits
    marks = torch.ones_like(previous, dtype=logits.dtype) if valid is None else valid.to(logits.dtype)
    hits = torch.zeros_like(logits).scatter_add_(-1, previous.long().clamp(0, logits.size(-1) - 1), marks)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(hits > 0, penalised, logits)
