"""Build the Dual-AR model for a checkpoint and load its weights strictly."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.fish.checkpoint import CheckpointError, check_keys, load_llm_state_dict
from engine.fish.config import DualARConfig
from engine.fish.dual_ar import DualARTransformer
from engine.fish.quantize import QuantizeMode, quantize_state


def build_on_meta(config: DualARConfig) -> DualARTransformer:
    with torch.device("meta"):
        return DualARTransformer(config)


def load_dual_ar(checkpoint_dir: Path, config: DualARConfig, device: torch.device | str,
                 dtype: torch.dtype, quantize: QuantizeMode = "none") -> DualARTransformer:
    """Weights from the checkpoint into a model built from `config` (semantic ids already set).

    The model is built on the meta device and the loaded tensors are assigned in place, so a
    multi-GB checkpoint is never held twice in memory. With `quantize` int8/int4 the linear
    layers and row tables are quantized one tensor at a time from the memory-mapped checkpoint.
    """
    state = load_llm_state_dict(checkpoint_dir)
    model = build_on_meta(config)
    expected = model.state_dict()
    check_keys(expected.keys(), state.keys(), f"weights in {checkpoint_dir}")
    wrong = [f"{k}: expected {tuple(v.shape)}, found {tuple(state[k].shape)}"
             for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"weights in {checkpoint_dir} have shapes that config.json does not describe: "
                              + "; ".join(wrong[:6]) + (f" … (+{len(wrong) - 6} more)" if len(wrong) > 6 else ""))
    quantized = quantize_state(model, state, quantize, dtype, device)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=not quantized, assign=True)
    model.init_buffers(device)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # the strict check for a quantized model: every tensor got real storage
        raise CheckpointError(f"weights in {checkpoint_dir} left {', '.join(left_on_meta[:6])} unloaded")
    return model.eval().requires_grad_(False)


def init_random_weights(model: DualARTransformer, seed: int, std: float = 0.02) -> DualARTransformer:
    """Random weights for tiny checkpoints and speed benchmarks (values do not affect speed)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model
