"""Prompt formats of the two families (spec §3), as the (K+1, T) int64 array the model reads.

A prompt is a list of parts, each tokenised separately and concatenated, as upstream does:
template text (may hold special tokens), user text (scrubbed of them) and VQ parts (one position
per code frame: token = semantic_begin_id + code0, the K codes in rows 1..K).

* s1-mini (OpenAudio S1 era, §3.2): `<|interleave|>`, then per reference `<|speaker:0|>` + its
  transcript + its codes + `<|im_end|>`, then `<|speaker:0|>` + the text. Upstream does not split
  text; for long text we feed earlier chunks back exactly like extra references, which is the
  format the model already knows for "this speaker said this, sounding like that".
* s2-pro (upstream HEAD, §3.1): a system message carrying the references, earlier chunks as
  user/assistant pairs with their codes, the current chunk as a user turn, and an open
  `<|im_start|>assistant\\n<|voice|>` turn.
* fish-speech-1.5 (tag v1.5.1, §3.3): messages end with `<|im_end|>` and no newline; with
  references, a "Speak out the provided text." system message, then each reference as a user
  turn (its transcript) and an assistant `<|voice|>` turn (its codes); earlier chunks the same
  way; the current chunk as a user turn and an open `<|im_start|>assistant\\n<|voice|>` turn.
  All user text is cleaned as v1.5.1 does; history is windowed to fit the context.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from engine.fish.tokenizer import IM_END, FishTokenizer

Codes = np.ndarray  # int [K, frames]
_SPEAKER_TAG = re.compile(r"<\|speaker:\d+\|>")


class _Parts:
    def __init__(self, tokenizer: FishTokenizer, num_codebooks: int) -> None:
        self.tok = tokenizer
        self.k = num_codebooks
        self.columns: list[np.ndarray] = []

    def template(self, text: str) -> None:
        self._tokens(self.tok.encode(text))

    def user(self, text: str) -> None:
        self._tokens(self.tok.encode_user(text))

    def _tokens(self, ids: list[int]) -> None:
        col = np.zeros((self.k + 1, len(ids)), dtype=np.int64)
        col[0] = ids
        self.columns.append(col)

    def vq(self, codes: Codes) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or codes.shape[0] != self.k:
            raise ValueError(f"codes must be shaped [{self.k}, frames], got {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes[0].max() >= self.tok.num_semantic_tokens):
            raise ValueError("codes are out of the semantic-token range")
        col = np.zeros((self.k + 1, codes.shape[1]), dtype=np.int64)
        col[0] = codes[0] + self.tok.semantic_begin_id
        col[1:] = codes
        self.columns.append(col)

    def array(self) -> np.ndarray:
        return np.concatenate(self.columns, axis=1) if self.columns else np.zeros((self.k + 1, 0), np.int64)


def _s1_prompt(p: _Parts, text: str, references: Sequence[tuple[str, Codes]],
               history: Sequence[tuple[str, Codes]]) -> None:
    p.template("<|interleave|>")
    for ref_text, codes in [*references, *history]:
        p.template("<|speaker:0|>")
        p.user(ref_text)
        p.vq(codes)
        p.template(IM_END)
    p.template("<|speaker:0|>")
    p.user(text)


def _s2_prompt(p: _Parts, text: str, references: Sequence[tuple[str, Codes]],
               history: Sequence[tuple[str, Codes]]) -> None:
    p.template("<|im_start|>system\n")
    if references:
        p.template("convert the provided text to speech reference to the following:\n\nText:\n")
        tagged = [t if _SPEAKER_TAG.search(t) else f"<|speaker:{i}|>{t}" for i, (t, _) in enumerate(references)]
        p.user("\n".join(tagged))
        p.template("\n\nSpeech:\n")
        p.vq(np.concatenate([np.asarray(c) for _, c in references], axis=1))
    else:
        p.template("convert the provided text to speech")
    p.template(IM_END + "\n")
    for chunk_text, codes in history:
        p.template("<|im_start|>user\n")
        p.user(chunk_text)
        p.template(IM_END + "\n")
        p.template("<|im_start|>assistant\n<|voice|>")
        p.vq(codes)
        p.template(IM_END + "\n")
    p.template("<|im_start|>user\n")
    p.user(text)
    p.template(IM_END + "\n")
    p.template("<|im_start|>assistant\n<|voice|>")


_EMOJI = re.compile("[\U0001F600-\U0001F64F\U0001F300-\U0001F5FF\U0001F680-\U0001F6FF\U0001F1E0-\U0001F1FF]+")
_CURLY_SINGLE_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'"})
_COMMA_RUN = re.compile(r",{2,}")
V15_SYSTEM_PROMPT = "Speak out the provided text."
# v1.5.1 keeps this many positions free for generation when it windows the history.
V15_GENERATION_ROOM = 1024


def clean_text_v15(text: str) -> str:
    """v1.5.1's text cleaning (spec §6): trim, straighten curly single quotes, drop emoji,
    collapse runs of commas."""
    text = text.strip().translate(_CURLY_SINGLE_QUOTES)
    return _COMMA_RUN.sub(",", _EMOJI.sub("", text))


def _v15_turn(p: _Parts, text: str, codes: Codes | None) -> None:
    p.template("<|im_start|>user\n")
    p.user(clean_text_v15(text))
    p.template(IM_END)
    p.template("<|im_start|>assistant\n")
    p.template("<|voice|>")
    if codes is not None:
        p.vq(codes)
        p.template(IM_END)


def _v15_history_window(tokenizer: FishTokenizer, k: int, history: Sequence[tuple[str, Codes]],
                        budget: int | None) -> list[tuple[str, Codes]]:
    """The first earlier chunk always (it anchors the voice, as upstream keeps its first two
    segments), then as many of the most recent ones as fit into `budget` positions."""
    if budget is None or len(history) <= 1:
        return list(history)

    def size(item: tuple[str, Codes]) -> int:
        q = _Parts(tokenizer, k)
        _v15_turn(q, *item)
        return q.array().shape[1]

    kept: list[tuple[str, Codes]] = []
    used = size(history[0])
    for item in reversed(history[1:]):
        used += size(item)
        if used > budget:
            break
        kept.insert(0, item)
    return [history[0], *kept]


def _v15_prompt(p: _Parts, text: str, references: Sequence[tuple[str, Codes]],
                history: Sequence[tuple[str, Codes]], max_length: int | None) -> None:
    if references:  # v1.5.1 sends the system message only together with references
        p.template("<|im_start|>system\n")
        p.template(V15_SYSTEM_PROMPT)
        p.template(IM_END)
        for ref_text, codes in references:
            _v15_turn(p, ref_text, codes)
    budget = None
    if max_length is not None:
        budget = max_length - V15_GENERATION_ROOM - p.array().shape[1]
    for chunk_text, codes in _v15_history_window(p.tok, p.k, history, budget):
        _v15_turn(p, chunk_text, codes)
    _v15_turn(p, text, None)


def build_prompt(tokenizer: FishTokenizer, family: str, text: str, *,
                 references: Sequence[tuple[str, Codes]] = (), history: Sequence[tuple[str, Codes]] = (),
                 num_codebooks: int, max_length: int | None = None) -> np.ndarray:
    """The generation prompt for `text` in the reference voice(s), after earlier chunks `history`.
    `max_length` (the model context) lets fish-speech-1.5 window a long history as v1.5.1 does."""
    parts = _Parts(tokenizer, num_codebooks)
    if family == "s1-mini":
        _s1_prompt(parts, text, references, history)
    elif family == "s2-pro":
        _s2_prompt(parts, text, references, history)
    elif family == "fish-speech-1.5":
        _v15_prompt(parts, text, references, history, max_length)
    else:
        raise ValueError(f"unknown model family {family!r}")
    return parts.array()
