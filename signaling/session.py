"""One WebRTC call: its RTCPeerConnection, conversation, tracks, data channel and lifetime.

`CallRegistry` admits calls up to a limit and closes them all at shutdown. `PeerCall` answers an
SDP offer (non-trickle: aiortc gathers every candidate inside setLocalDescription), then runs
three tasks: the output pump (conversation -> track and data channel), the client-event handler,
and a liveness watchdog. aiortc never reports a peer that simply vanished, so the watchdog reads
the transport's received-packet counter (RTP, RTCP, SCTP, keepalive pings all count) and ends
the call after a few seconds without any. Closing cancels every task, stops the model work of
the conversation, stops the tracks and closes the peer connection.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.exceptions import InvalidAccessError, InvalidStateError, OperationError
from aiortc.rtcdatachannel import RTCDataChannel

from engine.agent.conversation import ConversationSession
from engine.agent.conversation_types import AudioClear, AudioOut, PipelineEvent
from signaling import events as ev
from signaling.configure import apply_options, build_conversation
from signaling.errors import CallError
from signaling.ice import ice_configuration
from signaling.options import OptionsError, SessionOptions, describe, from_session, resolve_voice, sampling_options
from signaling.tracks import InboundAudio, OutboundAudioTrack

log = logging.getLogger(__name__)

MAX_PENDING_EVENTS = 200  # server events kept until the data channel opens
MAX_OFFER_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class CallLimits:
    liveness_timeout: float = 6.0  # seconds without a packet from the peer -> gone
    connect_timeout: float = 20.0  # seconds from the answer to an established connection
    check_interval: float = 0.5
    max_call_seconds: float | None = None


def check_offer(sdp: str) -> None:
    """Clear 400s for offers we cannot answer, before any WebRTC machinery starts."""
    if not sdp or not sdp.strip():
        raise CallError(400, "invalid_offer", "the request body must be an SDP offer")
    if len(sdp) > MAX_OFFER_BYTES:
        raise CallError(413, "offer_too_large", f"SDP offers are limited to {MAX_OFFER_BYTES} bytes")
    if not sdp.lstrip().startswith("v=0"):
        raise CallError(400, "invalid_offer", "the body is not an SDP offer (it must start with v=0)")
    if "\nm=audio " not in sdp.replace("\r\n", "\n"):
        raise CallError(400, "no_audio", "the offer has no audio m-line: add a microphone track or an audio "
                                         "transceiver (the agent talks over audio)")
    if "opus/48000" not in sdp.lower():
        raise CallError(400, "no_opus", "the offer's audio does not include Opus (opus/48000/2)")


class CallRegistry:
    """Live calls by id, with a limit on how many run at once."""

    def __init__(self, max_calls: int) -> None:
        self.max_calls = max_calls
        self.calls: dict[str, PeerCall] = {}
        self._reserved = 0

    @property
    def active(self) -> int:
        return len(self.calls) + self._reserved

    @contextlib.asynccontextmanager
    async def reserve(self):
        """Hold a slot while a call is being set up (so concurrent offers cannot overshoot)."""
        if self.active >= self.max_calls:
            raise CallError(503, "too_many_sessions",
                            f"the server is at its limit of {self.max_calls} concurrent calls; try again later")
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    def add(self, call: PeerCall) -> None:
        self.calls[call.id] = call

    def discard(self, call: PeerCall) -> None:
        if self.calls.get(call.id) is call:
            del self.calls[call.id]

    async def close_all(self) -> None:
        await asyncio.gather(*(call.close("server_shutdown") for call in list(self.calls.values())),
                             return_exceptions=True)


class PeerCall:
    """A call from offer to hang-up. Create with `PeerCall.start(...)`."""

    def __init__(self, *, services: Any, settings: Any, registry: CallRegistry, limits: CallLimits,
                 conversation: ConversationSession, options: SessionOptions) -> None:
        self.id = "rtc_" + secrets.token_hex(12)
        self.services = services
        self.settings = settings
        self.registry = registry
        self.limits = limits
        self.conversation = conversation
        self.voice_id = options.voice_id
        self.t0 = time.monotonic()
        self.events = ev.ServerEvents(self.t0)
        self.pc = RTCPeerConnection(ice_configuration(getattr(settings, "ice_servers", None)))
        self.outbound = OutboundAudioTrack(on_played=self._on_played)
        self.inbound: list[InboundAudio] = []
        self.channel: RTCDataChannel | None = None
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self._pending: list[str] = []
        self._client_events: asyncio.Queue[str | bytes] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._close_task: asyncio.Task | None = None
        self._pending_text: list[str] = []  # TTS mode: typed items waiting for response.create
        self.packets_received = 0
        self.t_last_packet = self.t0
        self.t_connected: float | None = None

    # ------------------------------------------------------------------ set-up
    @classmethod
    async def start(cls, offer_sdp: str, *, services: Any, settings: Any, registry: CallRegistry,
                    options: SessionOptions, limits: CallLimits = CallLimits()) -> PeerCall:
        """Answer `offer_sdp`; the returned call is registered and running (see `answer`)."""
        check_offer(offer_sdp)
        conversation = await build_conversation(services, settings, options)
        call = cls(services=services, settings=settings, registry=registry, limits=limits,
                   conversation=conversation, options=options)
        try:
            await call._negotiate(offer_sdp)
        except BaseException:
            await call._teardown()
            raise
        registry.add(call)
        call._spawn(call._pump_outputs(), "pump")
        call._spawn(call._handle_client_events(), "client-events")
        call._spawn(call._watch_liveness(), "liveness")
        return call

    @property
    def answer(self) -> str:
        return self.pc.localDescription.sdp

    async def _negotiate(self, offer_sdp: str) -> None:
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        # Our transceiver exists before the offer is applied, so its Opus-only preference shapes
        # the negotiation (aiortc picks codecs inside setRemoteDescription).
        transceiver = pc.addTransceiver(self.outbound, direction="sendrecv")
        transceiver.setCodecPreferences(
            [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"])
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except (ValueError, TypeError, OperationError, InvalidAccessError) as exc:
            raise CallError(400, "invalid_offer", f"the SDP offer could not be applied: {exc}") from None
        if transceiver.mid is None:
            raise CallError(400, "no_audio", "the offer has no usable audio section")
        for other in pc.getTransceivers():
            if other is not transceiver:
                other.direction = "inactive"  # one audio stream per call; extra sections are refused
        try:
            await pc.setLocalDescription(await pc.createAnswer())
        except (ValueError, OperationError, InvalidStateError) as exc:
            raise CallError(400, "negotiation_failed", f"no answer can be made for this offer: {exc}") from None

    # ------------------------------------------------------------------ aiortc callbacks
    def _on_track(self, track) -> None:
        if track.kind != "audio":
            return
        reader = InboundAudio(track, self._push_audio)
        self.inbound.append(reader)
        self._spawn(reader.run(), "inbound")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != ev.CHANNEL_LABEL or self.channel is not None:
            log.info("call %s: ignoring data channel %r", self.id, channel.label)
            return
        self.channel = channel
        channel.on("message", self._client_events.put_nowait)
        if channel.readyState == "open":
            self._on_channel_open()
        else:
            channel.on("open", self._on_channel_open)

    def _on_channel_open(self) -> None:
        self._send_now(self.events.build("session.created", {"session": self.describe(), "call_id": self.id},
                                         t=time.monotonic()))
        pending, self._pending = self._pending, []
        for message in pending:
            self.channel.send(message)  # type: ignore[union-attr]

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.t_connected is None:
            self.t_connected = time.monotonic()
        if state in ("failed", "closed"):
            self.request_close(f"connection_{state}")

    def _on_played(self, response_id: str, seconds: float) -> None:
        self.conversation.mark_played(response_id, seconds)

    async def _push_audio(self, pcm) -> None:
        with contextlib.suppress(RuntimeError):  # the conversation closed under us: the call is ending
            await self.conversation.push_audio(pcm)

    # ------------------------------------------------------------------ the running call
    async def _pump_outputs(self) -> None:
        """Conversation outputs -> audio track (audio, clears) and data channel (events)."""
        async for item in self.conversation.outputs():
            if isinstance(item, AudioOut):
                self.outbound.push(item.response_id, item.pcm, item.sample_rate)
            elif isinstance(item, AudioClear):
                self.outbound.clear(item.response_id)
            elif isinstance(item, PipelineEvent):
                if item.type == "response.done" and item.response_id:
                    self.outbound.end_response(item.response_id)
                self.send(self.events.build(item.type, item.data, response_id=item.response_id, t=item.t))

    async def _handle_client_events(self) -> None:
        while True:
            message = await self._client_events.get()
            if ev.is_keepalive(message):
                continue
            try:
                event = ev.parse_client_event(message)
            except ev.ProtocolError as exc:
                self.send(self.events.error(exc.code, str(exc), event_id=exc.event_id, param=exc.param,
                                            t=time.monotonic()))
                continue
            try:
                await self._dispatch(event)
            except OptionsError as exc:
                self.send(self.events.error("invalid_value", str(exc), param=exc.param, event_id=event.event_id,
                                            t=time.monotonic()))
            except ValueError as exc:  # the conversation refused it (empty text, agent mode without LLM, ...)
                self.send(self.events.error("invalid_request", str(exc), event_id=event.event_id,
                                            t=time.monotonic()))
            except RuntimeError as exc:  # the conversation is closing
                log.info("call %s: client event after close: %s", self.id, exc)

    async def _dispatch(self, event: Any) -> None:
        conv = self.conversation
        if isinstance(event, ev.SessionUpdate):
            options = from_session(event.session, conv.turn_detection)
            await apply_options(conv, options, self.services)
            if options.voice_id is not None:
                self.voice_id = options.voice_id
            self.send(self.events.build("session.updated", {"session": self.describe()}, t=time.monotonic()))
        elif isinstance(event, ev.ConversationItemCreate):
            text = event.item.text()
            if event.item.role != "user":
                raise ValueError("only user messages can be added (conversation.item.create role 'user')")
            if not text:
                raise ValueError("conversation.item.create needs a message with input_text content")
            if conv.mode == "tts":
                self._pending_text.append(text)
            else:
                await conv.send_text(text, respond=False)
            self.send(self.events.build("conversation.item.added", {"item": {
                "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_text", "text": text}]}}, t=time.monotonic()))
        elif isinstance(event, ev.ResponseCreate):
            if conv.mode == "tts":
                if not self._pending_text:
                    raise ValueError("in TTS mode, response.create speaks the text of conversation.item.create "
                                     "events; send one first (or use tts.request)")
                text, self._pending_text = " ".join(self._pending_text), []
                await conv.speak(text)
            else:
                await conv.create_response()
        elif isinstance(event, ev.ResponseCancel):
            await conv.cancel_response()
        elif isinstance(event, ev.OutputAudioBufferClear):
            await conv.cancel_response()
            self.outbound.clear(None)
        elif isinstance(event, ev.InputAudioBufferClear):
            conv.clear_audio()
        elif isinstance(event, ev.InputAudioBufferCommit):
            await conv.commit_audio()
        elif isinstance(event, ev.TTSRequestEvent):
            voice = await resolve_voice(self.services, event.voice) if event.voice else None
            sampling = sampling_options(conv.sampling, event.merged_sampling().model_dump())
            await conv.speak(event.text, sampling=sampling, voice=voice)

    async def _watch_liveness(self) -> None:
        """End the call when the peer vanished, never connected, or overstayed."""
        limits = self.limits
        while True:
            await asyncio.sleep(limits.check_interval)
            now = time.monotonic()
            if limits.max_call_seconds is not None and now - self.t0 > limits.max_call_seconds:
                self.request_close("max_duration")
                return
            if self.t_connected is None:
                if now - self.t0 > limits.connect_timeout:
                    self.request_close("connect_timeout")
                    return
                continue
            received = await self._transport_packets_received()
            if received != self.packets_received:
                self.packets_received = received
                self.t_last_packet = now
            elif now - max(self.t_last_packet, self.t_connected) > limits.liveness_timeout:
                log.info("call %s: no packets from the peer for %.1f s; ending it", self.id, now - self.t_last_packet)
                self.request_close("peer_gone")
                return

    async def _transport_packets_received(self) -> int:
        report = await self.pc.getStats()
        return sum(getattr(s, "packetsReceived", 0) or 0 for s in report.values() if s.type == "transport")

    # ------------------------------------------------------------------ data channel out
    def send(self, event: dict[str, Any]) -> None:
        for part in ev.split_event(event):
            message = ev.encode(part)
            channel = self.channel
            if channel is not None and channel.readyState == "open":
                channel.send(message)
            elif channel is None or channel.readyState == "connecting":
                if len(self._pending) < MAX_PENDING_EVENTS:
                    self._pending.append(message)

    def _send_now(self, event: dict[str, Any]) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(ev.encode(event))

    def describe(self) -> dict[str, Any]:
        conv = self.conversation
        return describe(conv.mode, self.voice_id, conv.instructions, conv.turn_detection, conv.sampling)

    def stats(self) -> dict[str, Any]:
        return {"call_id": self.id, "connection_state": self.pc.connectionState,
                "packets_received": self.packets_received,
                "inbound_frames": sum(r.frames for r in self.inbound),
                "outbound": dataclasses.asdict(self.outbound.stats)}

    # ------------------------------------------------------------------ ending
    def request_close(self, reason: str) -> None:
        """Close from a callback or from inside one of the call's own tasks."""
        if self._close_task is None and not self.closed.is_set():
            self._close_task = asyncio.get_running_loop().create_task(self.close(reason))

    async def close(self, reason: str = "hangup") -> None:
        """Idempotent; returns once everything of the call is stopped."""
        if self.close_reason is not None:
            await self.closed.wait()
            return
        self.close_reason = reason
        log.info("call %s closing: %s", self.id, reason)
        try:
            await self._teardown()
        finally:
            self.registry.discard(self)
            self.closed.set()

    async def _teardown(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.conversation.close()  # cancels LLM/TTS work of this call
        self.outbound.stop()
        for reader in self.inbound:
            reader.track.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("call %s: task %s failed", self.id, task.get_name(), exc_info=task.exception())
        self.send(self.events.error("internal_error", f"internal error: {task.exception()}",
                                    type_="server_error", t=time.monotonic()))
        self.request_close("internal_error")


