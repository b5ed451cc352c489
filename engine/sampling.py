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


def filtered_probs(logits: Tensor, temperature: float, top_p: float, top_k: int) -> Tensor:
    """Probabilities after removing candidates beyond top_p cumulative mass (measured before
    temperature) or beyond rank top_k; the best candidate always survives."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    ranks = torch.arange(sorted_logits.size(-1), device=logits.device)
    remove_sorted = (cum > top_p) | (ranks >= top_k)
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    logits = logits.masked_fill(remove, float("-inf")) / max(temperature, 1e-5)
    return torch.softmax(logits, dim=-1)


def draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Categorical draw via the exponential race argmax(p / q), q ~ Exp(1)."""
    q = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / q, dim=-1)


def apply_repetition_penalty(logits: Tensor, previous: Tensor, penalty: float) -> Tensor:
    """Divide positive (multiply negative) logits of recently emitted ids by `penalty`."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    previous = previous.long()
    score = logits.gather(-1, previous)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, previous, score)
