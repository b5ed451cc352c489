"""Splitting long text into chunks the model speaks one after another (spec §3.1, §3.4).

Chunks are at most `max_bytes` UTF-8 bytes, cut at sentence ends first, then at commas, then at
spaces, then anywhere (never inside a character). Text with `<|speaker:N|>` tags is grouped by
turns instead, at most five turns per chunk, as upstream does for dialogue.
"""
from __future__ import annotations

import re
import unicodedata

_SPEAKER_SPLIT = re.compile(r"(<\|speaker:\d+\|>)")
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|(?<=[。！？])")  # a '.' needs a following space: 3.14 stays whole
_CLAUSE_END = re.compile(r"(?<=[,;:，；：])\s*")
MAX_TURNS_PER_CHUNK = 5


def _nbytes(s: str) -> int:
    return len(s.encode("utf-8"))


def _is_only_punctuation(s: str) -> bool:
    return all(unicodedata.category(ch)[0] in "PZS" or ch.isspace() for ch in s)


def _hard_cut(s: str, max_bytes: int) -> list[str]:
    out, cur = [], ""
    for ch in s:
        if cur and _nbytes(cur + ch) > max_bytes:
            out.append(cur)
            cur = ""
        cur += ch
    return out + ([cur] if cur else [])


def _split_piece(piece: str, max_bytes: int, level: int = 0) -> list[str]:
    if _nbytes(piece) <= max_bytes:
        return [piece]
    splitters = [_SENTENCE_END, _CLAUSE_END, re.compile(r"\s+")]
    if level >= len(splitters):
        return _hard_cut(piece, max_bytes)
    parts = [p for p in splitters[level].split(piece) if p]
    if len(parts) == 1:
        return _split_piece(piece, max_bytes, level + 1)
    return [q for p in parts for q in _split_piece(p, max_bytes, level + 1)]


def _merge(pieces: list[str], max_bytes: int, sep: str = " ") -> list[str]:
    out: list[str] = []
    for p in pieces:
        if out and _nbytes(out[-1] + sep + p) <= max_bytes:
            out[-1] = out[-1] + sep + p
        else:
            out.append(p)
    return out


def split_speaker_turns(text: str) -> list[str]:
    """Turns that each start with their `<|speaker:N|>` tag; text before the first tag is kept
    as a turn of its own (upstream drops it, which silently loses words)."""
    parts = _SPEAKER_SPLIT.split(text)
    turns = [parts[0].strip()] if parts[0].strip() else []
    for i in range(1, len(parts), 2):
        turn = (parts[i] + (parts[i + 1] if i + 1 < len(parts) else "")).strip()
        if turn:
            turns.append(turn)
    return turns


def split_text(text: str, max_bytes: int) -> list[str]:
    """Chunks of `text` of at most `max_bytes` UTF-8 bytes (a single long turn stays whole)."""
    text = text.strip()
    if not text or _is_only_punctuation(text):
        return []
    if _SPEAKER_SPLIT.search(text):
        chunks: list[str] = []
        group: list[str] = []
        for turn in split_speaker_turns(text):
            if group and (len(group) >= MAX_TURNS_PER_CHUNK or _nbytes("\n".join(group + [turn])) > max_bytes):
                chunks.append("\n".join(group))
                group = []
            group.append(turn)
        return chunks + (["\n".join(group)] if group else [])
    if max_bytes <= 0 or _nbytes(text) <= max_bytes:
        return [text]
    pieces = [p.strip() for p in _split_piece(text, max_bytes)]
    return [c for c in _merge([p for p in pieces if p], max_bytes) if not _is_only_punctuation(c)]
