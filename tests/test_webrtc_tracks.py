"""The call's audio tracks on their own: pacing, resampling, flush on barge-in, played-time reports.

These drive `OutboundAudioTrack` the way aiortc's sender does (its PCM frames before encoding,
and the Opus packets `recv` hands aiortc) and `InboundAudio` with
frames shaped like aiortc's Opus decoder output (48 kHz packed stereo s16), so the transport
logic is checked without a network. Audio content is synthetic tones: what is tested is that
the transport carries it faithfully, not what a model says.
"""
from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from signaling.tracks import FRAME_SAMPLES, OUTPUT_RATE, InboundAudio, OutboundAudioTrack


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[np.argmax(spectrum)])


async def pull(track: OutboundAudioTrack, n: int) -> list[av.AudioFrame]:
    return [await track.next_frame() for _ in range(n)]


def decode_opus(packets: list[av.Packet]) -> np.ndarray:
    """What a receiver hears: the packets through a stereo Opus decoder (as aiortc and browsers
    set it up), channels averaged, as float32."""
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout, decoder.format = 48_000, "stereo", "s16"
    out = [f.to_ndarray().reshape(-1, 2).mean(axis=1) for p in packets for f in decoder.decode(p)]
    return np.concatenate(out).astype(np.float32) / 32768.0


def samples(frames: list[av.AudioFrame]) -> np.ndarray:
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32) / 32768.0


async def test_outbound_frames_are_paced_20ms_48k_with_continuous_timestamps():
    track = OutboundAudioTrack()
    t0 = time.monotonic()
    frames = await pull(track, 26)  # the first frame anchors the clock; 25 more take 0.5 s
    elapsed = time.monotonic() - t0
    assert 0.47 <= elapsed <= 0.75, elapsed
    for frame in frames:
        assert (frame.sample_rate, frame.samples, frame.format.name, frame.layout.name) == (48000, 960, "s16", "mono")
        assert frame.time_base == fractions.Fraction(1, 48000)
    assert [f.pts for f in frames] == [i * FRAME_SAMPLES for i in range(26)]
    assert not samples(frames).any(), "an idle track sends silence"
    assert track.stats.underruns == 0 and track.stats.audio_frames == 0


async def test_outbound_resamples_tts_chunks_faithfully():
    """44.1 kHz chunks pushed as they come out of the TTS -> a clean 48 kHz tone of equal length."""
    track = OutboundAudioTrack()
    pcm = tone(440.0, 1.0, 44_100)
    for start in range(0, len(pcm), 8192):  # uneven chunk sizes, like streamed decoder output
        track.push("resp_1", pcm[start:start + 8192], 44_100)
    track.end_response("resp_1")
    assert abs(track.queued_seconds - 1.0) < 0.01
    out = samples(await pull(track, 52))
    voiced = np.flatnonzero(np.abs(out) > 0.05)
    assert abs(len(out[voiced[0]:voiced[-1]]) / OUTPUT_RATE - 1.0) < 0.01
    body = out[2000:46000]
    assert abs(dominant_frequency(body, OUTPUT_RATE) - 440.0) < 2.0
    assert abs(np.sqrt(np.mean(body ** 2)) - 0.5 / np.sqrt(2)) < 0.01
    assert track.stats.audio_frames == 50 and track.stats.underruns == 0


async def test_outbound_packets_are_opus_that_decodes_to_the_pushed_audio():
    track = OutboundAudioTrack()
    idle = [await track.recv() for _ in range(10)]
    assert track._opus.encoded < 5, "settled silence reuses its packet instead of encoding"
    track.push("resp_1", tone(440.0, 0.6, 44_100), 44_100)
    track.end_response("resp_1")
    spoken = [await track.recv() for _ in range(40)]
    packets = idle + spoken
    assert all(isinstance(p, av.Packet) for p in packets)
    assert [p.pts for p in packets] == [i * FRAME_SAMPLES for i in range(50)]
    assert all(p.time_base == fractions.Fraction(1, 48000) for p in packets)
    heard = decode_opus(packets)
    assert len(heard) == 50 * FRAME_SAMPLES
    assert np.abs(heard[:9 * FRAME_SAMPLES]).max() == 0.0, "idle silence decodes to silence"
    body = heard[12 * FRAME_SAMPLES:38 * FRAME_SAMPLES]
    assert abs(dominant_frequency(body, OUTPUT_RATE) - 440.0) < 2.0
    assert abs(np.sqrt(np.mean(body ** 2)) - 0.5 / np.sqrt(2)) < 0.02  # mono: no upmix loss
    encoded = track._opus.encoded
    tail = [await track.recv() for _ in range(10)]  # silence again: settles and stops encoding
    assert track._opus.encoded - encoded < 6
    assert np.abs(decode_opus(packets + tail)[-5 * FRAME_SAMPLES:]).max() == 0.0


async def test_outbound_reports_played_seconds_per_response():
    reports: list[tuple[str, float]] = []
    track = OutboundAudioTrack(on_played=lambda rid, s: reports.append((rid, s)))
    track.push("resp_a", tone(300.0, 0.1, 44_100), 44_100)
    track.end_response("resp_a")
    track.push("resp_b", tone(500.0, 0.1, 44_100), 44_100)
    track.end_response("resp_b")
    await pull(track, 12)
    last = dict(reports)
    assert last["resp_a"] == pytest.approx(0.1, abs=0.002)
    assert last["resp_b"] == pytest.approx(0.1, abs=0.002)
    seq_a = [s for rid, s in reports if rid == "resp_a"]
    assert seq_a == sorted(seq_a) and len(seq_a) >= 5  # reported as it goes out, frame by frame


async def test_clear_flushes_at_once_and_keeps_timestamps_running():
    track = OutboundAudioTrack()
    track.push("resp_1", tone(440.0, 2.0, 44_100), 44_100)
    before = await pull(track, 10)
    assert np.abs(samples(before)).max() > 0.4
    track.clear("resp_1")
    assert track.queued_seconds == 0.0
    assert track.stats.cleared_seconds == pytest.approx(2.0 - 10 * 0.02, abs=0.02)
    after = await pull(track, 5)
    assert np.abs(samples(after)).max() == 0.0, "nothing of the cleared response may play"
    pts = [f.pts for f in before + after]
    assert pts == [pts[0] + i * FRAME_SAMPLES for i in range(15)]
    # A new response after the flush starts at once, still on the same timeline.
    track.push("resp_2", tone(660.0, 0.2, 44_100), 44_100)
    nxt = await pull(track, 3)
    assert np.abs(samples(nxt)).max() > 0.4
    assert nxt[0].pts == pts[-1] + FRAME_SAMPLES


async def test_clear_of_one_response_keeps_the_next():
    track = OutboundAudioTrack()
    track.push("resp_1", tone(440.0, 0.5, 44_100), 44_100)
    track.end_response("resp_1")
    track.push("resp_2", tone(880.0, 0.3, 44_100), 44_100)
    track.end_response("resp_2")
    track.clear("resp_1")
    assert track.queued_seconds == pytest.approx(0.3, abs=0.01)
    out = samples(await pull(track, 14))
    assert abs(dominant_frequency(out[500:13000], OUTPUT_RATE) - 880.0) < 5.0


async def test_underruns_count_gaps_inside_a_response_only():
    track = OutboundAudioTrack()
    await pull(track, 3)  # idle silence is not an underrun
    assert track.stats.underruns == 0
    track.push("resp_1", tone(440.0, 0.1, 44_100), 44_100)  # 5 frames, then the producer is late
    await pull(track, 8)
    assert track.stats.underruns == 3
    track.end_response("resp_1")
    await pull(track, 3)
    assert track.stats.underruns == 3


async def test_stopped_track_ends_the_sender():
    track = OutboundAudioTrack()
    await track.recv()
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()
    track = OutboundAudioTrack()
    await track.next_frame()
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.next_frame()


class ToneTrack(MediaStreamTrack):
    """Frames shaped like aiortc's Opus decoder output: s16, packed stereo (or mono), 48 kHz, 960 samples."""

    kind = "audio"

    def __init__(self, pcm48k: np.ndarray, layout: str = "stereo") -> None:
        super().__init__()
        self._pcm = (pcm48k * 32767).astype(np.int16)
        self._pos = 0
        self._layout = layout

    async def recv(self) -> av.AudioFrame:
        if self._pos >= len(self._pcm):
            self.stop()
            raise MediaStreamError
        chunk = self._pcm[self._pos:self._pos + 960]
        chunk = np.pad(chunk, (0, 960 - len(chunk)))
        channels = 2 if self._layout == "stereo" else 1
        frame = av.AudioFrame.from_ndarray(np.repeat(chunk, channels).reshape(1, -1), format="s16",
                                           layout=self._layout)
        frame.sample_rate = 48_000
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, 48_000)
        self._pos += 960
        return frame


@pytest.mark.parametrize("layout", ["stereo", "mono"])
async def test_inbound_resamples_48k_to_16k_mono_float_at_the_same_level(layout):
    received: list[np.ndarray] = []

    async def sink(pcm: np.ndarray) -> None:
        assert pcm.dtype == np.float32 and pcm.ndim == 1
        received.append(pcm)

    reader = InboundAudio(ToneTrack(tone(1000.0, 1.0, 48_000, amplitude=0.4), layout), sink)
    await asyncio.wait_for(reader.run(), 5)
    out = np.concatenate(received)
    assert reader.input_format == ("s16", layout, 48_000)
    assert reader.frames == 50
    assert abs(len(out) - 16_000) <= 64
    body = out[400:15000]
    assert abs(dominant_frequency(body, 16_000) - 1000.0) < 3.0
    assert abs(np.sqrt(np.mean(body ** 2)) - 0.4 / np.sqrt(2)) < 0.01
