"""Real test speech and transcript scoring, shared by the agent and WebRTC tests.

Speech comes from Debian's espeak-ng (resampled to 16 kHz by sox), so VAD and ASR tests run on
genuine synthetic speech with known content and known boundaries. Nothing here fakes a model.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Sequence

import jiwer
import numpy as np

SAMPLE_RATE = 16_000

# Sentences Whisper tiny.en transcribes exactly from espeak-ng en-us at 150 wpm (see testing docs).
ROBUST_SENTENCES = (
    "Please turn on the kitchen lights.",
    "What is the weather going to be like tomorrow in Paris?",
    "What is the capital of France?",
    "Hello from the server.",
)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


@functools.lru_cache(maxsize=64)
def _espeak_cached(text: str, rate: int, voice: str) -> bytes:
    if not espeak_available():
        raise RuntimeError("espeak-ng and sox are required for test speech (apt-get install espeak-ng sox)")
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(rate), "--stdout", text],
        check=True, capture_output=True,
    ).stdout
    raw = subprocess.run(
        ["sox", "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-c", "1", "-e", "floating-point", "-b", "32",
         "-t", "raw", "-"],
        input=wav, check=True, capture_output=True,
    ).stdout
    return raw


def espeak_wav(text: str, rate: int = 150, voice: str = "en-us") -> np.ndarray:
    """Speak `text` with espeak-ng; return mono float32 PCM at 16 kHz (a fresh copy)."""
    return np.frombuffer(_espeak_cached(text, rate, voice), dtype=np.float32).copy()


def trim_silence(pcm: np.ndarray, level: float = 0.01) -> np.ndarray:
    """Cut espeak's leading/trailing near-silence, so placed gaps are exact."""
    loud = np.flatnonzero(np.abs(pcm) > level)
    if loud.size == 0:
        return pcm[:0]
    return pcm[loud[0]: loud[-1] + 1]


def speech_with_gaps(
    parts: Sequence[str | float], rate: int = 150, voice: str = "en-us"
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Concatenate spoken sentences (str) and silences (float seconds).

    Returns (pcm float32 16 kHz, truth) where truth lists (start_s, end_s) of each spoken part,
    taken from its non-silent samples.
    """
    pieces: list[np.ndarray] = []
    truth: list[tuple[float, float]] = []
    cursor = 0
    for part in parts:
        if isinstance(part, str):
            speech = trim_silence(espeak_wav(part, rate, voice))
            truth.append((cursor / SAMPLE_RATE, (cursor + len(speech)) / SAMPLE_RATE))
            pieces.append(speech)
            cursor += len(speech)
        else:
            silence = np.zeros(int(round(float(part) * SAMPLE_RATE)), dtype=np.float32)
            pieces.append(silence)
            cursor += len(silence)
    pcm = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return pcm.astype(np.float32), truth


def pcm24k_bytes(pcm16k: np.ndarray) -> bytes:
    """16 kHz float speech as the 24 kHz 16-bit little-endian PCM a realtime client appends."""
    from engine.audio import float_to_pcm16, resample

    return float_to_pcm16(resample(pcm16k, SAMPLE_RATE, 24_000)).tobytes()


def frames(pcm: np.ndarray, size: int = 512):
    """Split PCM into consecutive pieces of `size` samples (the last one may be shorter)."""
    for start in range(0, len(pcm), size):
        yield pcm[start: start + size]


_PUNCT = re.compile(r"[^\w\s']")


def normalize(text: str) -> str:
    """Lowercase, hyphens to spaces, punctuation dropped, whitespace collapsed."""
    text = text.lower().replace("-", " ")
    text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


def wer(reference: str | Sequence[str], hypothesis: str | Sequence[str]) -> float:
    """Word error rate after `normalize` (corpus-level when given lists)."""
    if isinstance(reference, str):
        reference, hypothesis = [reference], [hypothesis]  # type: ignore[list-item]
    refs = [normalize(r) for r in reference]
    hyps = [normalize(h) for h in hypothesis]
    if any(not r for r in refs):
        raise ValueError("reference transcripts must not be empty")
    return float(jiwer.wer(refs, hyps))
