"""A request's text as the engine speaks it: normalised and cut into chunks. Shared by the
in-process engine and the parent side of `TTSProcess`, which must refuse the same requests."""
from __future__ import annotations

from engine.speech.types import TTSRequest
from engine.text.chunks import split_text
from engine.text.normalize import normalize_text


class TTSInputError(ValueError):
    """The request cannot be synthesised as given (empty text, unusable reference)."""


def speakable_chunks(request: TTSRequest) -> list[str]:
    text = normalize_text(request.text) if request.normalize else request.text
    chunks = [c for c in split_text(text, request.chunk_length) if c.strip()]
    if not chunks:
        raise TTSInputError("text is empty")
    return chunks
