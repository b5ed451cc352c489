"""Loading `codec.pth` (spec §5.8) strictly: every key accounted for, sizes read from shapes.

Accepted variations: a wrapping `{"state_dict": ...}`, a `generator.` prefix (training
checkpoints), either weight-norm spelling on any weight-normed layer, and the six stale RoPE /
mask buffers of an older code version, which are dropped.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from engine.fish.codec.config import WN_NEW, WN_OLD, CodecConfig
from engine.fish.codec.errors import CodecCheckpointError
from engine.fish.codec.int8 import quantize_codec_linears
from engine.fish.codec.model import Codec
from engine.fish.codec.transformer import WindowLimitedTransformer
from engine.fish.quantize import release_pages

STALE_BUFFERS = ("freqs_cis", "causal_mask")
_LIST_LIMIT = 12


def read_state_dict(source: str | os.PathLike[str] | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a codec file or mapping, unwrapped from `state_dict` and stripped of a
    `generator.` prefix."""
    if isinstance(source, Mapping):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise CodecCheckpointError(f"codec weights {path} not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001
                raise CodecCheckpointError(f"cannot read codec weights {path}: {exc}") from exc
    if not isinstance(state, Mapping):
        raise CodecCheckpointError(f"codec weights must be a mapping of names to tensors, got {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if any(k.startswith("generator.") for k in state):
        state = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CodecCheckpointError(f"codec entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(state)


def _drop_stale_buffers(state: Mapping[str, Tensor], codec: Codec) -> dict[str, Tensor]:
    """Drop the RoPE tables / masks an older code version stored, but only where this model has
    a transformer: anywhere else such a key is unexpected."""
    transformers = {name for name, m in codec.named_modules() if isinstance(m, WindowLimitedTransformer)}
    return {k: v for k, v in state.items()
            if not (k.rpartition(".")[2] in STALE_BUFFERS and k.rpartition(".")[0] in transformers)}


def _respell_weight_norm(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename weight_g/weight_v <-> parametrizations.weight.original0/1 to whatever the model uses."""
    pairs = [(old, new) for old, new in zip(WN_OLD, WN_NEW)] + [(new, old) for old, new in zip(WN_OLD, WN_NEW)]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key
        if key not in expected:
            for src, dst in pairs:
                if key.endswith(src) and key[: -len(src)] + dst in expected:
                    name = key[: -len(src)] + dst
                    break
        if name in out:
            raise CodecCheckpointError(f"codec weight {name} is given twice (both weight-norm spellings)")
        out[name] = value
    return out


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f" … and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else "")


def load_checked(module: torch.nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Load `state` into `module` (built on `meta`) strictly, in float32, then fold weight norm.
    Raises CodecCheckpointError naming any missing, unexpected or mis-shaped keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise CodecCheckpointError(f"{what} weights do not match the architecture their shapes describe; "
                                   + "; ".join(parts))
    wrong = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise CodecCheckpointError(f"{what} weights have inconsistent shapes: {_listing(wrong)}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    module.requires_grad_(False).eval()
    module.fold_weight_norm()  # in float32, before any cast
    release_folded_originals(module)


def release_folded_originals(module: torch.nn.Module) -> None:
    """Hand the memory-mapped pages of the weight-norm directions (`original1`, ~300 MB in the
    published codec) back to the kernel: decoding reads only the folded copies. Nothing is lost;
    re-folding faults them in again from the file."""
    for name, tensor in module.named_parameters():
        if name.endswith(".original1"):
            release_pages(tensor)


def load_codec(source: str | os.PathLike[str] | Mapping[str, Tensor], device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, quantize: str = "none", **config_overrides) -> Codec:
    """Build the codec a `codec.pth` (path or state dict) describes and load it strictly.

    `config_overrides` set what the weights cannot tell: head_dim (64), encoder_window (512),
    quantizer_window (128), sample_rate, rope_base, norm_eps, residual_dilations. Weight norm is
    folded in float32 before the cast to `dtype`. Raises CodecCheckpointError naming any missing,
    unexpected or mis-shaped keys. `quantize="int8"` (CPU, float32 only) stores the quantizer's
    linear layers as int8 (`engine.fish.codec.int8`): a quarter of their memory, ~50 dB from float32.
    """
    if quantize not in ("none", "int8"):
        raise ValueError(f"codec quantize must be none or int8, got {quantize!r}")
    state = read_state_dict(source)
    config = CodecConfig.from_state_dict(state, **config_overrides)
    with torch.device("meta"):
        codec = Codec(config)
    expected = codec.state_dict()
    state = _respell_weight_norm(_drop_stale_buffers(state, codec), expected)
    load_checked(codec, state, "codec")
    codec = codec.to(device=device or "cpu", dtype=dtype or torch.float32)
    if quantize == "int8":
        if codec.device.type != "cpu" or codec.dtype != torch.float32:
            raise ValueError("the int8 codec runs on CPU in float32 only")
        quantize_codec_linears(codec)
    return codec
