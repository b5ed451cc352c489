"""One OpenAI Realtime session over a WebSocket (`GET /v1/realtime`), the surface the `openai`
SDK, LiveKit's and Pipecat's OpenAI realtime plugins and telephony bridges speak.

JSON events both ways; audio travels inside them as base64 (`input_audio_buffer.append` in,
`response.output_audio.delta` out) in the session's formats (24 kHz PCM by default, or G.711).
The same conversation pipeline, client-event dispatch and session cap as WebRTC calls.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import time
from typing import Any

from aiohttp import WSMsgType, web

from engine.agent.conversation import AudioClear, AudioOut, ConversationEvent, ConversationSession
from signaling import protocol as ev
from signaling.audio_formats import InputDecoder
from signaling.dispatch import RealtimeControl
from signaling.host import RealtimeConfig, RealtimeModels
from signaling.options import SessionOptions
from signaling.protocol.ga import RealtimeEvents
from signaling.registry import CallRegistry

log = logging.getLogger(__name__)

SUBPROTOCOL = "realtime"
HEARTBEAT_SECONDS = 20.0  # a client that stops answering pings is gone
MAX_OUTBOX = 4096  # events waiting for a slow client before the session is ended


class RealtimeSocket:
    def __init__(self, ws: web.WebSocketResponse, *, services: RealtimeModels, config: RealtimeConfig,
                 registry: CallRegistry, conversation: ConversationSession, options: SessionOptions) -> None:
        self.id = "sess_" + secrets.token_hex(12)
        self.ws = ws
        self.registry = registry
        self.conversation = conversation
        self.t0 = time.monotonic()
        self.events = ev.ServerEvents(self.t0)
        self.control = RealtimeControl(session_id=self.id, conversation=conversation, services=services,
                                       events=self.events, send=self.send, options=options,
                                       model=options.model or config.model_name, audio_formats=True,
                                       max_message_bytes=ev.MAX_AUDIO_MESSAGE_BYTES)
        self.control.hooks[ev.InputAudioBufferAppend] = self._append
        self.control.on_formats = self._formats_changed
        self.realtime = RealtimeEvents(self.events, transport="websocket", session_id=self.id,
                                       output_format=self.control.output_format,
                                       observe_latency=config.observe_latency,
                                       response_metadata=self.control.response_metadata)
        self.control.on_item_added = self.realtime.note_item
        self.decoder = InputDecoder(self.control.input_format)
        self.close_reason: str | None = None
        self._outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._closed = asyncio.Event()

    # ------------------------------------------------------------------ lifetime
    async def run(self) -> None:
        """Serve the session until the client leaves or the server closes it."""
        self.send(self.events.build("session.created", {"session": self.control.describe()}, t=time.monotonic()))
        writer = asyncio.create_task(self._write(), name=f"{self.id}:write")
        pump = asyncio.create_task(self._pump_outputs(), name=f"{self.id}:pump")
        try:
            await self._read()
        finally:
            await self.close(self.close_reason or "client_closed")
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            self._outbox.put_nowait(None)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(writer, 5.0)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            if not self.ws.closed:
                await self.ws.close(code=1000, message=(self.close_reason or "").encode()[:120])

    async def close(self, reason: str = "hangup") -> None:
        """Idempotent: stops the conversation's model work; the socket closes as `run` unwinds."""
        if self.close_reason is None:
            self.close_reason = reason
            log.info("realtime session %s closing: %s", self.id, reason)
        if not self._closed.is_set():
            self._closed.set()
            await self.conversation.close()
            self.registry.discard(self)
            if not self.ws.closed:
                await self.ws.close(code=1001 if reason == "server_shutdown" else 1000,
                                    message=reason.encode()[:120])

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                await self.control.handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.control.error("invalid_json", "send events as JSON text messages (audio goes base64 inside "
                                                   "input_audio_buffer.append)")
            elif msg.type == WSMsgType.ERROR:
                self.close_reason = "connection_error"
                return
            if self._closed.is_set():
                return

    # ------------------------------------------------------------------ out
    def send(self, event: dict[str, Any]) -> None:
        if self._closed.is_set():
            return
        if self._outbox.qsize() > MAX_OUTBOX:
            log.warning("realtime session %s: the client reads too slowly; ending it", self.id)
            asyncio.get_running_loop().create_task(self.close("client_too_slow"))
            return
        for part in ev.split_event(event):
            self._outbox.put_nowait(part)

    async def _write(self) -> None:
        while (event := await self._outbox.get()) is not None:
            if self.ws.closed:
                return
            try:
                await self.ws.send_str(ev.encode(event))
            except (ConnectionError, RuntimeError):
                return

    async def _pump_outputs(self) -> None:
        try:
            async for item in self.conversation.outputs():
                if isinstance(item, AudioOut):
                    events = self.realtime.audio(item)
                elif isinstance(item, AudioClear):
                    continue  # over a WebSocket the client holds the audio; the response events say what stopped
                elif isinstance(item, ConversationEvent):
                    events = self.realtime.conversation_event(item)
                else:
                    continue
                for event in events:
                    self.send(event)
        except Exception as exc:  # noqa: BLE001 - a bug here must end the session loudly, not hang it
            log.exception("realtime session %s: the event pump failed", self.id)
            self.control.error("internal_error", f"internal error: {exc}", type_="server_error")
            await self.close("internal_error")

    # ------------------------------------------------------------------ in
    async def _append(self, event: ev.InputAudioBufferAppend) -> None:
        try:
            data = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("input_audio_buffer.append: `audio` is not valid base64") from None
        pcm = self.decoder.decode(data)
        if len(pcm):
            await self.conversation.push_audio(pcm)

    def _formats_changed(self) -> None:
        if self.control.input_format != self.decoder.format:
            self.decoder = InputDecoder(self.control.input_format)
        self.realtime.output_format = self.control.output_format
