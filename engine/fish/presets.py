"""The published config.json contents (spec §1.6), for building full-size models with random
weights: benchmarks (speed does not depend on weight values) and layout tests on `meta`."""
from __future__ import annotations

from typing import Any

S1_MINI_CONFIG: dict[str, Any] = {
    "model_type": "dual_ar",
    "vocab_size": 155776,
    "n_layer": 28,
    "n_head": 16,
    "n_local_heads": 8,
    "head_dim": 128,
    "dim": 1024,
    "intermediate_size": 3072,
    "rope_base": 1000000,
    "norm_eps": 1e-6,
    "max_seq_len": 8192,
    "dropout": 0.0,
    "tie_word_embeddings": False,
    "attention_qkv_bias": False,
    "attention_o_bias": False,
    "attention_qk_norm": True,
    "codebook_size": 4096,
    "num_codebooks": 10,
    "scale_codebook_embeddings": True,
    "n_fast_layer": 4,
    "fast_dim": 1024,
    "fast_n_head": 16,
    "fast_n_local_heads": 8,
    "fast_head_dim": 64,
    "fast_intermediate_size": 3072,
    "fast_attention_qkv_bias": False,
    "fast_attention_o_bias": False,
    "fast_attention_qk_norm": False,
    "initializer_range": 0.03125,
    "use_gradient_checkpointing": True,
}

S2_PRO_CONFIG: dict[str, Any] = {
    "model_type": "fish_qwen3_omni",
    "dtype": "bfloat16",
    "eos_token_id": 151645,
    "pad_token_id": 151669,
    "audio_pad_token_id": 151677,
    "semantic_start_token_id": 151678,
    "semantic_end_token_id": 155773,
    "text_config": {
        "model_type": "fish_qwen3",
        "vocab_size": 155776,
        "n_layer": 36,
        "n_head": 32,
        "n_local_heads": 8,
        "head_dim": 128,
        "dim": 2560,
        "intermediate_size": 9728,
        "max_seq_len": 32768,
        "rope_base": 1000000,
        "norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "attention_qkv_bias": False,
        "attention_o_bias": False,
        "attention_qk_norm": True,
        "use_moe": False,
        "dropout": 0.0,
    },
    "audio_decoder_config": {
        "model_type": "fish_qwen3_audio_decoder",
        "vocab_size": 4096,
        "num_codebooks": 10,
        "n_layer": 4,
        "n_head": 32,
        "n_local_heads": 8,
        "head_dim": 128,
        "dim": 2560,
        "intermediate_size": 9728,
        "max_seq_len": 11,
        "text_dim": 2560,
        "attention_qkv_bias": False,
        "attention_o_bias": False,
        "attention_qk_norm": False,
    },
}

# fish-speech-1.5: dim, n_layer, vocab_size, codebook_size and num_codebooks are the published
# values (spec §1.6, third-party); the other widths are not verified (spec §10.1) and only serve
# speed benchmarks with random weights. A real checkpoint's config.json always wins.
FISH_SPEECH_15_CONFIG: dict[str, Any] = {
    "model_type": "dual_ar",
    "vocab_size": 102048,
    "n_layer": 24,
    "n_head": 16,
    "n_local_heads": 2,
    "dim": 1024,
    "intermediate_size": 4096,
    "rope_base": 1000000.0,
    "norm_eps": 1e-6,
    "max_seq_len": 4096,
    "dropout": 0.0,
    "tie_word_embeddings": False,
    "attention_qkv_bias": False,
    "codebook_size": 1024,
    "num_codebooks": 8,
    "n_fast_layer": 4,
    "fast_dim": 1024,
    "fast_n_head": 16,
    "fast_n_local_heads": 2,
    "fast_intermediate_size": 4096,
    "share_codebook_embeddings": True,
    "scale_codebook_embeddings": False,
}

# Token ids of the published tokenizers (spec §1.6), for random-weight benchmarks.
PUBLISHED_IDS = {
    "s1-mini": {"semantic_begin_id": 151658, "semantic_end_id": 155753, "im_end_id": 151647},
    "s2-pro": {"semantic_begin_id": 151678, "semantic_end_id": 155773, "im_end_id": 151645},
    # N + 12 .. N + 1035 and N + 4 with N ranks (spec §1.7); N assumed to fill the vocabulary
    "fish-speech-1.5": {"semantic_begin_id": 101024, "semantic_end_id": 102047, "im_end_id": 101016},
}
