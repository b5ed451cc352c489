"""Dual-AR model configuration: parsed from a checkpoint's config.json, every shape derived.

Published layouts (spec §1.5): the flat `dual_ar` file of OpenAudio S1-mini and of
fish-speech-1.5, and the nested `fish_qwen3_omni` file of Fish Audio S2-Pro. All become one
frozen `DualARConfig`. The two `dual_ar` families share the file format but not its reading:
fish-speech-1.5 (tag v1.5.1 semantics, spec §2.8) derives head_dim from dim / n_head whatever
the file says, and has no q/k norm and no codebook-embedding scaling.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

Family = Literal["s1-mini", "s2-pro", "fish-speech-1.5"]
FAMILIES: tuple[str, ...] = ("s1-mini", "s2-pro", "fish-speech-1.5")
# The Firefly VQGAN file that marks a fish-speech-1.5 directory (spec §1.4).
FIREFLY_CODEC_FILE = "firefly-gan-vq-fsq-8x1024-21hz-generator.pth"
FIREFLY_CODEC_GLOB = "firefly-gan-vq*.pth"


class ConfigError(ValueError):
    """config.json is missing, malformed, or describes an unsupported model."""


def _round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclasses.dataclass(frozen=True)
class DualARConfig:
    family: Family
    vocab_size: int
    n_layer: int
    n_head: int
    dim: int
    codebook_size: int
    num_codebooks: int
    n_fast_layer: int
    n_local_heads: int = -1
    head_dim: int | None = None
    intermediate_size: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_word_embeddings: bool = True
    attention_qkv_bias: bool = False
    attention_o_bias: bool = False
    attention_qk_norm: bool = False
    scale_codebook_embeddings: bool = False
    norm_fastlayer_input: bool = False  # S2-Pro hands the post-norm hidden state to the fast model
    fast_dim: int | None = None
    fast_n_head: int | None = None
    fast_n_local_heads: int | None = None
    fast_head_dim: int | None = None
    fast_intermediate_size: int | None = None
    fast_attention_qkv_bias: bool | None = None
    fast_attention_o_bias: bool | None = None
    fast_attention_qk_norm: bool | None = None
    # Filled from the tokenizer at load time (the tokenizer is authoritative, spec §1.5).
    semantic_begin_id: int = 0
    semantic_end_id: int = 0

    def __post_init__(self) -> None:
        # Frozen dataclass: derive defaults with object.__setattr__ (spec §1.5 "Derived defaults").
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.n_local_heads == -1:
            put("n_local_heads", self.n_head)
        if self.head_dim is None:
            put("head_dim", self.dim // self.n_head)
        if self.intermediate_size is None:
            put("intermediate_size", _round_up(int(2 * 4 * self.dim / 3), 256))
        for fast, slow in (
            ("fast_dim", "dim"),
            ("fast_n_head", "n_head"),
            ("fast_n_local_heads", "n_local_heads"),
            ("fast_intermediate_size", "intermediate_size"),
            ("fast_attention_qkv_bias", "attention_qkv_bias"),
            ("fast_attention_o_bias", "attention_o_bias"),
            ("fast_attention_qk_norm", "attention_qk_norm"),
        ):
            if getattr(self, fast) is None:
                put(fast, getattr(self, slow))
        if self.fast_head_dim is None:
            put("fast_head_dim", self.fast_dim // self.fast_n_head)
        for name in ("vocab_size", "n_layer", "n_head", "dim", "codebook_size", "num_codebooks", "n_fast_layer"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_local_heads or self.fast_n_head % self.fast_n_local_heads:
            raise ConfigError("n_head must be a multiple of n_local_heads (slow and fast)")
        if self.head_dim % 2 or self.fast_head_dim % 2:
            raise ConfigError("head_dim must be even for rotary embeddings")

    # --- derived shapes (spec §2.2)
    @property
    def qkv_dim(self) -> int:
        return (self.n_head + 2 * self.n_local_heads) * self.head_dim

    @property
    def fast_qkv_dim(self) -> int:
        return (self.fast_n_head + 2 * self.fast_n_local_heads) * self.fast_head_dim

    def with_semantic_ids(self, begin: int, end: int) -> DualARConfig:
        return dataclasses.replace(self, semantic_begin_id=begin, semantic_end_id=end)


_FLAT_FIELDS = {f.name for f in dataclasses.fields(DualARConfig)} - {"family", "semantic_begin_id", "semantic_end_id"}


def _from_dual_ar(raw: dict[str, Any]) -> DualARConfig:
    kwargs = {k: v for k, v in raw.items() if k in _FLAT_FIELDS}
    return DualARConfig(family="s1-mini", **kwargs)


# What tag v1.5.1 reads from a dual_ar config.json (its argument dataclass); the rest is fixed.
_V15_FIELDS = ("vocab_size", "n_layer", "n_head", "dim", "intermediate_size", "n_local_heads", "rope_base",
               "norm_eps", "max_seq_len", "tie_word_embeddings", "attention_qkv_bias", "codebook_size",
               "num_codebooks", "n_fast_layer", "fast_dim", "fast_n_head", "fast_n_local_heads",
               "fast_intermediate_size", "fast_attention_qkv_bias")
_V15_DEFAULTS = {"n_layer": 32, "n_head": 32, "dim": 4096, "rope_base": 10000.0, "norm_eps": 1e-5,
                 "max_seq_len": 2048, "codebook_size": 160, "num_codebooks": 4, "n_fast_layer": 4}


def _from_dual_ar_v15(raw: dict[str, Any]) -> DualARConfig:
    """fish-speech-1.5 (spec §2.8): head_dim = dim / n_head and fast_head_dim = fast_dim /
    fast_n_head whatever the file says; no q/k norm, no output bias, no embedding scaling; the
    fast model reads the pre-norm hidden state."""
    if raw.get("share_codebook_embeddings", True) is not True:
        raise ConfigError("share_codebook_embeddings=false (codes carrying their own offsets) is not supported; "
                          "no published fish-speech-1.5 checkpoint uses it")
    if "vocab_size" not in raw:
        raise ConfigError("config.json lacks vocab_size")
    kwargs: dict[str, Any] = {**_V15_DEFAULTS, **{k: raw[k] for k in _V15_FIELDS if raw.get(k) is not None}}
    dim, n_head = int(kwargs["dim"]), int(kwargs["n_head"])
    fast_dim = int(kwargs.get("fast_dim") or dim)
    fast_n_head = int(kwargs.get("fast_n_head") or n_head)
    if n_head <= 0 or fast_n_head <= 0 or dim % n_head or fast_dim % fast_n_head:
        raise ConfigError("dim must be a multiple of n_head (slow and fast) in a fish-speech-1.5 config")
    return DualARConfig(family="fish-speech-1.5", head_dim=dim // n_head, fast_head_dim=fast_dim // fast_n_head,
                        attention_o_bias=False, attention_qk_norm=False, fast_attention_o_bias=False,
                        fast_attention_qk_norm=False, scale_codebook_embeddings=False,
                        norm_fastlayer_input=False, **kwargs)


def _from_fish_qwen3_omni(raw: dict[str, Any]) -> DualARConfig:
    text = raw.get("text_config")
    audio = raw.get("audio_decoder_config")
    if not isinstance(text, dict) or not isinstance(audio, dict):
        raise ConfigError("fish_qwen3_omni config needs text_config and audio_decoder_config objects")
    required = {"text_config": (text, ("vocab_size", "n_layer", "n_head", "dim")),
                "audio_decoder_config": (audio, ("vocab_size", "num_codebooks", "n_layer"))}
    for section, (obj, keys) in required.items():
        missing = [k for k in keys if k not in obj]
        if missing:
            raise ConfigError(f"config.json {section} lacks {', '.join(missing)}")
    slow_names = ("n_local_heads", "head_dim", "intermediate_size", "rope_base", "norm_eps", "max_seq_len",
                  "tie_word_embeddings", "attention_qkv_bias", "attention_o_bias", "attention_qk_norm")
    kwargs: dict[str, Any] = {k: text[k] for k in slow_names if text.get(k) is not None}
    fast_map = {"dim": "fast_dim", "n_head": "fast_n_head", "n_local_heads": "fast_n_local_heads",
                "head_dim": "fast_head_dim", "intermediate_size": "fast_intermediate_size",
                "attention_qkv_bias": "fast_attention_qkv_bias", "attention_o_bias": "fast_attention_o_bias",
                "attention_qk_norm": "fast_attention_qk_norm"}
    kwargs.update({ours: audio[theirs] for theirs, ours in fast_map.items() if audio.get(theirs) is not None})
    return DualARConfig(
        family="s2-pro",
        vocab_size=text["vocab_size"],
        n_layer=text["n_layer"],
        n_head=text["n_head"],
        dim=text["dim"],
        codebook_size=audio["vocab_size"],
        num_codebooks=audio["num_codebooks"],
        n_fast_layer=audio["n_layer"],
        scale_codebook_embeddings=True,  # forced for this family (spec §1.5)
        norm_fastlayer_input=True,
        semantic_begin_id=raw.get("semantic_start_token_id", 0),
        semantic_end_id=raw.get("semantic_end_token_id", 0),
        **kwargs,
    )


def parse_config(raw: dict[str, Any], family: str | None = None) -> DualARConfig:
    """`family` picks the reading of a `dual_ar` file ("s1-mini", the default, or
    "fish-speech-1.5"); `load_config` tells it from the checkpoint directory."""
    model_type = raw.get("model_type")
    try:
        if model_type == "dual_ar":
            return _from_dual_ar_v15(raw) if family == "fish-speech-1.5" else _from_dual_ar(raw)
        if model_type == "fish_qwen3_omni":
            return _from_fish_qwen3_omni(raw)
    except TypeError as exc:  # wrong value types reach the dataclass
        raise ConfigError(f"config.json has invalid values: {exc}") from exc
    raise ConfigError(
        f"unsupported model_type {model_type!r} in config.json; expected 'dual_ar' (OpenAudio S1-mini, fish-speech-1.5) "
        "or 'fish_qwen3_omni' (Fish Audio S2-Pro)"
    )


def load_config(checkpoint_dir: str | Path) -> DualARConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a Fish Speech checkpoint directory has a config.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return parse_config(raw, dual_ar_family(Path(checkpoint_dir), raw))


def dual_ar_family(directory: Path, raw: dict[str, Any]) -> str:
    """Which family a `dual_ar` directory holds: the codec file decides (Firefly VQGAN = 1.5,
    codec.pth = S1-mini); without either, a config with no q/k-norm field is 1.5's."""
    if any(directory.glob(FIREFLY_CODEC_GLOB)):
        return "fish-speech-1.5"
    if (directory / "codec.pth").is_file():
        return "s1-mini"
    return "s1-mini" if "attention_qk_norm" in raw else "fish-speech-1.5"
