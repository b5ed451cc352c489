"""Tiny random checkpoints in exactly the published layouts (spec §1.2–1.4).

Same model classes, small dimensions, random weights; tokenizer files and codec.pth included.
The real loader reads them back, which is how tests and CI exercise the whole engine without
the gated published weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.fish.config import Family, parse_config
from engine.fish.dual_ar import DualARTransformer
from engine.fish.dual_ar_loader import init_random_weights

TINY_CODEBOOK_SIZE = 64
TINY_NUM_CODEBOOKS = 10
# fish-speech-1.5 keeps its published code space: 8 codebooks, 1024-entry heads (the Firefly
# codec's FSQ uses 1000 of them) and 1024 semantic tokens in the tokenizer.
V15_CODEBOOK_SIZE = 1024
V15_NUM_CODEBOOKS = 8


def _tiny_s1_config(vocab_size: int) -> dict[str, Any]:
    return {
        "model_type": "dual_ar", "vocab_size": vocab_size, "n_layer": 2, "n_head": 4, "n_local_heads": 2,
        "head_dim": 16, "dim": 64, "intermediate_size": 128, "rope_base": 1000000, "norm_eps": 1e-6,
        "max_seq_len": 1024, "dropout": 0.0, "tie_word_embeddings": False, "attention_qkv_bias": False,
        "attention_o_bias": False, "attention_qk_norm": True, "codebook_size": TINY_CODEBOOK_SIZE,
        "num_codebooks": TINY_NUM_CODEBOOKS, "scale_codebook_embeddings": True, "n_fast_layer": 2,
        "fast_dim": 64, "fast_n_head": 4, "fast_n_local_heads": 2, "fast_head_dim": 8,
        "fast_intermediate_size": 128, "fast_attention_qkv_bias": False, "fast_attention_o_bias": False,
        "fast_attention_qk_norm": False, "initializer_range": 0.02, "use_gradient_checkpointing": False,
    }


def _tiny_s2_config(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "model_type": "fish_qwen3_omni", "dtype": "float32",
        "eos_token_id": ids["im_end_id"], "pad_token_id": ids.get("pad_id", 0),
        "audio_pad_token_id": ids.get("audio_pad_id", 0),
        "semantic_start_token_id": ids["semantic_begin_id"], "semantic_end_token_id": ids["semantic_end_id"],
        "text_config": {
            "model_type": "fish_qwen3", "vocab_size": vocab_size, "n_layer": 2, "n_head": 4, "n_local_heads": 2,
            "head_dim": 16, "dim": 64, "intermediate_size": 128, "max_seq_len": 1024, "rope_base": 1000000,
            "norm_eps": 1e-6, "tie_word_embeddings": True, "attention_qkv_bias": False, "attention_o_bias": False,
            "attention_qk_norm": True, "use_moe": False, "dropout": 0.0,
        },
        "audio_decoder_config": {
            "model_type": "fish_qwen3_audio_decoder", "vocab_size": TINY_CODEBOOK_SIZE,
            "num_codebooks": TINY_NUM_CODEBOOKS, "n_layer": 2, "n_head": 4, "n_local_heads": 2, "head_dim": 16,
            "dim": 64, "intermediate_size": 128, "max_seq_len": TINY_NUM_CODEBOOKS + 1, "text_dim": 64,
            "attention_qkv_bias": False, "attention_o_bias": False, "attention_qk_norm": False,
        },
    }


def _tiny_v15_config(vocab_size: int) -> dict[str, Any]:
    """Every field tag v1.5.1 writes to config.json (its argument dataclass, sorted)."""
    return {
        "attention_qkv_bias": False, "codebook_size": V15_CODEBOOK_SIZE, "dim": 64, "dropout": 0.0,
        "fast_attention_qkv_bias": False, "fast_dim": 64, "fast_head_dim": 16, "fast_intermediate_size": 128,
        "fast_n_head": 4, "fast_n_local_heads": 2, "head_dim": 16, "initializer_range": 0.02,
        "intermediate_size": 128, "is_reward_model": False, "max_seq_len": 1024, "model_type": "dual_ar",
        "n_fast_layer": 2, "n_head": 4, "n_layer": 2, "n_local_heads": 2, "norm_eps": 1e-6,
        "num_codebooks": V15_NUM_CODEBOOKS, "rope_base": 1000000.0, "scale_codebook_embeddings": False,
        "share_codebook_embeddings": True, "tie_word_embeddings": False, "use_gradient_checkpointing": True,
        "vocab_size": vocab_size,
    }


def _published_s2_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Internal names -> the S2-Pro safetensors names (inverse of the loader's remap)."""
    out = {}
    for key, value in state.items():
        if key == "codebook_embeddings.weight":
            out["audio_decoder." + key] = value
        elif key.startswith("fast_"):
            out["audio_decoder." + key[len("fast_"):]] = value
        else:
            out["text_model.model." + key] = value
    return out


def _save_s2_shards(state: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    total = 0
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(out / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
        total += sum(state[k].numel() * state[k].element_size() for k in keys)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_checkpoint(out_dir: str | Path, family: Family = "s1-mini", seed: int = 0) -> Path:
    """Write a tiny random checkpoint for `family` ("s1-mini", "s2-pro" or "fish-speech-1.5")
    into out_dir, in that family's published file names."""
    from engine.fish.codec import write_tiny_codec
    from engine.fish.config import FAMILIES, FIREFLY_CODEC_FILE
    from engine.fish.firefly import write_tiny_firefly
    from engine.fish.tiny_tokenizer import write_tiny_tokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    v15 = family == "fish-speech-1.5"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tiny_tokenizer(out, family, V15_CODEBOOK_SIZE if v15 else TINY_CODEBOOK_SIZE)
    vocab_size = -(-int(ids["vocab_size"]) // 8) * 8  # published vocabularies leave unused rows too
    raw = {"s1-mini": lambda: _tiny_s1_config(vocab_size), "s2-pro": lambda: _tiny_s2_config(vocab_size, ids),
           "fish-speech-1.5": lambda: _tiny_v15_config(vocab_size)}[family]()
    (out / "config.json").write_text(json.dumps(raw, indent=2))

    config = parse_config(raw, family).with_semantic_ids(ids["semantic_begin_id"], ids["semantic_end_id"])
    model = init_random_weights(DualARTransformer(config), seed, std=0.5)
    with torch.no_grad():
        # Random weights would emit <|im_end|> at unpredictable points; a small head row keeps
        # tiny models speaking until max_new_tokens, so tests decide utterance lengths.
        model.head_weight()[ids["im_end_id"]] *= 0.05
        if v15:
            # v1.5.1 samples over the whole vocabulary and all 1024 fast entries, we over the
            # semantic tokens and the codec's 1000 codes (spec §4.3). A trained model puts no
            # mass outside those; quiet rows make this random one behave the same, so greedy
            # codes compare like for like with upstream.
            head = model.head_weight()
            semantic = torch.zeros(head.shape[0], dtype=torch.bool)
            semantic[ids["semantic_begin_id"]:ids["semantic_end_id"] + 1] = True
            head[~semantic] *= 0.05
            model.fast_output.weight[1000:] *= 0.05
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if family == "s2-pro":
        _save_s2_shards(_published_s2_names(state), out)
    else:
        torch.save(state, out / "model.pth")
    if v15:
        write_tiny_firefly(out / FIREFLY_CODEC_FILE, seed=seed)
    else:
        write_tiny_codec(out / "codec.pth", seed=seed, num_codebooks=TINY_NUM_CODEBOOKS,
                         semantic_codebook_size=TINY_CODEBOOK_SIZE, residual_codebook_size=TINY_CODEBOOK_SIZE)
    return out
