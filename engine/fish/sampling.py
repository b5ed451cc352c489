"""Token sampling (spec §4): top-p on the untempered softmax, top-k, temperature, an
exponential-race draw, a windowed repetition penalty, and repetition-aware resampling (RAS).

`sample_rows` is the one sampling chain: it draws for a batch of rows, each with its own
settings (`RowSampling`), recent ids and exponential noise, and both decode paths call it (the
dynamic one in `generate.py`, the static one in `static_decode.py`). The noise comes in from the
caller, filled from each request's own generator, so a seeded request draws the same whatever
else shares its batch. Nothing here reads back to the host, so CUDA graphs can capture it.

Everything works on float32 logits over an already-restricted candidate set; restricting the
set (semantic tokens + <|im_end|> for the slow head) is exact because upstream gives every other
token a -inf bias.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from engine.speech.types import SamplingOptions

RAS_WINDOW = 10
RAS_TEMPERATURE = 1.0
RAS_TOP_P = 0.9
REPETITION_WINDOW = 16


def filtered_probs(logits: Tensor, temperature: float | Tensor, top_p: float | Tensor, top_k: int | Tensor) -> Tensor:
    """Probabilities after removing candidates beyond top_p cumulative mass (measured before
    temperature) or beyond rank top_k; the best candidate always survives. The settings are
    numbers, or (B, 1) tensors giving each row of a (B, V) batch its own."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    ranks = torch.arange(sorted_logits.size(-1), device=logits.device)
    remove_sorted = (cum > top_p) | (ranks >= top_k)
    remove_sorted[..., 0] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    temperature = temperature.clamp(min=1e-5) if isinstance(temperature, Tensor) else max(temperature, 1e-5)
    return torch.softmax(logits.masked_fill(remove, float("-inf")) / temperature, dim=-1)


def exponential_noise(shape: Sequence[int] | torch.Size, generator: torch.Generator | None,
                      device: torch.device | str = "cpu") -> Tensor:
    """The q ~ Exp(1) of one categorical draw by the exponential race argmax(p / q)."""
    return torch.empty(tuple(shape), device=device).exponential_(1.0, generator=generator)


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


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Each row's sampling settings as tensors: (B, 1) temperature, top_p, top_k and penalty,
    and (B,) greedy. The static decoder keeps one per slot in fixed buffers; the dynamic path
    builds one per request and concatenates the rows that step together."""

    temperature: Tensor
    top_p: Tensor
    top_k: Tensor
    penalty: Tensor
    greedy: Tensor

    @classmethod
    def ones(cls, rows: int, device: torch.device | str) -> RowSampling:
        """Placeholder settings for `rows` rows (filled with `write`)."""
        return cls(temperature=torch.ones(rows, 1, device=device), top_p=torch.ones(rows, 1, device=device),
                   top_k=torch.ones(rows, 1, dtype=torch.long, device=device),
                   penalty=torch.ones(rows, 1, device=device), greedy=torch.ones(rows, dtype=torch.bool, device=device))

    @classmethod
    def of(cls, options: SamplingOptions, device: torch.device | str) -> RowSampling:
        rows = cls.ones(1, device)
        rows.write(0, options)
        return rows

    def write(self, row: int, options: SamplingOptions) -> None:
        self.temperature[row] = options.temperature
        self.top_p[row] = options.top_p
        self.top_k[row] = options.top_k
        self.penalty[row] = options.repetition_penalty
        self.greedy[row] = options.greedy

    def head(self, n: int) -> RowSampling:
        """The first n rows (views: writes through)."""
        return RowSampling(*(getattr(self, f.name)[:n] for f in dataclasses.fields(self)))

    def select(self, rows: Tensor) -> RowSampling:
        return RowSampling(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    @staticmethod
    def cat(parts: Sequence[RowSampling]) -> RowSampling:
        if len(parts) == 1:
            return parts[0]
        return RowSampling(*(torch.cat([getattr(p, f.name) for p in parts])
                             for f in dataclasses.fields(RowSampling)))


def sample_rows(logits: Tensor, rows: RowSampling, noise: Tensor, previous: Tensor, valid: Tensor,
                ras_noise: Tensor | None = None, ras_exempt: int | None = None) -> Tensor:
    """One pick per row of (B, V) float32 logits: the repetition penalty on the row's `previous`
    ids (B, W) where `valid`, top-p / top-k / temperature, then the exponential race against
    `noise` (B, V); greedy rows take the argmax of the raw logits instead.

    With `ras_noise`, repetition-aware resampling: a pick found among the last RAS_WINDOW valid
    `previous` ids (other than `ras_exempt`, the end token) is replaced by a second draw at
    RAS_TEMPERATURE / RAS_TOP_P against `ras_noise`. Returns (B,) indices into V."""
    penalised = apply_repetition_penalty(logits, previous, rows.penalty, valid)
    picked = torch.argmax(filtered_probs(penalised, rows.temperature, rows.top_p, rows.top_k) / noise, dim=-1)
    if ras_noise is not None:
        high = torch.argmax(filtered_probs(penalised, RAS_TEMPERATURE, RAS_TOP_P, rows.top_k) / ras_noise, dim=-1)
        window, window_valid = previous[:, -RAS_WINDOW:], valid[:, -RAS_WINDOW:]
        repeated = ((window == picked[:, None]) & window_valid).any(dim=-1)
        if ras_exempt is not None:
            repeated &= picked != ras_exempt
        picked = torch.where(repeated, high, picked)
    return torch.where(rows.greedy, torch.argmax(logits, dim=-1), picked)
