"""Audio in and out of a WebRTC call.

In: `InboundAudio` reads the peer's track (Opus decoded by aiortc to 48 kHz, usually packed
stereo), resamples it with one `av.AudioResampler` to 16 kHz mono float32 and hands it on.
Out: `OutboundAudioTrack` is the one audio track a call sends: 20 ms 48 kHz frames paced on the
wall clock, silence when idle, TTS chunks (44.1 kHz) resampled as they arrive. A barge-in
flushes queued audio at once; frame timestamps simply keep counting, so the receiver's jitter
buffer never sees a jump (the "silent after interruption" bug of other stacks). The track hands
aiortc Opus packets it encoded itself (`OpusFrames`), which aiortc sends as they are.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import fractions
import logging
import time
from collections.abc import Awaitable, Callable

import av
import numpy as np
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from engine.agent.conversation import INPUT_SAMPLE_RATE

log = logging.getLogger(__name__)

OUTPUT_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms at 48 kHz
FRAME_SECONDS = FRAME_SAMPLES / OUTPUT_RATE
_TIME_BASE = fractions.Fraction(1, OUTPUT_RATE)
MAX_LAG_SECONDS = 0.2  # behind the clock by more than this (a stalled loop): re-anchor, don't burst
OPUS_BITRATE = 64_000  # mono speech; aiortc's own encoder spends 96 kb/s on a stereo upmix of it


@dataclasses.dataclass
class OutboundStats:
    frames: int = 0  # frames handed to the encoder
    audio_frames: int = 0  # frames that carried response audio
    underruns: int = 0  # silent frames in the middle of a response (audio arrived too late)
    late_frames: int = 0  # frames produced more than one frame period (20 ms) behind the wall clock
    late_frames_60ms: int = 0  # ... more than 60 ms behind: beyond what a receiver's jitter buffer hides
    max_lateness_ms: float = 0.0
    reanchors: int = 0  # times the pacing clock was re-anchored after a stall
    cleared_seconds: float = 0.0  # queued audio dropped by barge-in / cancel


class OpusFrames:
    """20 ms mono s16 frames at 48 kHz -> Opus packets stamped with the frame's timestamp.

    Encoding inline on the loop costs ~0.1 ms a frame. aiortc's own path cost several times
    that per frame and call: a thread-pool hop for every frame, an upmix to stereo, and an audio
    level computed sample by sample in Python. Idle silence is cheaper still: once the encoder
    has settled on silence (two zero frames gave the same packet), that packet is reused
    without encoding, as the encoder would have produced it again.
    """

    def __init__(self, bitrate: int = OPUS_BITRATE) -> None:
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.bit_rate = bitrate
        self._codec.format = "s16"
        self._codec.layout = "mono"
        self._codec.sample_rate = OUTPUT_RATE
        self._codec.time_base = _TIME_BASE
        self._codec.options = {"application": "voip"}  # aiortc's choice; it also settles fastest on silence
        self._last_silent: bytes | None = None  # the packet of the last all-zero frame
        self._silence: bytes | None = None  # the settled encoder's packet for an all-zero frame
        self.encoded = 0  # frames that went through the encoder (the rest reused the silence packet)

    def encode(self, frame: av.AudioFrame, pcm: np.ndarray) -> av.Packet:
        """`frame` carries `pcm` (its samples, to test for silence without a copy)."""
        silent = not pcm.any()
        if silent and self._silence is not None:
            data = self._silence
        else:
            # libopus gives one packet per 20 ms frame at once (its lookahead shows only in pts).
            data = b"".join(bytes(p) for p in self._codec.encode(frame))
            self.encoded += 1
            if not silent:
                self._last_silent = self._silence = None
            elif data == self._last_silent:
                self._silence = data
            else:
                self._last_silent = data
        packet = av.Packet(data)
        packet.pts = frame.pts
        packet.time_base = _TIME_BASE
        return packet


class OutboundAudioTrack(MediaStreamTrack):
    """The call's outgoing audio. `push` queues a response's PCM; `recv` is aiortc's pull side
    (Opus packets), `next_frame` the same paced PCM frames before encoding.

    `on_played(response_id, seconds)` is called as each frame goes out with the total seconds of
    that response's audio sent so far (what the conversation keeps as "heard" on barge-in).
    """

    kind = "audio"

    def __init__(self, on_played: Callable[[str, float], None] | None = None) -> None:
        super().__init__()
        self._on_played = on_played
        self._queue: collections.deque[tuple[str, np.ndarray]] = collections.deque()  # (response, int16 @48k)
        self._queued = 0
        self._resampler: av.AudioResampler | None = None
        self._resampling: tuple[str, int] | None = None  # (response id, input rate) of the live resampler
        self._sent: dict[str, int] = {}  # samples of each response sent so far
        self._open: set[str] = set()  # responses with audio that have not ended yet
        self._start: float | None = None
        self._pts = 0
        self._opus = OpusFrames()
        self.stats = OutboundStats()

    # ------------------------------------------------------------------ producer side
    @property
    def queued_seconds(self) -> float:
        return self._queued / OUTPUT_RATE

    def push(self, response_id: str, pcm: np.ndarray, sample_rate: int) -> None:
        """Queue mono float32 PCM of a response, resampled to 48 kHz now (not in the pacing path)."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size == 0:
            return
        if self._resampling != (response_id, sample_rate):
            self._finish_resampler()
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=OUTPUT_RATE)
            self._resampling = (response_id, sample_rate)
        frame = av.AudioFrame.from_ndarray(np.clip(pcm, -1.0, 1.0).reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = sample_rate
        self._open.add(response_id)
        self._append(response_id, self._resampler.resample(frame))

    def end_response(self, response_id: str) -> None:
        """No more audio will come for this response: flush the resampler's tail."""
        if self._resampling is not None and self._resampling[0] == response_id:
            self._finish_resampler()
        self._open.discard(response_id)

    def clear(self, response_id: str | None = None) -> None:
        """Drop queued audio of one response (or of all) at once; timestamps keep counting."""
        kept: collections.deque[tuple[str, np.ndarray]] = collections.deque()
        dropped = 0
        for rid, samples in self._queue:
            if response_id is None or rid == response_id:
                dropped += len(samples)
            else:
                kept.append((rid, samples))
        self._queue = kept
        self._queued -= dropped
        self.stats.cleared_seconds += dropped / OUTPUT_RATE
        if self._resampling is not None and (response_id is None or self._resampling[0] == response_id):
            self._resampler, self._resampling = None, None  # its buffered tail is stale too
        if response_id is None:
            self._open.clear()
        else:
            self._open.discard(response_id)

    def _finish_resampler(self) -> None:
        if self._resampler is not None and self._resampling is not None:
            self._append(self._resampling[0], self._resampler.resample(None))
        self._resampler, self._resampling = None, None

    def _append(self, response_id: str, frames: list[av.AudioFrame]) -> None:
        for out in frames:
            samples = out.to_ndarray().reshape(-1)
            if samples.size:
                self._queue.append((response_id, samples))
                self._queued += samples.size

    # ------------------------------------------------------------------ aiortc side
    async def recv(self) -> av.Packet:
        frame, pcm = await self._next()
        return self._opus.encode(frame, pcm)

    async def next_frame(self) -> av.AudioFrame:
        """The next paced 20 ms frame (s16 mono 48 kHz), as `recv` would encode it."""
        return (await self._next())[0]

    async def _next(self) -> tuple[av.AudioFrame, np.ndarray]:
        if self.readyState != "live":
            raise MediaStreamError
        await self._pace()
        frame_pcm, shares = self._take(FRAME_SAMPLES)
        self.stats.frames += 1
        if shares:
            self.stats.audio_frames += 1
            for rid, n in shares.items():
                self._sent[rid] = self._sent.get(rid, 0) + n
                if self._on_played is not None:
                    self._on_played(rid, self._sent[rid] / OUTPUT_RATE)
        if len(shares) == 0 and self._open:
            self.stats.underruns += 1
        frame = av.AudioFrame.from_ndarray(frame_pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUTPUT_RATE
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        return frame, frame_pcm

    async def _pace(self) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = now
            return
        self._pts += FRAME_SAMPLES
        wait = self._start + self._pts / OUTPUT_RATE - now
        if wait > 0:
            await asyncio.sleep(wait)
            return
        lateness = -wait
        self.stats.max_lateness_ms = max(self.stats.max_lateness_ms, lateness * 1000.0)
        if lateness > FRAME_SECONDS:
            self.stats.late_frames += 1
        if lateness > 3 * FRAME_SECONDS:
            self.stats.late_frames_60ms += 1
        if lateness > MAX_LAG_SECONDS:
            self._start = now - self._pts / OUTPUT_RATE
            self.stats.reanchors += 1

    def _take(self, n: int) -> tuple[np.ndarray, dict[str, int]]:
        out = np.zeros(n, dtype=np.int16)
        shares: dict[str, int] = {}
        filled = 0
        while filled < n and self._queue:
            rid, samples = self._queue[0]
            take = min(n - filled, len(samples))
            out[filled:filled + take] = samples[:take]
            filled += take
            shares[rid] = shares.get(rid, 0) + take
            if take == len(samples):
                self._queue.popleft()
            else:
                self._queue[0] = (rid, samples[take:])
        self._queued -= filled
        return out, shares

    def stop(self) -> None:
        self._queue.clear()
        self._queued = 0
        self._open.clear()
        self._resampler, self._resampling = None, None
        super().stop()


# aiortc holds 4 packets (80 ms) of inbound audio before decoding, a playout cushion. The server
# never plays the caller's audio, it only analyses it (VAD, ASR), so it takes each packet as soon as
# the next one shows it complete: the end of the caller's speech is seen 60 ms sooner. A missing
# packet still stalls the buffer until it comes or the buffer overflows, as with aiortc's setting.
INBOUND_PREFETCH = 1
_RECEIVER_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # aiortc keeps it private; checked by a test


def use_shallow_jitter_buffer(receiver) -> bool:
    """Give an audio RTCRtpReceiver the analysis-only jitter buffer, before media flows."""
    current = getattr(receiver, _RECEIVER_JITTER_BUFFER, None)
    if not isinstance(current, JitterBuffer):
        log.warning("this aiortc has no receiver jitter buffer where expected; inbound audio keeps its delay")
        return False
    setattr(receiver, _RECEIVER_JITTER_BUFFER, JitterBuffer(capacity=current.capacity, prefetch=INBOUND_PREFETCH))
    return True


class InboundAudio:
    """Pulls decoded frames from a remote audio track and feeds 16 kHz mono float32 to `sink`."""

    def __init__(self, track: MediaStreamTrack, sink: Callable[[np.ndarray], Awaitable[None]]) -> None:
        self.track = track
        self._sink = sink
        # One resampler per stream: it carries filter state from frame to frame. It keeps the
        # channels and we average them: swresample's own downmix adds 3 dB to the mono mic that
        # browsers send duplicated into both channels (and its upmix takes 3 dB off).
        self._resampler: av.AudioResampler | None = None
        self._layout: str | None = None
        self.frames = 0
        self.samples_out = 0
        self.input_format: tuple[str, str, int] | None = None  # (format, layout, rate) of the first frame

    async def run(self) -> None:
        """Until the track ends. Sink errors propagate (the session decides what they mean)."""
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            if self.input_format is None:
                self.input_format = (frame.format.name, frame.layout.name, frame.sample_rate)
            self.frames += 1
            if frame.layout.name != self._layout:
                self._layout = frame.layout.name
                self._resampler = av.AudioResampler(format="fltp", layout=self._layout, rate=INPUT_SAMPLE_RATE)
            for out in self._resampler.resample(frame):
                pcm = out.to_ndarray().mean(axis=0, dtype=np.float32)
                if pcm.size:
                    self.samples_out += pcm.size
                    await self._sink(pcm)
