"""Splitting long text into chunks the model speaks one after another (spec §3.1, §3.4).

Chunks are at most `max_bytes` UTF-8 bytes, cut at sentence ends first, then at commas, then at
spaces, then anywhere (never inside a character). Text with `<|speaker:N|>` tags is grouped by
turns instead, at most five turns per chunk, as upstream does for dialogue.
"""
from __future__ import annotations

import re
import unicodedata

_SPEAKER_SPLIT = re.compile(r"(<\|speaker:\d+\|>)")
# Cut points: each match ends where a new piece starts, so the separator (closing quotes, spaces)
# stays with the text before it and joining the pieces gives back the original text.
# A '.' needs following whitespace, so 3.14 stays whole; a sentence may end inside quotes.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’»)\]]*\s+|[。！？]+[」』”’）]*\s*")
# ASCII , ; : between two digits is part of a number or a time (1,000 / 10:30), not a clause end.
_CLAUSE_END = re.compile(r"(?:(?<!\d)[,;:]|[,;:](?!\d))\s*|[，；：、]\s*")
_SPACE = re.compile(r"\s+")
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


def _cut(piece: str, splitter: re.Pattern) -> list[str]:
    starts = [0] + [m.end() for m in splitter.finditer(piece) if 0 < m.end() < len(piece)]
    return [piece[a:b] for a, b in zip(starts, starts[1:] + [len(piece)]) if a < b]


def _split_piece(piece: str, max_bytes: int, level: int = 0) -> list[str]:
    if _nbytes(piece.strip()) <= max_bytes:
        return [piece]
    splitters = [_SENTENCE_END, _CLAUSE_END, _SPACE]
    if level >= len(splitters):
        return _hard_cut(piece, max_bytes)
    parts = _cut(piece, splitters[level])
    if len(parts) == 1:
        return _split_piece(piece, max_bytes, level + 1)
    return [q for p in parts for q in _split_piece(p, max_bytes, level + 1)]


def _merge(pieces: list[str], max_bytes: int) -> list[str]:
    """Greedily join neighbours (with their original separators) while the result fits."""
    out: list[str] = []
    for p in pieces:
        if out and _nbytes((out[-1] + p).strip()) <= max_bytes:
            out[-1] += p
        else:
            out.append(p)
    return out


def split_speaker_turns(text: str) -> list[str]:
    """Turns that each start with their `<|speaker:N|>` tag; text before the first tag is kept
    as a turn of its own (upstream drops it, which silently loses words)."""
    parts = _SPEAKER_SPLIT.split(text)
    turns = [parts[0].strip()] if not _is_only_punctuation(parts[0]) else []
    for i in range(1, len(parts), 2):
        words = parts[i + 1] if i + 1 < len(parts) else ""
        if not _is_only_punctuation(words):  # a bare tag has nothing to say
            turns.append((parts[i] + words).strip())
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
    chunks = _merge(_split_piece(text, max_bytes), max_bytes)
    return [c.strip() for c in chunks if not _is_only_punctuation(c)]
