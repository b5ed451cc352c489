"""Incremental sentence splitting for streamed LLM text, so TTS can start on the first sentence.

A sentence ends at . ! ? … (optionally followed by closing quotes/brackets) once whitespace
follows, or at a line break. Common abbreviations ("Dr.", "e.g.") and initials do not end one.
A run-on without punctuation is cut at a clause mark or a space once it grows past `max_chars`.
"""
from __future__ import annotations

import re

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e a.m p.m approx no fig dept inc ltd co mt ft".split()
)
# End punctuation, closing quotes/brackets, then whitespace (the lookahead keeps the whitespace
# in the buffer so a boundary is only final once the next character exists).
_END = re.compile(r"([.!?…]+)([\"'”’)\]]*)(?=\s)|\n+")
_CLAUSE = re.compile(r"[,;:—–]\s")
_MARKUP = re.compile(r"[*_`#~|<>\[\]{}]+|^\s*[-•]\s+", re.MULTILINE)


class SentenceSplitter:
    """Feed text deltas; get back each sentence as soon as it is complete."""

    def __init__(self, max_chars: int = 250, min_chars: int = 2) -> None:
        self.max_chars = max_chars
        self.min_chars = min_chars
        self._buffer = ""

    def feed(self, delta: str) -> list[str]:
        self._buffer += delta
        out: list[str] = []
        while True:
            cut = self._next_boundary()
            if cut is None:
                break
            sentence, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:].lstrip()
            if not sentence:
                continue
            if out and len(sentence) < self.min_chars:
                out[-1] = f"{out[-1]} {sentence}"  # a stray "!" or "1." is not worth its own TTS call
            else:
                out.append(sentence)
        return out

    def flush(self) -> list[str]:
        """The rest of the text, at the end of the stream."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []

    def _next_boundary(self) -> int | None:
        for match in _END.finditer(self._buffer):
            if match.group(0).startswith("\n") or not _is_abbreviation(self._buffer, match.start()):
                return match.end()
        if len(self._buffer) > self.max_chars:
            head = self._buffer[: self.max_chars]
            clauses = [m.end() for m in _CLAUSE.finditer(head)]
            if clauses:
                return clauses[-1]
            space = head.rfind(" ")
            return space + 1 if space > 0 else self.max_chars
        return None


def _is_abbreviation(text: str, dot: int) -> bool:
    if text[dot] != ".":
        return False
    word = re.search(r"([\w.]+)$", text[:dot])
    if not word:
        return False
    token = word.group(1)
    return token.lower() in _ABBREVIATIONS or (len(token) == 1 and token.isupper())  # an initial: "J. Smith"


def split_sentences(text: str, max_chars: int = 250) -> list[str]:
    """Whole-text convenience: every sentence of `text`."""
    splitter = SentenceSplitter(max_chars=max_chars)
    return splitter.feed(text) + splitter.flush()


def speakable(text: str) -> str:
    """Strip markdown and list markup an LLM may emit, which TTS would read aloud or choke on."""
    return " ".join(_MARKUP.sub(" ", text).split())
