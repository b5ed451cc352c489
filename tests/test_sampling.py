"""The one sampling chain (`engine.fish.sampling.sample_rows`) that both decode paths call."""
from __future__ import annotations

import torch

from engine.fish.sampling import RowSampling, sample_rows
from engine.speech.types import SamplingOptions


def _rows(*options: SamplingOptions) -> RowSampling:
    return RowSampling.cat([RowSampling.of(o, "cpu") for o in options])


def test_repetition_aware_resampling_replaces_only_valid_recent_repeats():
    """Index 3 wins the normal draw and index 5 the RAS draw (by their noise); RAS applies only
    when 3 is among the valid recent picks and is not the exempt (end) index."""
    logits = torch.tensor([[0.0, 0.1, 0.2, 2.0, 0.3, 1.9, 0.0, 0.0]]).repeat(4, 1)
    noise = torch.ones(4, 8)
    noise[:, 3] = 1e-6  # the normal draw lands on 3
    ras_noise = torch.ones(4, 8)
    ras_noise[:, 5] = 1e-6  # the RAS draw lands on 5
    previous = torch.tensor([[3, 1], [1, 2], [3, 1], [3, 1]])
    valid = torch.tensor([[True, True], [True, True], [False, True], [True, True]])
    rows = _rows(*[SamplingOptions(temperature=1.0, top_p=1.0, top_k=8, repetition_penalty=1.0)] * 4)
    picked = sample_rows(logits, rows, noise, previous, valid, ras_noise=ras_noise, ras_exempt=None)
    assert picked[:3].tolist() == [5, 3, 3]  # repeated -> resampled; not recent; recent but not valid
    exempt = sample_rows(logits[3:], rows.head(1), noise[3:], previous[3:], valid[3:], ras_noise=ras_noise[3:],
                         ras_exempt=3)
    assert exempt.tolist() == [3]


def test_greedy_rows_take_the_raw_argmax_beside_sampled_rows():
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0], [0.0, 3.0, 2.9, 0.0]])
    noise = torch.tensor([[1.0, 1.0, 1e-6, 1.0]] * 2)  # would make a sampled row pick 2
    previous = torch.tensor([[1], [1]])  # a strong penalty on 1 as well
    rows = _rows(SamplingOptions(greedy=True, repetition_penalty=3.0),
                 SamplingOptions(temperature=1.0, top_p=1.0, repetition_penalty=3.0))
    picked = sample_rows(logits, rows, noise, previous, torch.ones_like(previous, dtype=torch.bool))
    assert picked.tolist() == [1, 2]

