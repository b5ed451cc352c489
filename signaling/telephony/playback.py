"""Reply audio to the carrier: small paced media chunks, a mark after each, and what was heard.

Carriers buffer what they are sent and play it in real time. Sending a whole reply at once would
leave seconds queued at the carrier, so the sender keeps at most `lead` seconds ahead of the
carrier's playout clock, in `chunk` pieces. Each chunk is followed by a mark; the carrier
echoes a mark once the audio before it has played, and that echo is the played position the
conversation keeps (`on_played(response_id, seconds)`). On barge-in `clear` drops everything
queued here and asks the carrier to drop its buffer; the marks still pending are forgotten,
because carriers echo them on a clear although their audio never played.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from signaling.telephony.codec import Encoding, PhoneEncoder, silence_byte
from signaling.telephony.messages import Dialect

CHUNK_SECONDS = 0.1  # audio per media message (a mark follows each)
LEAD_SECONDS = 0.3  # how far ahead of the carrier's playout the sender may run
FRAME_SECONDS = 0.02  # carriers play 20 ms frames; the last chunk of a reply is padded to one

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclasses.dataclass
class PlaybackStats:
    chunks: int = 0  # media messages sent
    seconds_sent: float = 0.0
    marks_played: int = 0  # marks the carrier echoed for audio that played
    clears: int = 0  # clear messages sent
    cleared_seconds: float = 0.0  # audio dropped before it was sent
    t_first_media: float | None = None  # monotonic time of the first media message


@dataclasses.dataclass
class _Pending:
    response_id: str
    seconds: float  # that response's audio played once this mark comes back


class CarrierPlayback:
    def __init__(self, *, dialect: Dialect, stream_id: str, encoding: Encoding, rate: int, send: Send,
                 on_played: Callable[[str, float], None], chunk: float = CHUNK_SECONDS,
                 lead: float = LEAD_SECONDS) -> None:
        self._dialect = dialect
        self._stream_id = stream_id
        self._encoding: Encoding = encoding
        self.rate = rate
        self._send = send
        self._on_played = on_played
        self._chunk_bytes = max(1, int(round(chunk * rate)))  # G.711: one byte per sample
        self._frame_bytes = int(round(FRAME_SECONDS * rate))
        self._silence = silence_byte(encoding)
        self.lead = lead
        self._queue: collections.deque[tuple[str, bytearray]] = collections.deque()
        self._encoders: dict[str, PhoneEncoder] = {}
        self._ended: set[str] = set()  # responses whose audio is all queued
        self._sent: dict[str, int] = {}  # bytes sent per response
        self._pending: collections.OrderedDict[str, _Pending] = collections.OrderedDict()
        self._names = itertools.count(1)
        self._clock = 0.0  # monotonic time at which the carrier will have played all it was sent
        self._wake = asyncio.Event()
        self.stats = PlaybackStats()

    # ------------------------------------------------------------------ producer side
    def push(self, response_id: str, pcm: np.ndarray, sample_rate: int) -> None:
        encoder = self._encoders.get(response_id)
        if encoder is None:
            encoder = self._encoders[response_id] = PhoneEncoder(self._encoding, self.rate)
        self._enqueue(response_id, encoder.encode(pcm, sample_rate))

    def end_response(self, response_id: str) -> None:
        """All of the response's audio is queued: flush its resampler, let the tail go out."""
        encoder = self._encoders.pop(response_id, None)
        if encoder is not None:
            self._enqueue(response_id, encoder.flush())
            self._ended.add(response_id)
            self._wake.set()

    def _enqueue(self, response_id: str, data: bytes) -> None:
        if not data:
            return
        if self._queue and self._queue[-1][0] == response_id:
            self._queue[-1][1].extend(data)
        else:
            self._queue.append((response_id, bytearray(data)))
        self._wake.set()

    async def clear(self, response_id: str | None) -> None:
        """Barge-in: drop queued audio (of that response, or all) and the carrier's buffer."""
        kept = collections.deque((rid, data) for rid, data in self._queue
                                  if response_id is not None and rid != response_id)
        dropped = sum(len(data) for _, data in self._queue) - sum(len(data) for _, data in kept)
        self._queue = kept
        for rid in ([response_id] if response_id is not None else list(self._encoders)):
            self._encoders.pop(rid, None)
        self.stats.cleared_seconds += dropped / self.rate
        # Clear whenever the carrier may hold some of it: audio not yet confirmed played, or any
        # audio of a response cut while generating (a clear of an empty buffer is harmless).
        carrier_may_hold = bool(self._pending) or self._clock > time.monotonic() or (
            self._sent.get(response_id, 0) > 0 if response_id is not None else bool(self._sent))
        self._pending.clear()  # echoes of these come back for audio that never played
        self._clock = 0.0
        if carrier_may_hold:
            self.stats.clears += 1
            await self._send(self._dialect.clear(self._stream_id))

    # ------------------------------------------------------------------ carrier side
    def played(self, name: str) -> None:
        """The carrier echoed mark `name`: everything sent before it has played."""
        if name not in self._pending:
            return  # a mark dropped by a clear, or not ours
        while self._pending:
            key, pending = self._pending.popitem(last=False)
            if key == name:
                self.stats.marks_played += 1
                self._on_played(pending.response_id, pending.seconds)
                return

    async def run(self) -> None:
        """Send queued audio, paced against the carrier's playout clock, until cancelled."""
        while True:
            chunk = self._next_chunk()
            if chunk is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            self._clock = max(self._clock, now)
            ahead = self._clock - now
            if ahead > self.lead:
                await asyncio.sleep(ahead - self.lead)
                continue
            response_id, data = self._take(chunk)
            seconds = len(data) / self.rate
            self._clock += seconds
            self._sent[response_id] = self._sent.get(response_id, 0) + len(data)
            name = f"{response_id}.{next(self._names)}"
            self._pending[name] = _Pending(response_id, self._sent[response_id] / self.rate)
            self.stats.chunks += 1
            self.stats.seconds_sent += seconds
            if self.stats.t_first_media is None:
                self.stats.t_first_media = time.monotonic()
            await self._send(self._dialect.media(self._stream_id, bytes(data), self._encoding, self.rate))
            await self._send(self._dialect.mark(self._stream_id, name))

    def _next_chunk(self) -> int | None:
        """Bytes to send next: a full chunk, or what is left of a response that has ended; None
        while a response's next piece is still being synthesised (a 20 ms minimum per message)."""
        if not self._queue:
            return None
        response_id, data = self._queue[0]
        if len(data) >= self._chunk_bytes:
            return self._chunk_bytes
        finished = response_id in self._ended or len(self._queue) > 1
        if finished or len(data) >= self._frame_bytes:
            return len(data)
        return None

    def _take(self, size: int) -> tuple[str, bytearray]:
        response_id, data = self._queue[0]
        piece = data[:size]
        del data[:size]
        if not data:
            self._queue.popleft()
            if not any(rid == response_id for rid, _ in self._queue):
                self._ended.discard(response_id)
        short = -len(piece) % self._frame_bytes
        if short and (not self._queue or self._queue[0][0] != response_id):
            piece.extend(bytes([self._silence]) * short)  # the reply's tail, padded to a whole frame
        return response_id, piece

    def sent_seconds(self, response_id: str) -> float:
        return self._sent.get(response_id, 0) / self.rate
