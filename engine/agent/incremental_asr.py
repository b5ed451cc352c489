"""Transcription while the user speaks, so the end of a turn finds its transcript (nearly) ready.

A Whisper pass costs a few hundred milliseconds on a small CPU, most of it fixed (the encoder sees
the turn plus a margin, see asr.py; the decoder runs per word), so the useful moment to
transcribe is the start of a pause: the VAD then still waits `silence_duration_ms` before it ends
the turn, and a pass over the audio so far, started at the pause, covers every word the turn will
hold. `IncrementalTranscriber` therefore runs a pass over the growing turn audio at each pause
(after `pause_ms` below the VAD's threshold), and after each `interval_ms` of new speech while two
passes fit the VAD's silence window (`budget_ms`): a pass still running when the pause comes delays
the pause pass by up to its own length, and the pause pass is what a speculative reply
(conversation/speculation.py) and semantic_vad's answer wait for. One pass at a time on the shared
ASR thread (none while one is in flight), and only while audio comes at about real time (a client
that sends a recording at once gets no passes: they would only delay the one that counts). At the
end of the turn the latest pass is the final transcript if it reaches past the speech's end;
otherwise the whole turn is transcribed, as without this class.

Deltas follow local agreement: words that two consecutive passes agree on are final and are sent
(`on_delta`), so a delta is never taken back; the rest of the final transcript follows at the end.
The deltas then add up to the final transcript, unless the final pass rewrites a word already
sent (rare: the `completed` transcript is the one that counts).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from engine.agent.vad import INPUT_SAMPLE_RATE

if TYPE_CHECKING:
    from engine.agent.asr import Transcriber
    from engine.agent.vad import TurnDetector

log = logging.getLogger(__name__)

# 64 ms of pause (counted from the end of the sound, see vad.MAX_QUIET_TAIL_FRAMES) start the pause
# pass: usually silero's first silent frame. bench_asr --incremental (24 turns, tiny.en, 2 cores), end of
# the words -> a pause pass over all of them: 381 ms median at 64 ms, 434 ms at 96 (in 23/24 turns),
# 384 ms at 32 with twice the passes. Before pauses counted from the sound, 64 ms gave 413 ms. A pass
# started at a gap between words is simply superseded by the next one.
PAUSE_MS = 64
BURST_MS = 500  # how far audio may run ahead of the wall clock (network jitter) and still count as live
_WORD = re.compile(r"\S+")
_NOT_WORD = re.compile(r"[^\w']")
_TRAILING_PUNCTUATION = re.compile(r"[^\w']+$")


def _key(word: str) -> str:
    return _NOT_WORD.sub("", word.lower())


def agreed_prefix(previous: str, current: str) -> str:
    """The start of `current` (its own characters) whose words `previous` also begins with. The
    punctuation after the last agreed word is left out: passes disagree on it more than on words
    ("lights," then "lights. What"), and a delta once sent cannot be taken back."""
    end = 0
    prev_words = [_key(w) for w in previous.split()]
    for n, match in enumerate(_WORD.finditer(current)):
        if n >= len(prev_words) or _key(match.group()) != prev_words[n]:
            break
        end = match.start() + len(_TRAILING_PUNCTUATION.sub("", match.group()))
    return current[:end]


class IncrementalTranscriber:
    """One turn's transcript, kept current while the user speaks (one instance per turn)."""

    def __init__(self, asr: Transcriber, *, on_delta: Callable[[str], None] | None = None,
                 on_pause_pass: Callable[[str, int], None] | None = None,
                 interval_ms: int = 500, pause_ms: int = PAUSE_MS, min_ms: int = 1000, budget_ms: int = 500) -> None:
        """`on_pause_pass(text, speech_end_ms)`: a pass started in a pause has landed; it holds every
        word up to `speech_end_ms` (turn time), the turn's transcript if no speech follows."""
        self._asr = asr
        self._on_delta = on_delta
        self._on_pause_pass = on_pause_pass
        self.interval_ms = interval_ms
        self.pause_ms = pause_ms
        self.min_ms = min_ms  # the least turn audio for a pass while the user still speaks
        self.budget_ms = budget_ms
        self._first: tuple[float, int] | None = None  # (monotonic s, turn ms) at the first update
        self._task: asyncio.Task | None = None  # the pass in flight
        self._launched_ms = 0  # how much turn audio the latest launched pass holds
        self._latest: tuple[int, str] | None = None  # (samples, text) of the latest finished pass
        self._previous = ""  # the text of the pass before, for agreement
        self.committed = ""  # what the deltas have sent so far
        self.passes = 0
        self.reused = False  # the final transcript came from a pass run while the user spoke
        self._finished = False

    def update(self, detector: TurnDetector) -> None:
        """After each push while the turn is open: start a pass if one is due and none is running."""
        if self._task is not None or self._finished:
            return
        turn_ms, silence_ms = detector.turn_ms, detector.pause_ms
        now = time.monotonic()
        if self._first is None:
            self._first = (now, turn_ms)
        if turn_ms - self._first[1] > (now - self._first[0]) * 1000 + BURST_MS:
            return  # faster than real time: the turn will end before a pass could help
        speech_end_ms = turn_ms - silence_ms
        if self._launched_ms >= speech_end_ms + min(silence_ms, self.pause_ms):
            return  # every word so far is already in a pass
        paused = silence_ms >= self.pause_ms
        recent = self._asr.recent_seconds
        # An interval pass and then the pause pass must both fit the silence window (with a margin: load
        # varies). At 0.8 x the window, tiny.en on 2 cores (~270 ms a pass) kept passing during server_vad
        # turns and the pause pass often started late: speech end -> pause pass 462 ms median, in 13/24
        # turns, against 401 ms in 23/24 at 0.4 x (bench_asr --incremental).
        keeps_up = recent is None or recent * 1000 <= 0.4 * self.budget_ms
        if paused or (keeps_up and turn_ms >= self.min_ms and turn_ms - self._launched_ms >= self.interval_ms):
            self._launched_ms = turn_ms
            self._task = asyncio.ensure_future(self._run_pass(detector.turn_audio(),
                                                              speech_end_ms if paused else None))

    async def _run_pass(self, audio: np.ndarray, paused_at_ms: int | None = None) -> None:
        try:
            text = await self._asr.transcribe(audio, turn=True)
        except Exception:  # noqa: BLE001 - a failed partial costs nothing: the end of turn retries
            log.exception("incremental transcription pass failed")
            return
        finally:
            self._task = None
        self.passes += 1
        self._latest = (len(audio), text)
        if not self._finished:
            self._commit(agreed_prefix(self._previous, text))
            if paused_at_ms is not None and self._on_pause_pass is not None:
                self._on_pause_pass(text, paused_at_ms)
        self._previous = text

    def _commit(self, text: str) -> None:
        if len(text) > len(self.committed) and text.startswith(self.committed):
            delta, self.committed = text[len(self.committed):], text
            if self._on_delta is not None:
                self._on_delta(delta)

    async def finish(self, audio: np.ndarray, speech_end_ms: int) -> str:
        """The turn ended: its final transcript. `audio` is the whole turn (as SpeechStopped
        carries it), `speech_end_ms` where the speech in it ends. The rest is sent as a delta."""
        self._finished = True
        if self._task is not None:
            await asyncio.shield(self._task)
        needed = (speech_end_ms + self.pause_ms) * INPUT_SAMPLE_RATE // 1000
        if self._latest is not None and self._latest[0] >= min(needed, len(audio)):
            text, self.reused = self._latest[1], True
        else:
            text = await self._asr.transcribe(audio, turn=True)
        if text.startswith(self.committed):
            self._commit(text)
        else:
            log.debug("final transcript %r rewrites the sent deltas %r", text, self.committed)
        return text

    async def idle(self) -> None:
        """Until the pass in flight (if any) has finished."""
        if self._task is not None:
            await asyncio.shield(self._task)

    def cancel(self) -> None:
        """The turn was dropped (buffer cleared): send nothing more. A running pass just finishes."""
        self._finished = True
