"""Semantic end of turn: Smart Turn v3 on onnxruntime, and OpenAI `semantic_vad` built on it.

`SmartTurn` is the shared model (load once at start-up): the probability that the speech so far
is a complete turn, judged from the last 8 s of audio (words and prosody, not just silence).
`SemanticTurnDetection` is the session setting; `SemanticEndOfTurn` layers the model over
silero's `TurnDetector`: on a short pause it asks Smart Turn, ends the turn at once when the
answer is "complete", and otherwise re-asks each time the pause has doubled, until the pause
reaches the max wait set by eagerness (then the turn ends as server_vad's would).

The model is the ONNX file bundled in the `pipecat-ai` wheel (BSD-2-Clause), found without
importing pipecat. Its input contract (from pipecat's smart_turn code): 16 kHz audio, the last
8 s zero-padded in front to exactly 8 s, normalised to zero mean and unit variance, then
Whisper's log-mel (80 mels, 400-sample FFT, 160 hop) -> `input_features` (1, 80, 800); the
output is a sigmoid probability that the turn is complete.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import time
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import onnxruntime as ort

from engine.agent.vad import (FRAME_SAMPLES, INPUT_SAMPLE_RATE, SpeechStarted, TurnDetection, TurnDetector,
                              TurnEvent, as_pcm16k, cpu_onnx_session)

log = logging.getLogger(__name__)

MODEL_SECONDS = 8
MODEL_SAMPLES = MODEL_SECONDS * INPUT_SAMPLE_RATE
_MODEL_PATH = ("audio", "turn", "smart_turn", "data", "smart-turn-v3.2-cpu.onnx")  # inside the pipecat package
_NORM_EPS = 1e-7  # what the model's Whisper feature extractor adds to the variance
N_FFT, HOP, N_MELS = 400, 160, 80  # Whisper's log-mel: 25 ms windows every 10 ms

Eagerness = Literal["low", "medium", "high", "auto"]
EAGERNESS: tuple[str, ...] = get_args(Eagerness)
# Longest pause a turn may hold when Smart Turn keeps saying "incomplete" (auto = medium, as OpenAI).
# Shorter than OpenAI's 8/4/2 s: a local agent answering in under a second should not sit 4 s on a miss.
MAX_WAIT_MS = {"low": 4000, "medium": 2000, "high": 1000, "auto": 2000}
COMPLETE_THRESHOLD = 0.5  # pipecat's cut-off for "complete"
# A pause this long asks the model (server_vad waits 500 ms by default). Pauses count from the end of
# the sound (vad.MAX_QUIET_TAIL_FRAMES). On bench_turn's espeak set, 160 ms ended "I would like to order
# a, um" and "Hello, how are you today?" at their commas, 192 ms the second, 224 ms neither. (Counted
# from silero's lagging verdict instead, as before, 160 ms was this moment and cut only "Hello,".)
FIRST_CHECK_MS = 224
# An "incomplete" is asked again once the pause has doubled (224, 448, 896 ms, ...): more silence is
# more evidence, and a long pause costs a few inferences, not one per frame.
RECHECK_FACTOR = 2


def smart_turn_onnx_path() -> Path:
    """The Smart Turn ONNX file inside the installed pipecat-ai package, found without importing it."""
    spec = importlib.util.find_spec("pipecat")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pipecat-ai is not installed (it carries the Smart Turn model): "
                           "pip install --no-deps pipecat-ai==1.14.0")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_MODEL_PATH)
    if not path.is_file():
        raise RuntimeError(f"no Smart Turn model at {path} (pipecat-ai==1.14.0 ships it)")
    return path


class SmartTurn:
    """The Smart Turn v3 model. Thread-safe and shareable: `probability` keeps no state."""

    def __init__(self, session: ort.InferenceSession) -> None:
        # faster-whisper's Slaney mel filterbank; imported here so that the conversation package stays light.
        from faster_whisper.feature_extractor import FeatureExtractor

        self._session = session
        self._mel_filters = FeatureExtractor.get_mel_filters(INPUT_SAMPLE_RATE, N_FFT, n_mels=N_MELS)  # float64
        self._window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann

    @classmethod
    def load(cls, path: str | Path | None = None, *, threads: int = 1) -> SmartTurn:
        # One thread, as Pipecat runs it: on a busy 2-core machine a second thread measured slower
        # (bench/bench_turn.py --threads), and ASR or TTS may be using the other core.
        model = cls(cpu_onnx_session(path or smart_turn_onnx_path(), threads))
        model.probability(np.zeros(INPUT_SAMPLE_RATE, np.float32))  # warm up now, not on the first pause
        return model

    def features(self, pcm16k: np.ndarray) -> np.ndarray:
        """(80, 800) float32 log-mel of the last 8 s, laid out as the model was trained on.

        The spectrogram is float64, as in the training features: the int8 model is so sensitive
        that float32 rounding alone (1e-6) moves a borderline answer by 0.1 or more.
        """
        pcm = as_pcm16k(pcm16k)[-MODEL_SAMPLES:]
        x = np.pad(pcm, (MODEL_SAMPLES - len(pcm), 0))  # silence in front: the end of speech stays at the end
        x = (x - x.mean()) / np.sqrt(x.var() + _NORM_EPS)
        padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")  # centred windows
        windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:-1]  # 800: Whisper drops the last
        power = np.abs(np.fft.rfft(windows * self._window, axis=-1)) ** 2
        log_mel = np.log10(np.maximum(self._mel_filters @ power.T, 1e-10))
        log_mel = np.maximum(log_mel, log_mel.max() - 8.0)  # an 80 dB range below the loudest
        return ((log_mel + 4.0) / 4.0).astype(np.float32)

    def probability(self, pcm16k: np.ndarray) -> float:
        """The probability that this speech (16 kHz, ending now) is a complete turn. Blocking."""
        (out,) = self._session.run(None, {"input_features": self.features(pcm16k)[None]})
        return float(out.reshape(-1)[0])


@dataclasses.dataclass(frozen=True)
class SemanticTurnDetection:
    """OpenAI `semantic_vad` parameters and defaults."""

    eagerness: Eagerness = "auto"
    create_response: bool = True
    interrupt_response: bool = True

    def __post_init__(self) -> None:
        if self.eagerness not in EAGERNESS:
            raise ValueError(f"turn_detection.eagerness must be one of {', '.join(EAGERNESS)}; got {self.eagerness!r}")

    @property
    def max_wait_ms(self) -> int:
        return MAX_WAIT_MS[self.eagerness]

    def silence_params(self) -> TurnDetection:
        """The silero layer underneath: server_vad's speech threshold and padding, cut at the max wait."""
        return TurnDetection(silence_duration_ms=self.max_wait_ms, create_response=self.create_response,
                             interrupt_response=self.interrupt_response)


class SemanticEndOfTurn:
    """Ends `detector`'s turns early when Smart Turn judges them complete.

    `detector` must be configured with `params.silence_params()` (its silence timeout is the max wait).
    """

    def __init__(self, detector: TurnDetector, model: SmartTurn, params: SemanticTurnDetection) -> None:
        self._detector = detector
        self._model = model
        self.params = params
        self._next_check_ms = FIRST_CHECK_MS
        self.last_probability: float | None = None  # the latest answer, for logs and benches

    async def push(self, pcm16k: np.ndarray) -> list[TurnEvent]:
        """`TurnDetector.push`, frame by frame, asking the model (off the event loop) at pauses."""
        pcm = as_pcm16k(pcm16k)
        events: list[TurnEvent] = []
        for start in range(0, len(pcm), FRAME_SAMPLES):
            for event in self._detector.push(pcm[start:start + FRAME_SAMPLES]):
                events.append(event)
                if isinstance(event, SpeechStarted):
                    self._next_check_ms = FIRST_CHECK_MS
            pause_ms = self._detector.pause_ms
            if pause_ms < FIRST_CHECK_MS:
                self._next_check_ms = FIRST_CHECK_MS  # speaking (again): the next pause starts over
                continue
            if not self._detector.in_speech or pause_ms < self._next_check_ms:
                continue
            self._next_check_ms = pause_ms * RECHECK_FACTOR
            audio = self._detector.turn_audio(MODEL_SAMPLES)
            t0 = time.perf_counter()
            self.last_probability = await asyncio.to_thread(self._model.probability, audio)
            log.debug("smart turn: p=%.2f after a %d ms pause (%.0f ms)", self.last_probability, pause_ms,
                      (time.perf_counter() - t0) * 1000)
            if self.last_probability >= COMPLETE_THRESHOLD:
                stopped = self._detector.flush()  # None if the turn was reset while the model ran
                if stopped is not None:
                    events.append(stopped)
        return events
