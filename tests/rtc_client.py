"""A real aiortc client for realtime calls, for tests and benchmarks.

`RealtimeClient` does what a browser does: sends a microphone track (`SpeechSource`, which plays
PCM you give it and silence otherwise, paced like a real microphone), opens the `oai-events`
data channel, POSTs the SDP offer, and records every server event and every received audio
frame with its arrival time (`AudioSink`). `force_loopback_ice()` keeps ICE on 127.0.0.1.

Run as a script it makes one call and stays in it until killed, printing events as JSON lines;
tests use that to make a peer vanish (SIGKILL) without a goodbye.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import aioice.ice
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

RATE = 48_000
FRAME = 960  # 20 ms
_TIME_BASE = fractions.Fraction(1, RATE)


def force_loopback_ice() -> Callable[[], None]:
    """Make aioice offer only 127.0.0.1 (it skips loopback by default). Returns an undo function."""
    original = aioice.ice.get_host_addresses

    def loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = loopback

    def undo() -> None:
        aioice.ice.get_host_addresses = original

    return undo


def to_48k(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 at `rate` -> int16 at 48 kHz (PyAV's resampler, flushed)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    frame = av.AudioFrame.from_ndarray(np.asarray(pcm, np.float32).reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame) + resampler.resample(None)]
    return np.concatenate(out) if out else np.zeros(0, np.int16)


class SpeechSource(MediaStreamTrack):
    """A fake microphone: queued speech, else silence, in real-time 20 ms frames, handed to aiortc
    as Opus packets encoded here (as a browser's native encoder would: aiortc's own path costs
    several times more CPU per frame, which on one machine is taken from the server measured)."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        from signaling.tracks import OpusFrames  # the server's encoder; imported late: the CLI starts fast

        self._opus = OpusFrames()
        self._pending = np.zeros(0, np.int16)
        self._start: float | None = None
        self._pts = 0
        self.t_speech_end: float | None = None  # monotonic time the last queued sample went out
        self.t_voice_end: float | None = None  # ... and the last loud one (the end of the words)
        self._voice_left = 0  # samples still to send up to and including the last loud one
        self._drained = asyncio.Event()
        self._drained.set()

    def play(self, pcm: np.ndarray, rate: int = 16_000, level: float = 0.01) -> None:
        audio = to_48k(pcm, rate)
        loud = np.flatnonzero(np.abs(audio) > level * 32767)
        if loud.size:
            self._voice_left = self._pending.size + int(loud[-1]) + 1
        self._pending = np.concatenate([self._pending, audio])
        self.t_speech_end = self.t_voice_end = None
        self._drained.clear()

    async def played(self) -> float:
        """Wait until everything queued went out; returns when the last *loud* sample did
        (the end of speech as a listener would mark it, not the end of trailing silence)."""
        await self._drained.wait()
        assert self.t_speech_end is not None
        return self.t_voice_end if self.t_voice_end is not None else self.t_speech_end

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += FRAME
            wait = self._start + self._pts / RATE - now
            if wait > 0:
                await asyncio.sleep(wait)
        chunk = np.zeros(FRAME, np.int16)
        if 0 < self._voice_left <= FRAME:
            self.t_voice_end = time.monotonic() + self._voice_left / RATE
        self._voice_left = max(0, self._voice_left - FRAME)
        if self._pending.size:
            n = min(FRAME, self._pending.size)
            chunk[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            if not self._pending.size:
                self.t_speech_end = time.monotonic()
                self._drained.set()
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = _TIME_BASE
        return self._opus.encode(frame, chunk)


class AudioSink:
    """Reads the server's track: 16 kHz mono float32 plus per-frame arrival times and RMS."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.track = track
        self._resampler: av.AudioResampler | None = None
        self._layout: str | None = None
        self.chunks: list[np.ndarray] = []
        self.arrivals: list[float] = []  # monotonic time of each 20 ms frame
        self.rms: list[float] = []
        self.formats: set[tuple[str, str, int]] = set()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            self.formats.add((frame.format.name, frame.layout.name, frame.sample_rate))
            if frame.layout.name != self._layout:  # average the channels (no +3 dB downmix)
                self._layout = frame.layout.name
                self._resampler = av.AudioResampler(format="fltp", layout=self._layout, rate=16_000)
            parts = [f.to_ndarray().mean(axis=0, dtype=np.float32) for f in self._resampler.resample(frame)]
            pcm = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            self.arrivals.append(time.monotonic())
            self.rms.append(float(np.sqrt(np.mean(pcm ** 2))) if pcm.size else 0.0)
            self.chunks.append(pcm)

    def first_audible(self, after: float = 0.0, level: float = 0.003) -> float | None:
        """Arrival time of the first frame after `after` whose RMS exceeds `level`."""
        for t, rms in zip(self.arrivals, self.rms):
            if t >= after and rms > level:
                return t
        return None

    def last_audible(self, level: float = 0.003) -> float | None:
        for t, rms in zip(reversed(self.arrivals), reversed(self.rms)):
            if rms > level:
                return t
        return None

    def pcm(self, after: float = 0.0, before: float = float("inf")) -> np.ndarray:
        parts = [c for t, c in zip(self.arrivals, self.chunks) if after <= t < before]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def audible_seconds(self, after: float = 0.0, before: float = float("inf"), level: float = 0.003) -> float:
        return 0.02 * sum(1 for t, r in zip(self.arrivals, self.rms) if after <= t < before and r > level)


class LocalServer:
    """An aiohttp app with the realtime routes on 127.0.0.1 (an ephemeral port), in this loop."""

    def __init__(self, services: Any, *, rtc_liveness_timeout: float = 2.0, **config: Any) -> None:
        from signaling import CallLimits, RealtimeConfig

        config.setdefault("max_sessions", 4)
        self.config = RealtimeConfig(limits=CallLimits(liveness_timeout=rtc_liveness_timeout), **config)
        self.services = services
        self.runner: Any = None
        self.base_url = ""

    async def start(self) -> LocalServer:
        from aiohttp import web

        import signaling

        app = web.Application()
        signaling.install(app, services=self.services, config=self.config)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    @property
    def app(self) -> Any:
        return self.runner.app

    @property
    def calls(self) -> dict[str, Any]:
        from signaling.routes import CALLS

        return self.app[CALLS].calls

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class RealtimeClient:
    """One call against a server's /v1/realtime/calls."""

    def __init__(self, base_url: str, *, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # never a public STUN server
        self.mic = SpeechSource()
        self.sink: AudioSink | None = None
        self.events: list[dict[str, Any]] = []  # each with "_t": monotonic arrival time
        self.location: str | None = None
        self.answer_sdp: str | None = None
        self.t_answer: float | None = None
        self._new_event = asyncio.Condition()
        self._channel_open = asyncio.Event()
        self._track_ready = asyncio.Event()
        self.channel = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def call_id(self) -> str | None:
        return self.location.rsplit("/", 1)[-1] if self.location else None

    async def connect(self, *, query: dict[str, Any] | None = None, session: dict[str, Any] | None = None,
                      timeout: float = 15.0) -> None:
        """Offer, answer, then wait until the data channel is open and the server's track arrived."""
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("oai-events")
        self.channel.on("open", self._channel_open.set)
        self.channel.on("message", self._on_message)

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and self.sink is None:
                self.sink = AudioSink(track)
                self._track_ready.set()

        await self.pc.setLocalDescription(await self.pc.createOffer())
        status, text, headers = await self.post_offer(self.pc.localDescription.sdp, query=query, session=session)
        if status != 201:
            raise RuntimeError(f"offer refused: HTTP {status}: {text}")
        self.location = headers.get("Location")
        self.answer_sdp = text
        self.t_answer = time.monotonic()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
        await asyncio.wait_for(asyncio.gather(self._channel_open.wait(), self._track_ready.wait()), timeout)

    async def post_offer(self, sdp: str, *, query: dict[str, Any] | None = None,
                         session: dict[str, Any] | None = None) -> tuple[int, str, dict[str, str]]:
        params = {k: str(v) for k, v in (query or {}).items()}
        async with aiohttp.ClientSession() as http:
            if session is None:
                kwargs: dict[str, Any] = {"data": sdp, "headers": {**self.headers, "Content-Type": "application/sdp"}}
            else:
                form = aiohttp.FormData(default_to_multipart=True)
                form.add_field("sdp", sdp)
                form.add_field("session", json.dumps(session))
                kwargs = {"data": form, "headers": self.headers}
            async with http.post(f"{self.base_url}/v1/realtime/calls", params=params, **kwargs) as resp:
                return resp.status, await resp.text(), dict(resp.headers)

    def _on_message(self, message: str | bytes) -> None:
        event = json.loads(message)
        event["_t"] = time.monotonic()
        self.events.append(event)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._new_event:
            self._new_event.notify_all()

    def send(self, event: dict[str, Any]) -> None:
        self.channel.send(json.dumps(event))

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]

    async def wait_for(self, type_: str, predicate: Callable[[dict], bool] | None = None, *,
                       timeout: float = 20.0, after: int = 0) -> dict[str, Any]:
        """The first event of `type_` (from index `after` on) that satisfies `predicate`."""

        def found() -> dict[str, Any] | None:
            for event in self.events[after:]:
                if event["type"] == type_ and (predicate is None or predicate(event)):
                    return event
            return None

        async def wait() -> dict[str, Any]:
            async with self._new_event:
                await self._new_event.wait_for(lambda: found() is not None)
            return found()  # type: ignore[return-value]

        try:
            return await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            seen = [e["type"] for e in self.events[after:]]
            raise AssertionError(f"no {type_} event within {timeout} s; saw {seen}") from None

    async def hang_up(self) -> int | None:
        """DELETE the call (if it was made), then close our side. Returns the DELETE status."""
        status = None
        if self.location:
            async with aiohttp.ClientSession() as http:
                async with http.delete(self.base_url + self.location, headers=self.headers) as resp:
                    status = resp.status
        await self.close()
        return status

    async def close(self) -> None:
        if self.sink is not None:
            self.sink.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sink.task
        await self.pc.close()


async def _main() -> None:
    parser = argparse.ArgumentParser(description="Make one realtime call and stay in it (prints events).")
    parser.add_argument("base_url")
    parser.add_argument("--loopback", action="store_true", help="offer only 127.0.0.1 ICE candidates")
    parser.add_argument("--query", default="", help="query string for the call, e.g. mode=tts")
    args = parser.parse_args()
    if args.loopback:
        force_loopback_ice()
    client = RealtimeClient(args.base_url)
    query = dict(p.split("=", 1) for p in args.query.split("&") if "=" in p)
    await client.connect(query=query)
    print(json.dumps({"type": "client.connected", "location": client.location}), flush=True)
    shown = 0
    while True:
        await asyncio.sleep(0.2)
        for event in client.events[shown:]:
            print(json.dumps({k: v for k, v in event.items() if k != "_t"}), flush=True)
        shown = len(client.events)


if __name__ == "__main__":
    try:
        asyncio.run(_main())
    except KeyboardInterrupt:
        sys.exit(0)
