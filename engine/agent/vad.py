"""Voice activity detection: silero-vad's ONNX model on onnxruntime, streamed over 16 kHz frames.

`SileroVAD` is the shared model (load once at start-up); `VADStream` carries one audio stream's
recurrent state; `TurnDetector` turns per-frame speech probabilities into OpenAI `server_vad`
style turns (threshold, prefix padding, silence duration). No torch on this path.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from collections import deque
from pathlib import Path

import numpy as np
import onnxruntime as ort

INPUT_SAMPLE_RATE = 16_000  # what every input stream is resampled to


@dataclasses.dataclass(frozen=True)
class TurnDetection:
    """OpenAI `server_vad` parameters and defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True


FRAME_SAMPLES = 512  # what the 16 kHz model expects per call (32 ms)
CONTEXT_SAMPLES = 64  # tail of the previous frame the model sees in front of each frame
FRAME_SECONDS = FRAME_SAMPLES / INPUT_SAMPLE_RATE
# Prefer the opset-15 16 kHz export: it loads several times faster than the generic one.
_MODEL_FILES = ("silero_vad_16k_op15.onnx", "silero_vad.onnx")
# Silero's own streaming iterator ends speech below threshold - 0.15 (hysteresis against flicker).
_HYSTERESIS = 0.15
MAX_TURN_SECONDS = 60.0  # a turn that never pauses is cut here so buffers stay bounded
# Silero's probability trails the sound: after the last word it stays above the off threshold for
# two or three more frames of silence (espeak-ng in four voices: the first frame below it ends 80-110
# ms after the last loud sample). Those frames are already the pause when they hold no sound, so the
# silence is counted from where the sound stopped, as `silence_duration_ms` means: up to this many
# trailing frames that silero called speech count as silence when they are quiet...
MAX_QUIET_TAIL_FRAMES = 3
# ... where quiet is 30 dB below the turn's recent loudest frame. Speech trailing off is 10-20 dB down,
# a browser's noise-suppressed silence far lower. Under louder noise (a fan by the mic, a hissing line)
# nothing is credited, and silero alone decides as before.
QUIET_RATIO = 10 ** (-30 / 20)
LEVEL_DECAY = 0.99  # per frame: the turn's loudness reference forgets a peak in a few seconds


def silero_onnx_path() -> Path:
    """The ONNX file inside the installed silero_vad package, found without importing it (torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed: pip install --no-deps silero-vad")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    for name in _MODEL_FILES:
        if (data / name).is_file():
            return data / name
    raise RuntimeError(f"no silero-vad ONNX model found in {data}")


def cpu_onnx_session(path: str | Path, threads: int) -> ort.InferenceSession:
    """An onnxruntime CPU session with `threads` intra-op threads and no inter-op parallelism."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class SileroVAD:
    """The silero-vad ONNX model. Thread-safe and shareable: per-stream state lives in VADStream."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session

    @classmethod
    def load(cls, path: str | Path | None = None, *, threads: int = 1) -> SileroVAD:
        # One 32 ms frame is ~0.1 ms of work: threads only add overhead and contention.
        vad = cls(cpu_onnx_session(path or silero_onnx_path(), threads))
        vad.stream().probability(np.zeros(FRAME_SAMPLES, np.float32))  # warm up now, not on the first call
        return vad

    def stream(self) -> VADStream:
        return VADStream(self._session)


class VADStream:
    """Speech probability per 512-sample frame for one continuous 16 kHz stream."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self._sr = np.array(INPUT_SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)

    def probability(self, frame: np.ndarray) -> float:
        if frame.shape != (FRAME_SAMPLES,):
            raise ValueError(f"VAD frames must be {FRAME_SAMPLES} samples at 16 kHz, got shape {frame.shape}")
        x = np.concatenate([self._context, frame.astype(np.float32, copy=False)])[None, :]
        out, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = x[0, -CONTEXT_SAMPLES:]
        return float(out[0, 0])


@dataclasses.dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int  # where speech began in the stream (before prefix padding)


@dataclasses.dataclass(frozen=True)
class SpeechStopped:
    audio_start_ms: int  # start of the returned audio (speech start minus prefix padding)
    audio_end_ms: int  # where speech ended in the stream
    audio: np.ndarray  # float32 16 kHz: prefix padding + speech + silence up to the stop decision


TurnEvent = SpeechStarted | SpeechStopped


def as_pcm16k(pcm: np.ndarray) -> np.ndarray:
    """Validate and convert input audio to contiguous float32 mono (int16 is scaled)."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise ValueError(f"audio must be mono 1-D samples, got shape {pcm.shape}")
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    if not np.issubdtype(pcm.dtype, np.floating):
        raise ValueError(f"audio must be float32 in [-1, 1] or int16, got {pcm.dtype}")
    return np.ascontiguousarray(pcm, dtype=np.float32)


class TurnDetector:
    """OpenAI `server_vad` turn detection over any-length 16 kHz pushes.

    Speech starts on the first frame whose probability reaches `threshold`; it stops once the
    probability has stayed below `threshold - 0.15` for `silence_duration_ms`, counted from the end
    of the sound (see MAX_QUIET_TAIL_FRAMES). A stopped turn carries its audio from
    `prefix_padding_ms` before the start.
    """

    def __init__(self, vad: SileroVAD, params: TurnDetection = TurnDetection()) -> None:
        self._stream = vad.stream()
        self._pending = np.zeros(0, dtype=np.float32)
        self._samples_seen = 0  # frames fully processed, in samples
        self._in_speech = False
        self._turn: list[np.ndarray] = []
        self._turn_start = 0
        self._speech_start = 0
        self._last_voiced_end = 0
        self._level = 0.0  # the turn's loudness reference (frame RMS, a decaying peak)
        self._quiet_tail = 0  # voiced frames since the last loud one (at most MAX_QUIET_TAIL_FRAMES)
        self.configure(params)

    def configure(self, params: TurnDetection) -> None:
        if not 0.0 < params.threshold < 1.0:
            raise ValueError(f"turn_detection.threshold must be in (0, 1), got {params.threshold}")
        if params.prefix_padding_ms < 0 or params.silence_duration_ms < 0:
            raise ValueError("turn_detection padding and silence durations must be >= 0")
        self.params = params
        self._off_threshold = max(params.threshold - _HYSTERESIS, 0.01)
        self._silence_frames = max(1, round(params.silence_duration_ms / 1000 / FRAME_SECONDS))
        pad_frames = int(np.ceil(params.prefix_padding_ms / 1000 / FRAME_SECONDS))
        old = list(getattr(self, "_preroll", ()))
        self._preroll: deque[np.ndarray] = deque(old[-pad_frames:] if pad_frames else (), maxlen=pad_frames or 1)
        self._pad_frames = pad_frames

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def position_ms(self) -> int:
        return _ms(self._samples_seen)

    @property
    def pause_ms(self) -> int:
        """How long the turn in progress has been quiet (0 outside a turn)."""
        return _ms(self._samples_seen - self._last_voiced_end) if self._in_speech else 0

    @property
    def turn_ms(self) -> int:
        """How much audio the turn in progress holds so far (0 between turns)."""
        return _ms(len(self._turn) * FRAME_SAMPLES) if self._in_speech else 0

    def turn_audio(self, max_samples: int | None = None) -> np.ndarray:
        """The turn in progress so far, prefix padding included (the start of what its
        SpeechStopped will carry); only its last `max_samples` when given."""
        if not (self._in_speech and self._turn):
            return np.zeros(0, np.float32)
        if max_samples is None:
            return np.concatenate(self._turn)
        n_frames = -(-max_samples // FRAME_SAMPLES)  # ceil
        return np.concatenate(self._turn[-n_frames:])[-max_samples:] if n_frames else np.zeros(0, np.float32)

    def reset(self) -> None:
        """Forget any partial turn (e.g. input_audio_buffer.clear); the stream clock keeps running."""
        self._stream.reset()
        self._in_speech = False
        self._turn = []
        self._preroll.clear()

    def push(self, pcm: np.ndarray) -> list[TurnEvent]:
        pcm = as_pcm16k(pcm)
        data = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        events: list[TurnEvent] = []
        n_frames = len(data) // FRAME_SAMPLES
        for i in range(n_frames):
            frame = data[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]
            event = self._step(frame)
            if event is not None:
                events.append(event)
        self._pending = data[n_frames * FRAME_SAMPLES:].copy()
        return events

    def flush(self) -> SpeechStopped | None:
        """End a turn in progress now (end of input)."""
        if not self._in_speech:
            return None
        return self._stop(self._last_voiced_end)

    def _step(self, frame: np.ndarray) -> TurnEvent | None:
        prob = self._stream.probability(frame)
        frame_start = self._samples_seen
        self._samples_seen += FRAME_SAMPLES
        if not self._in_speech:
            if prob >= self.params.threshold:
                self._in_speech = True
                self._speech_start = frame_start
                self._level, self._quiet_tail = 0.0, 0
                self._note_voiced(frame)
                self._last_voiced_end = self._samples_seen
                self._turn = list(self._preroll) + [frame.copy()]
                self._turn_start = frame_start - FRAME_SAMPLES * len(self._preroll)
                self._preroll.clear()
                return SpeechStarted(audio_start_ms=_ms(frame_start))
            if self._pad_frames:
                self._preroll.append(frame.copy())
            return None
        self._turn.append(frame.copy())
        if prob >= self._off_threshold:
            self._note_voiced(frame)
            self._last_voiced_end = self._samples_seen
        elif self._quiet_tail:  # the first unvoiced frame: the quiet frames just before were the pause
            self._last_voiced_end -= self._quiet_tail * FRAME_SAMPLES
            self._quiet_tail = 0
        silent_frames = (self._samples_seen - self._last_voiced_end) // FRAME_SAMPLES
        too_long = (self._samples_seen - self._turn_start) / INPUT_SAMPLE_RATE >= MAX_TURN_SECONDS
        if silent_frames >= self._silence_frames or too_long:
            return self._stop(self._last_voiced_end)
        return None

    def _note_voiced(self, frame: np.ndarray) -> None:
        rms = float(np.sqrt(np.dot(frame, frame) / len(frame)))
        self._level = max(self._level * LEVEL_DECAY, rms)
        quiet = rms < QUIET_RATIO * self._level
        self._quiet_tail = min(self._quiet_tail + 1, MAX_QUIET_TAIL_FRAMES) if quiet else 0

    def _stop(self, speech_end: int) -> SpeechStopped:
        audio = np.concatenate(self._turn) if self._turn else np.zeros(0, np.float32)
        event = SpeechStopped(audio_start_ms=_ms(max(self._turn_start, 0)), audio_end_ms=_ms(speech_end), audio=audio)
        self._in_speech = False
        self._turn = []
        return event


def _ms(samples: int) -> int:
    return int(round(samples * 1000 / INPUT_SAMPLE_RATE))
