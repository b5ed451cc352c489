"""One WebRTC call: its RTCPeerConnection, tracks and lifetime.

`PeerCall` answers an SDP offer (non-trickle: aiortc gathers every candidate inside
setLocalDescription), then runs three tasks: the output pump (conversation -> track and data
channel), the client-event handler, and a liveness watchdog. aiortc never reports a peer that
simply vanished, so the watchdog reads the transport's received-packet counter (RTP, RTCP, SCTP,
keepalive pings all count) and ends the call after a few seconds without any. Closing cancels
every task, stops the model work of the conversation, stops the tracks and closes the peer
connection. Client events are acted on by `signaling.dispatch`, the data channel is
`signaling.datachannel`, and the live-call registry is `signaling.registry`.
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

from engine.agent.conversation import AudioClear, AudioOut, ConversationEvent, ConversationSession
from engine.agent.conversation.events import ResponseDone
from signaling import protocol as ev
from signaling.configure import build_conversation
from signaling.datachannel import EventChannel
from signaling.dispatch import RealtimeControl
from signaling.errors import CallError
from signaling.host import RealtimeConfig, RealtimeModels
from signaling.ice import ice_configuration
from signaling.offers import check_offer
from signaling.options import SessionOptions
from signaling.protocol.ga import RealtimeEvents
from signaling.registry import CallRegistry
from signaling.tracks import InboundAudio, OutboundAudioTrack, use_shallow_jitter_buffer

log = logging.getLogger(__name__)


class PeerCall:
    """A call from offer to hang-up. Create with `PeerCall.start(...)`."""

    def __init__(self, *, services: RealtimeModels, config: RealtimeConfig, registry: CallRegistry,
                 conversation: ConversationSession, options: SessionOptions) -> None:
        self.id = "rtc_" + secrets.token_hex(12)
        self.registry = registry
        self.limits = config.limits
        self.conversation = conversation
        self.t0 = time.monotonic()
        self.events = ev.ServerEvents(self.t0)
        self.channel = EventChannel(on_open=self._session_created)
        self.control = RealtimeControl(session_id=self.id, conversation=conversation, services=services,
                                       events=self.events, send=self.send, options=options,
                                       model=config.model_name)
        self.realtime = RealtimeEvents(self.events, transport="webrtc", session_id=self.id,
                                       observe_latency=config.observe_latency,
                                       response_metadata=self.control.response_metadata)
        self.control.on_item_added = self.realtime.note_item
        self.control.hooks[ev.OutputAudioBufferClear] = self._clear_output
        self.pc = RTCPeerConnection(ice_configuration(list(config.ice_servers)))
        self.outbound = OutboundAudioTrack(on_played=conversation.mark_played)
        self.inbound: list[InboundAudio] = []
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._close_task: asyncio.Task | None = None
        self.packets_received = 0
        self.t_last_packet = self.t0
        self.t_connected: float | None = None

    # ------------------------------------------------------------------ set-up
    @classmethod
    async def start(cls, offer_sdp: str, *, services: RealtimeModels, config: RealtimeConfig,
                    registry: CallRegistry, options: SessionOptions) -> PeerCall:
        """Answer `offer_sdp`; the returned call is registered and running (see `answer`)."""
        check_offer(offer_sdp)
        conversation = await build_conversation(services, config, options)
        call = cls(services=services, config=config, registry=registry, conversation=conversation,
                   options=options)
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

    @property
    def voice_id(self) -> str | None:
        return self.control.voice_id

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
        use_shallow_jitter_buffer(transceiver.receiver)
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
        if not self.channel.attach(channel):
            log.info("call %s: ignoring data channel %r", self.id, channel.label)

    def _session_created(self) -> dict[str, Any]:
        return self.events.build("session.created", {"session": self.describe(), "call_id": self.id},
                                 t=time.monotonic())

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.t_connected is None:
            self.t_connected = time.monotonic()
        if state in ("failed", "closed"):
            self.request_close(f"connection_{state}")

    async def _push_audio(self, pcm) -> None:
        with contextlib.suppress(RuntimeError):  # the conversation closed under us: the call is ending
            await self.conversation.push_audio(pcm)

    async def _clear_output(self, event: Any) -> None:
        await self.conversation.cancel_response()
        self.outbound.clear(None)

    # ------------------------------------------------------------------ the running call
    async def _pump_outputs(self) -> None:
        """Conversation outputs -> audio track (audio, clears) and data channel (events)."""
        async for item in self.conversation.outputs():
            if isinstance(item, AudioOut):
                self.outbound.push(item.response_id, item.pcm, item.sample_rate)
            elif isinstance(item, AudioClear):
                self.outbound.clear(item.response_id)
            elif isinstance(item, ConversationEvent):
                if isinstance(item, ResponseDone):
                    self.outbound.end_response(item.response_id)
                for event in self.realtime.conversation_event(item):
                    self.send(event)

    async def _handle_client_events(self) -> None:
        while True:
            await self.control.handle(await self.channel.incoming.get())

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

    # ------------------------------------------------------------------ events out
    def send(self, event: dict[str, Any]) -> None:
        self.channel.send(event)

    def describe(self) -> dict[str, Any]:
        return self.control.describe()

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
        self.control.error("internal_error", f"internal error: {task.exception()}", type_="server_error")
        self.request_close("internal_error")
