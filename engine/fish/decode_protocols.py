"""What the static decoder reads from the runner and the sequences it decodes, as protocols.

`generate.py` builds on `static_decode.py`; this module lets the static decoder name the
runner's and the generators' parts without importing `generate.py` back.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from engine.fish.dual_ar import DualARTransformer
    from engine.speech.types import SamplingOptions


class DecodeRunner(Protocol):
    """A loaded model with its heads restricted to what generation can emit."""

    model: DualARTransformer
    im_end_id: int
    slow_candidates: Tensor  # vocabulary ids of the slow head's candidates; index 0 is <|im_end|>
    slow_head: Tensor  # (candidates, dim)
    fast_head: Tensor  # (fast_vocab, fast_dim)
    fast_vocab: int

    @property
    def device(self) -> torch.device: ...


class SlotSequence(Protocol):
    """One sequence as the static decoder sees it."""

    slot: int | None
    sampling: SamplingOptions
    generator: torch.Generator | None
    position: int  # the next slow position to fill
