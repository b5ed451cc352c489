"""A faithful carrier for telephony tests and benchmarks: what Twilio (or Telnyx, or Plivo) does to
our server.

`CarrierPeer` answers a call the way the carrier does: it POSTs the voice webhook with the
carrier's form fields (signed with X-Twilio-Signature when given the auth token, by twilio's
own RequestValidator), reads the TwiML/TeXML answer, opens the <Stream> URL with aiohttp's
WebSocket client and speaks the carrier's documented message shapes exactly: `connected`,
`start` (custom parameters from the <Parameter>s), a `media` frame of 160 μ-law bytes every
20 ms on the wall clock (speech when given, else μ-law silence), `dtmf`, `stop`. What the server
sends back is checked against the documented shapes, queued, and played out in real time 20 ms
at a time; each `mark` is echoed only once the audio queued before it has been played, and
`clear` drops the queue at once (Twilio then echoes the marks it dropped, as documented).

μ-law here is the textbook G.711 algorithm in numpy, written independently of the server's
PyAV path, so the two sides check each other. Telephone-band speech comes from espeak-ng via
sox (8 kHz, band-limited to 300-3400 Hz).
"""
from __future__ import annotations

import asyncio
import base64
import collections
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any
from xml.etree import ElementTree

import aiohttp
import numpy as np
from yarl import URL

RATE = 8000
FRAME = 160  # 20 ms of 8 kHz G.711
FRAME_SECONDS = 0.02
MULAW_SILENCE = 0xFF

# --------------------------------------------------------------------------- G.711 μ-law (reference)
_BIAS, _CLIP = 0x84, 32635


def mulaw_encode(pcm: np.ndarray) -> bytes:
    """int16 -> μ-law bytes (ITU-T G.711, the classic segment/mantissa formulation)."""
    x = np.asarray(pcm, np.int32)
    sign = np.where(x < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(x), _CLIP) + _BIAS
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    exponent = np.clip(exponent, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def mulaw_decode(data: bytes) -> np.ndarray:
    """μ-law bytes -> int16."""
    u = ~np.frombuffer(data, np.uint8).astype(np.int32) & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign, -magnitude, magnitude).astype(np.int16)


def telephone_speech(pcm16k: np.ndarray) -> np.ndarray:
    """16 kHz float speech -> what a phone line carries: int16 at 8 kHz, 300-3400 Hz (sox)."""
    raw = subprocess.run(
        ["sox", "-t", "raw", "-r", "16000", "-e", "floating-point", "-b", "32", "-c", "1", "-",
         "-t", "raw", "-r", str(RATE), "-e", "signed-integer", "-b", "16", "-c", "1", "-", "sinc", "300-3400"],
        input=np.asarray(pcm16k, np.float32).tobytes(), check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.int16).copy()


# --------------------------------------------------------------------------- the carrier
class CarrierPeer:
    """One phone call as the carrier (`dialect` "twilio", "telnyx" or "plivo") places it."""

    def __init__(self, base_url: str, dialect: str = "twilio", *, auth_token: str | None = None) -> None:
        assert dialect in ("twilio", "telnyx", "plivo")
        self.base_url = base_url.rstrip("/")
        self.dialect = dialect
        self.auth_token = auth_token
        self.call_sid = {"twilio": "CA" + secrets.token_hex(16), "telnyx": f"v3:{secrets.token_urlsafe(24)}",
                         "plivo": str(uuid.uuid4())}[dialect]
        self.account_sid = "AC" + secrets.token_hex(16) if dialect == "twilio" else str(uuid.uuid4())
        self.stream_sid = ("MZ" + secrets.token_hex(16)) if dialect == "twilio" else str(uuid.uuid4())
        self.stream_url: str | None = None
        self.media_type: str | None = None  # Plivo: the <Stream contentType>
        self.parameters: dict[str, str] = {}
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._http: aiohttp.ClientSession | None = None
        self._seq = 0
        self._chunk = 0
        self._mic: collections.deque[bytes] = collections.deque()  # 160-byte frames still to send
        self._voice_left = 0  # frames up to and including the last loud one
        self.t_voice_end: float | None = None  # when the last loud caller frame was sent
        self._playout: collections.deque[tuple[str, Any]] = collections.deque()  # ("audio", bytearray) | ("mark", name)
        self.received: list[tuple[float, bytes]] = []  # media payloads from the server, by arrival
        self.played: list[tuple[float, np.ndarray]] = []  # 20 ms frames played to the caller (int16)
        self.marks_received: list[str] = []
        self.marks_echoed: list[tuple[float, str, bool]] = []  # (t, name, its audio really played)
        self.clears: list[float] = []
        self.violations: list[str] = []  # server messages off the documented shapes
        self.closed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ the voice webhook
    @property
    def webhook_path(self) -> str:
        return f"/v1/telephony/{self.dialect}/voice"

    def webhook_form(self) -> dict[str, str]:
        common = {"AccountSid": self.account_sid, "CallSid": self.call_sid, "From": "+15005550006",
                  "To": "+15005550001", "CallStatus": "ringing", "Direction": "inbound"}
        if self.dialect == "twilio":
            return {**common, "ApiVersion": "2010-04-01", "Called": "+15005550001", "Caller": "+15005550006",
                    "CallerCountry": "US", "CalledCountry": "US"}
        if self.dialect == "plivo":
            return {"CallUUID": self.call_sid, "From": "15005550006", "To": "15005550001", "Direction": "inbound",
                    "CallStatus": "in-progress", "Event": "StartApp"}
        return {**common, "CallerId": "+15005550006", "ConnectionId": "1494404757140276705"}

    async def dial(self, query: dict[str, Any] | None = None, *, signature: str | None = None,
                   form: dict[str, str] | None = None) -> tuple[int, str]:
        """POST the voice webhook; on 200 remember the stream URL and parameters of its answer."""
        from twilio.request_validator import RequestValidator

        self._http = self._http or aiohttp.ClientSession()
        url = str(URL(self.base_url + self.webhook_path).with_query(
            {k: str(v) for k, v in (query or {}).items()}))
        form = self.webhook_form() if form is None else form
        headers = {}
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        elif self.auth_token:
            headers["X-Twilio-Signature"] = RequestValidator(self.auth_token).compute_signature(url, form)
        async with self._http.post(url, data=form, headers=headers) as resp:
            body = await resp.text()
            if resp.status == 200:
                root = ElementTree.fromstring(body)
                if self.dialect == "plivo":  # <Response><Stream bidirectional="true" ...>wss://...</Stream>
                    stream = root.find("./Stream")
                    assert stream is not None and stream.get("bidirectional") == "true", body
                    self.stream_url = (stream.text or "").strip()
                    self.media_type = stream.get("contentType")
                else:
                    stream = root.find("./Connect/Stream")
                    assert stream is not None, body
                    self.stream_url = stream.get("url")
                    self.parameters = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
            return resp.status, body

    # ------------------------------------------------------------------ the media stream
    async def connect(self, *, start_overrides: dict[str, Any] | None = None) -> None:
        assert self.stream_url, "dial() first"
        self._http = self._http or aiohttp.ClientSession()
        self.ws = await self._http.ws_connect(self.stream_url)
        if self.dialect != "plivo":  # Plivo starts with `start`
            await self._send(self._connected())
        await self._send(self._start(start_overrides or {}))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run_mic()), loop.create_task(self._receive()),
                       loop.create_task(self._run_player())]

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    def _connected(self) -> dict[str, Any]:
        if self.dialect == "twilio":
            return {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        return {"event": "connected", "version": "1.0.0"}

    def _start(self, overrides: dict[str, Any]) -> dict[str, Any]:
        if self.dialect == "plivo":
            start = {"callId": self.call_sid, "streamId": self.stream_sid, "accountId": self.account_sid,
                     "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}
            self._seq -= 1  # Plivo counts from 0
            return {"event": "start", "sequenceNumber": int(self._next_seq()), "start": {**start, **overrides},
                    "extra_headers": ""}
        if self.dialect == "twilio":
            start = {"accountSid": self.account_sid, "streamSid": self.stream_sid, "callSid": self.call_sid,
                     "tracks": ["inbound"], "customParameters": dict(self.parameters),
                     "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}
            return {"event": "start", "sequenceNumber": self._next_seq(), "start": {**start, **overrides},
                    "streamSid": self.stream_sid}
        start = {"user_id": self.account_sid, "call_control_id": self.call_sid, "client_state": None,
                 "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}
        return {"event": "start", "sequence_number": self._next_seq(), "start": {**start, **overrides},
                "stream_id": self.stream_sid}

    def _media(self, frame: bytes) -> dict[str, Any]:
        self._chunk += 1
        media = {"track": "inbound", "chunk": str(self._chunk), "timestamp": str(self._chunk * 20),
                 "payload": base64.b64encode(frame).decode()}
        if self.dialect == "twilio":
            return {"event": "media", "sequenceNumber": self._next_seq(), "media": media, "streamSid": self.stream_sid}
        if self.dialect == "plivo":
            media["chunk"] = self._chunk
            return {"event": "media", "sequenceNumber": int(self._next_seq()), "streamId": self.stream_sid,
                    "media": media, "extra_headers": ""}
        return {"event": "media", "sequence_number": self._next_seq(), "media": media, "stream_id": self.stream_sid}

    def _mark_echo(self, name: str) -> dict[str, Any]:
        if self.dialect == "plivo":
            return {"event": "playedStream", "streamId": self.stream_sid, "name": name}
        if self.dialect == "twilio":
            return {"event": "mark", "sequenceNumber": self._next_seq(), "streamSid": self.stream_sid,
                    "mark": {"name": name}}
        return {"event": "mark", "sequence_number": self._next_seq(), "stream_id": self.stream_sid,
                "mark": {"name": name}}

    async def _send(self, message: dict[str, Any] | str) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    def say(self, pcm8k: np.ndarray, level: float = 0.01) -> None:
        """Queue int16 8 kHz speech on the caller's line (sent as μ-law, 20 ms per message)."""
        data = mulaw_encode(pcm8k)
        data += bytes([MULAW_SILENCE]) * (-len(data) % FRAME)
        loud = np.flatnonzero(np.abs(pcm8k.astype(np.int32)) > level * 32767)
        if loud.size:
            self._voice_left = len(self._mic) + int(loud[-1]) // FRAME + 1
            self.t_voice_end = None
        self._mic.extend(data[i:i + FRAME] for i in range(0, len(data), FRAME))

    async def voice_ended(self, timeout: float = 30.0) -> float:
        """Wait until the last loud frame of what was said went out; its send time."""
        deadline = time.monotonic() + timeout
        while self.t_voice_end is None:
            assert time.monotonic() < deadline, "the caller's speech never went out"
            await asyncio.sleep(0.02)
        return self.t_voice_end

    async def dtmf(self, digit: str) -> None:
        if self.dialect == "plivo":
            await self._send({"event": "dtmf", "sequenceNumber": int(self._next_seq()), "streamId": self.stream_sid,
                              "dtmf": {"track": "inbound", "digit": digit}})
        elif self.dialect == "twilio":
            await self._send({"event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": self._next_seq(),
                              "dtmf": {"track": "inbound_track", "digit": digit}})
        else:
            await self._send({"event": "dtmf", "stream_id": self.stream_sid, "occurred_at": "2026-12-06T22:00:00Z",
                              "sequence_number": self._next_seq(), "dtmf": {"digit": digit}})

    async def send_raw(self, text: str) -> None:
        await self._send(text)

    async def stop(self) -> None:
        """The caller hangs up: `stop`, then the carrier closes the socket (Plivo just closes it)."""
        if self.dialect == "plivo":
            pass
        elif self.dialect == "twilio":
            await self._send({"event": "stop", "sequenceNumber": self._next_seq(), "streamSid": self.stream_sid,
                              "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
        else:
            await self._send({"event": "stop", "sequence_number": self._next_seq(), "stream_id": self.stream_sid,
                              "stop": {"user_id": self.account_sid, "call_control_id": self.call_sid}})
        await self.close()

    async def go_silent(self) -> None:
        """The carrier stops sending anything, without a goodbye (the socket stays open)."""
        for task in self._tasks[:1]:
            task.cancel()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.ws is not None:
            await self.ws.close()
        if self._http is not None:
            await self._http.close()
        self.closed.set()

    # ------------------------------------------------------------------ carrier internals
    async def _run_mic(self) -> None:
        """A media frame every 20 ms on the wall clock, as long as the call lasts."""
        t0 = time.monotonic()
        n = 0
        while True:
            frame = self._mic.popleft() if self._mic else bytes([MULAW_SILENCE]) * FRAME
            await self._send(self._media(frame))
            if self._voice_left:
                self._voice_left -= 1
                if self._voice_left == 0:
                    self.t_voice_end = time.monotonic()
            n += 1
            await asyncio.sleep(max(0.0, t0 + n * FRAME_SECONDS - time.monotonic()))

    async def _receive(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                self.violations.append(f"non-text message {message.type}")
                continue
            try:
                data = json.loads(message.data)
            except ValueError:
                self.violations.append(f"not JSON: {message.data[:80]!r}")
                continue
            self._check_shape(data)
            event = {"playAudio": "media", "checkpoint": "mark", "clearAudio": "clear"}.get(data.get("event"),
                                                                                          data.get("event"))
            if event == "media":
                payload = base64.b64decode(data["media"]["payload"])
                self.received.append((time.monotonic(), payload))
                self._playout.append(("audio", bytearray(payload)))
            elif event == "mark":
                name = data["name"] if self.dialect == "plivo" else data["mark"]["name"]
                self.marks_received.append(name)
                self._playout.append(("mark", name))
            elif event == "clear":
                self.clears.append(time.monotonic())
                dropped = [item for kind, item in self._playout if kind == "mark"]
                self._playout.clear()
                if self.dialect == "twilio":  # Twilio echoes the marks a clear dropped
                    for name in dropped:
                        self.marks_echoed.append((time.monotonic(), name, False))
                        await self._send(self._mark_echo(name))
                elif self.dialect == "plivo":  # Plivo confirms the clear instead
                    await self._send({"event": "clearedAudio", "sequenceNumber": int(self._next_seq()),
                                      "streamId": self.stream_sid})
        self.closed.set()

    def _check_shape(self, data: dict[str, Any]) -> None:
        event = data.get("event")
        if self.dialect == "twilio":
            expected = {"media": {"event", "streamSid", "media"}, "mark": {"event", "streamSid", "mark"},
                        "clear": {"event", "streamSid"}}
            if data.get("streamSid") != self.stream_sid:
                self.violations.append(f"{event}: wrong streamSid {data.get('streamSid')!r}")
        elif self.dialect == "plivo":
            expected = {"playAudio": {"event", "streamId", "media"}, "checkpoint": {"event", "streamId", "name"},
                        "clearAudio": {"event", "streamId"}}
            if data.get("streamId") != self.stream_sid:
                self.violations.append(f"{event}: wrong streamId {data.get('streamId')!r}")
            if event == "playAudio" and isinstance(data.get("media"), dict) and (
                    data["media"].get("contentType") != "audio/x-mulaw" or data["media"].get("sampleRate") != 8000):
                self.violations.append(f"playAudio media format {data['media']}")
        else:
            expected = {"media": {"event", "media"}, "mark": {"event", "mark"}, "clear": {"event"}}
        if event not in expected:
            self.violations.append(f"unknown event {event!r}")
            return
        if set(data) != expected[event]:
            self.violations.append(f"{event}: fields {sorted(data)} (documented: {sorted(expected[event])})")
        if event in ("media", "playAudio"):
            payload = data["media"].get("payload") if isinstance(data["media"], dict) else None
            try:
                raw = base64.b64decode(payload or "", validate=True)
            except ValueError:
                self.violations.append("media payload is not base64")
                return
            if not raw or len(raw) % FRAME:
                self.violations.append(f"media payload of {len(raw)} bytes is not whole 20 ms frames")
        if event == "checkpoint" and not isinstance(data.get("name"), str):
            self.violations.append(f"checkpoint without a name: {data}")
        if event == "mark" and not (isinstance(data["mark"], dict) and isinstance(data["mark"].get("name"), str)):
            self.violations.append(f"mark without a name: {data}")

    async def _run_player(self) -> None:
        """Play queued audio 20 ms per 20 ms; echo each mark once the audio before it has played."""
        t0 = time.monotonic()
        n = 0
        while True:
            await self._echo_ready_marks()
            frame = bytearray()
            while len(frame) < FRAME and self._playout and self._playout[0][0] == "audio":
                audio = self._playout[0][1]
                take = min(FRAME - len(frame), len(audio))
                frame += audio[:take]
                del audio[:take]
                if not audio:
                    self._playout.popleft()
            if frame:
                self.played.append((time.monotonic(), mulaw_decode(bytes(frame))))
            n += 1
            await asyncio.sleep(max(0.0, t0 + n * FRAME_SECONDS - time.monotonic()))

    async def _echo_ready_marks(self) -> None:
        while self._playout and self._playout[0][0] == "mark":
            name = self._playout.popleft()[1]
            self.marks_echoed.append((time.monotonic(), name, True))
            await self._send(self._mark_echo(name))

    # ------------------------------------------------------------------ what the caller heard
    def heard(self, after: float = 0.0, before: float = float("inf")) -> np.ndarray:
        parts = [pcm for t, pcm in self.played if after <= t < before]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def first_audible(self, after: float = 0.0, level: float = 0.003) -> float | None:
        for t, pcm in self.played:
            if t >= after and np.sqrt(np.mean((pcm / 32768.0) ** 2)) > level:
                return t
        return None

    def first_media(self, after: float = 0.0) -> float | None:
        return next((t for t, _ in self.received if t >= after), None)

    def played_seconds(self, before: float = float("inf")) -> float:
        return sum(len(pcm) for t, pcm in self.played if t < before) / RATE


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ the server's side of a test call
def phone_line(text: str, lead: float = 0.3, tail: float = 0.9) -> np.ndarray:
    """Telephone-band espeak-ng speech of `text` between silences, ready for `CarrierPeer.say`."""
    import speechkit  # the tests' espeak-ng helper (only the tests speak whole sentences)

    pcm, _ = speechkit.speech_with_gaps([lead, text, tail])
    return telephone_speech(pcm)


def phone_call(server, peer: CarrierPeer):
    """The server's session for `peer`'s call (a test `LocalServer`), once it has started."""
    return next((c for c in server.calls.values() if getattr(c, "start", None) is not None
                 and c.start.call_id == peer.call_sid), None)


def of_type(call, kind):
    return [e for e in call.events if isinstance(e, kind)]


async def wait_event(call, kind, predicate=lambda e: True, timeout: float = 30.0):
    """The first event of `kind` (matching `predicate`) the call's conversation emitted."""
    try:
        await wait_until(lambda: any(predicate(e) for e in of_type(call, kind)), timeout, kind.__name__)
    except AssertionError as exc:
        seen = [type(e).__name__ for e in call.events if type(e).__name__ != "ResponseTextDelta"]
        raise AssertionError(f"{exc}; call closed: {call.close_reason}; events: {seen[-15:]}") from None
    return next(e for e in of_type(call, kind) if predicate(e))
