"""One response's record: its text, audio schedule and timings, and what of it was heard.

How much was heard comes from the transport's `mark_played` reports, or else from a real-time
playout estimate from when each chunk was emitted; a partly heard sentence keeps that share of
its words, at the speaking rate measured on the sentences already complete.
"""
from __future__ import annotations

import asyncio
import dataclasses

from engine.agent.conversation.events import Latency, ResponseKind, ResponseStatus, ResponseTimes

DEFAULT_CHARS_PER_SECOND = 14.0  # speaking rate assumed before a sentence's audio is complete


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


@dataclasses.dataclass
class SentencePlayout:
    text: str
    seconds: float = 0.0  # audio produced so far
    complete: bool = False


@dataclasses.dataclass
class Response:
    id: str
    kind: ResponseKind
    item_id: str
    t_created: float
    t_speech_stopped: float | None = None  # set when a voice turn caused it
    t_transcript: float | None = None
    task: asyncio.Task | None = None
    text: str = ""
    sentences: list[SentencePlayout] = dataclasses.field(default_factory=list)
    playout: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (start, seconds) per chunk
    report: tuple[float, float] | None = None  # (monotonic time, seconds played) from mark_played
    in_history: bool = False  # its heard text is an item of the history
    speak: bool = True  # False: a text-only response
    t_first_token: float | None = None
    t_first_audio: float | None = None
    status: ResponseStatus = "in_progress"
    stopped: bool = False  # audio stopped/cleared already announced
    tools: bool = False  # it may call tools
    call_items: dict[int, str] = dataclasses.field(default_factory=dict)  # call index -> its item id
    calls: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)  # (item, call id, name, args)

    @property
    def audio_seconds(self) -> float:
        return sum(seconds for _, seconds in self.playout)

    @property
    def generating(self) -> bool:
        return self.task is not None and not self.task.done()

    def played(self, now: float) -> float:
        """Seconds of audio heard by `now`: real-time playout from emission, capped by reports."""
        estimate = sum(min(max(now - start, 0.0), seconds) for start, seconds in self.playout)
        if self.report is None:
            return estimate
        t_report, seconds = self.report
        return min(seconds + max(now - t_report, 0.0), estimate)

    def unplayed(self, now: float) -> float:
        return self.audio_seconds - self.played(now)

    def add_audio(self, index: int, text: str, start: float, seconds: float) -> None:
        self.sentence(index, text).seconds += seconds
        self.playout.append((start, seconds))

    def sentence(self, index: int, text: str) -> SentencePlayout:
        while len(self.sentences) <= index:
            self.sentences.append(SentencePlayout(text))
        return self.sentences[index]

    def complete_text(self) -> str:
        """The text of every sentence whose audio is complete (what will still play out)."""
        return " ".join(s.text for s in self.sentences if s.complete)

    def spoken_text(self, played: float) -> str:
        """The reply text whose audio was heard; a partly heard sentence keeps that share of words."""
        done = [s for s in self.sentences if s.complete and s.seconds > 0]
        rate = (sum(len(s.text) for s in done) / sum(s.seconds for s in done)) if done else DEFAULT_CHARS_PER_SECOND
        kept: list[str] = []
        remaining = played
        for sentence in self.sentences:
            if remaining <= 0:
                break
            total = sentence.seconds if sentence.complete else max(sentence.seconds, len(sentence.text) / rate)
            if total <= 0:
                continue
            if remaining >= total - 1e-6:
                kept.append(sentence.text)
            else:
                words = sentence.text.split()
                share = int(len(words) * remaining / total)
                if share:
                    kept.append(" ".join(words[:share]))
            remaining -= total
        return " ".join(kept)

    # ------------------------------------------------------------------ timings
    def latency(self) -> Latency:
        """Milliseconds from the end of the user's turn (VAD stop) or from response creation."""
        base = self.t_speech_stopped if self.t_speech_stopped is not None else self.t_created

        def since(t: float | None) -> float | None:
            return None if t is None else ms(t - base)

        return Latency(transcript=since(self.t_transcript), first_token=since(self.t_first_token),
                       first_audio=since(self.t_first_audio))

    def times(self) -> ResponseTimes:
        return ResponseTimes(created=self.t_created, speech_stopped=self.t_speech_stopped,
                             transcript=self.t_transcript, first_token=self.t_first_token,
                             first_audio=self.t_first_audio)
