"""Tiny tokenizers in exactly the published file layouts, for tiny random checkpoints.

A byte-level BPE is trained with the `tokenizers` library on a small built-in English text and
written as `tokenizer.tiktoken` + `special_tokens.json` (S1-mini and fish-speech-1.5 layouts) or
as `tokenizer.json` + `tokenizer_config.json` (S2-Pro layout), with the families' special tokens
in their order.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from engine.fish.tokenizer import S1_SPECIAL_TOKENS, SEMANTIC_TEMPLATE, V15_SPECIAL_TOKENS

CORPUS = """\
Hello, how are you today? I am fine, thank you. What is the capital of France? The capital of
France is Paris. Please turn on the kitchen lights. The weather is going to be sunny tomorrow.
This is a test of the voice server, speaking one sentence after another. Numbers like one, two
and three are spoken as words. She said that the quick brown fox jumps over the lazy dog again.
We will meet at the station in the morning, and then we will walk to the museum together.
"""
NUM_MERGES = 300
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
S2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|phoneme_start|>",
                     "<|phoneme_end|>", "<|text|>", "<|voice|>", "<|interleave|>", "<|audio_start|>",
                     "<|audio_end|>", "<|audio_pad|>"]


def _byte_level_bpe(pattern: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + NUM_MERGES, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return tok


def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte -> printable-character table used by byte-level BPE."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(visible), 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(visible, chars)}


def _write_tiktoken_ranks(out: Path) -> int:
    # tiktoken ranks: merge order = rank, which matches BPE merge priority.
    from engine.fish.tokenizer import FISH_TIKTOKEN_PATTERN

    tok = _byte_level_bpe(FISH_TIKTOKEN_PATTERN.replace(r"\s+(\?!\S)", r"\s+(?!\S)"))
    table = _unicode_to_byte()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    lines = [f"{base64.b64encode(bytes(table[ch] for ch in piece)).decode()} {rank}" for piece, rank in vocab]
    (out / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    return len(vocab)


def _write_v15(out: Path, num_semantic: int) -> dict[str, int]:
    """v1.5.1 reads only tokenizer.tiktoken and numbers its built-in list after the ranks; the
    published directory still carries a special_tokens.json, written here the same way."""
    if num_semantic != 1024:
        raise ValueError("the fish-speech-1.5 tokenizer has exactly 1024 semantic tokens")
    n = _write_tiktoken_ranks(out)
    specials = {name: n + i for i, name in enumerate(V15_SPECIAL_TOKENS)}
    (out / "special_tokens.json").write_text(json.dumps(specials, indent=2))
    return {"vocab_size": n + len(specials), "semantic_begin_id": specials[SEMANTIC_TEMPLATE.format(0)],
            "semantic_end_id": specials[SEMANTIC_TEMPLATE.format(1023)], "im_end_id": specials["<|im_end|>"],
            "pad_id": specials["<|pad|>"]}


def _write_s1(out: Path, num_semantic: int) -> dict[str, int]:
    n = _write_tiktoken_ranks(out)
    vocab = range(n)
    names = S1_SPECIAL_TOKENS[:15] + [SEMANTIC_TEMPLATE.format(i) for i in range(num_semantic)]
    specials = {name: len(vocab) + i for i, name in enumerate(names)}
    (out / "special_tokens.json").write_text(json.dumps(specials, indent=2))
    return {"vocab_size": len(vocab) + len(names), "semantic_begin_id": specials[SEMANTIC_TEMPLATE.format(0)],
            "semantic_end_id": specials[SEMANTIC_TEMPLATE.format(num_semantic - 1)],
            "im_end_id": specials["<|im_end|>"], "pad_id": specials["<|pad|>"]}


def _write_s2(out: Path, num_semantic: int) -> dict[str, int]:
    from tokenizers import AddedToken

    tok = _byte_level_bpe(QWEN2_PATTERN)
    names = S2_SPECIAL_TOKENS + [SEMANTIC_TEMPLATE.format(i) for i in range(num_semantic)]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tok.save(str(out / "tokenizer.json"))
    ids = {n: tok.token_to_id(n) for n in names}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
              "added_tokens_decoder": {str(i): {"content": n, "special": True} for n, i in ids.items()}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {"vocab_size": tok.get_vocab_size(), "semantic_begin_id": ids[SEMANTIC_TEMPLATE.format(0)],
            "semantic_end_id": ids[SEMANTIC_TEMPLATE.format(num_semantic - 1)], "im_end_id": ids["<|im_end|>"],
            "pad_id": ids["<|pad|>"], "audio_pad_id": ids["<|audio_pad|>"]}


def write_tiny_tokenizer(out_dir: str | Path, family: str, num_semantic_tokens: int) -> dict[str, int]:
    """Write the family's tokenizer files into out_dir; returns the ids a config writer needs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family == "s1-mini":
        return _write_s1(out, num_semantic_tokens)
    if family == "s2-pro":
        return _write_s2(out, num_semantic_tokens)
    if family == "fish-speech-1.5":
        return _write_v15(out, num_semantic_tokens)
    raise ValueError(f"unknown family {family!r}")
