"""One phone call: a carrier's media-stream WebSocket bridged to a ConversationSession.

Carrier-neutral: a dialect (twilio, telnyx, plivo) parses and builds the messages. Four tasks
run per call: the reader (caller audio, DTMF, marks, stop), the output pump (conversation events
and audio out; with server tools configured it also feeds a `ToolExecutor`, which runs the model's
tool calls, since a phone has no client to run them), the paced sender (`CarrierPlayback`) and a
watchdog that ends a call whose carrier went quiet (carriers send a media frame every 20 ms,
silence included). Malformed or unknown messages are logged and skipped. Closing cancels every
task (the tool runs too), stops the conversation's model work, closes the socket and frees the
call's registry slot.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import time
from typing import Any

from aiohttp import WSMsgType, web

from engine.agent.conversation import AudioClear, AudioOut, ConversationEvent, ConversationSession
from engine.agent.conversation.events import ResponseDone
from signaling.host import CallLimits, TelephonyConfig
from signaling.registry import CallRegistry
from signaling.server_tools import ServerTools
from signaling.telephony.codec import PhoneDecoder
from signaling.telephony.messages import Dialect, Dtmf, Media, MessageError, Other, Played, Start, Stop
from signaling.telephony.playback import CarrierPlayback
from signaling.tool_executor import ObserveRun, ToolExecutor

log = logging.getLogger(__name__)

KEEP_EVENTS = 512  # recent conversation events, kept for diagnostics and tests


class PhoneCall:
    """A call from the carrier's `start` to `stop` (or silence, or hang-up). Use `run()`."""

    def __init__(self, *, ws: web.WebSocketResponse, dialect: Dialect, start: Start,
                 conversation: ConversationSession, registry: CallRegistry, telephony: TelephonyConfig,
                 limits: CallLimits, tools: ServerTools | None = None,
                 observe_tool_run: ObserveRun | None = None) -> None:
        self.id = "phone_" + secrets.token_hex(12)
        self.ws = ws
        self.dialect = dialect
        self.start = start
        self.conversation = conversation
        self.registry = registry
        self.liveness_timeout = telephony.liveness_timeout
        self.limits = limits
        self.decoder = PhoneDecoder(start.encoding, start.sample_rate)
        self.playback = CarrierPlayback(dialect=dialect, stream_id=start.stream_id, encoding=start.encoding,
                                        rate=start.sample_rate, send=self._send,
                                        on_played=conversation.mark_played)
        self.events: collections.deque[ConversationEvent] = collections.deque(maxlen=KEEP_EVENTS)
        self.tools = None if tools is None else ToolExecutor(conversation, tools, session={
            "id": self.id, "transport": "telephony", "carrier": dialect.name, "call_id": start.call_id,
            "stream_id": start.stream_id, "account_id": start.account_id,
            "parameters": {k: v for k, v in start.parameters.items() if k != "token"}}, observe=observe_tool_run)
        self.t0 = time.monotonic()
        self.t_last_message = self.t0
        self.media_in = 0  # caller media messages
        self.skipped = 0  # malformed or unknown messages
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._close_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifetime
    async def run(self) -> None:
        """Run the (registered) call until it ends; returns once everything of it is stopped."""
        self._spawn(self._read(), "reader")
        self._spawn(self._pump_outputs(), "pump")
        self._spawn(self.playback.run(), "playback")
        self._spawn(self._watch(), "watchdog")
        await self.closed.wait()

    def request_close(self, reason: str) -> None:
        if self._close_task is None and not self.closed.is_set():
            self._close_task = asyncio.get_running_loop().create_task(self.close(reason))

    async def close(self, reason: str = "hangup") -> None:
        """Idempotent; returns once the call's tasks, model work and socket are all stopped."""
        if self.close_reason is not None:
            await self.closed.wait()
            return
        self.close_reason = reason
        log.info("phone call %s (%s %s) closing: %s", self.id, self.dialect.name, self.start.call_id, reason)
        try:
            current = asyncio.current_task()
            tasks = [t for t in self._tasks if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.tools is not None:
                await self.tools.close()
            await self.conversation.close()
            with contextlib.suppress(Exception):
                await self.ws.close()
        finally:
            self.registry.discard(self)
            self.closed.set()

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("phone call %s: task %s failed", self.id, task.get_name(), exc_info=task.exception())
            self.request_close("internal_error")

    # ------------------------------------------------------------------ carrier -> conversation
    async def _read(self) -> None:
        async for message in self.ws:
            self.t_last_message = time.monotonic()
            if message.type != WSMsgType.TEXT:
                if message.type == WSMsgType.ERROR:
                    break
                self._skip("a non-text WebSocket message")
                continue
            try:
                data = json.loads(message.data)
                if not isinstance(data, dict):
                    raise MessageError("not a JSON object")
                event = self.dialect.parse(data)
            except (ValueError, MessageError) as exc:  # JSONDecodeError is a ValueError
                self._skip(str(exc))
                continue
            if isinstance(event, Media):
                if event.track in ("inbound", "inbound_track"):
                    self.media_in += 1
                    pcm = self.decoder.decode(event.payload)
                    if pcm.size:
                        await self.conversation.push_audio(pcm)
            elif isinstance(event, Played):
                self.playback.played(event.name)
            elif isinstance(event, Dtmf):
                try:
                    self.conversation.dtmf(event.digit)
                except ValueError as exc:
                    self._skip(str(exc))
            elif isinstance(event, Stop):
                self.request_close("stop")
                return
            elif isinstance(event, Other):
                if event.event == "error":
                    log.warning("phone call %s: the carrier reports an error: %s", self.id, event.detail)
        self.request_close("carrier_closed")

    def _skip(self, why: str) -> None:
        self.skipped += 1
        log.warning("phone call %s: skipped a %s message: %s", self.id, self.dialect.name, why)

    async def _watch(self) -> None:
        interval = min(0.5, self.liveness_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - self.t_last_message > self.liveness_timeout:
                log.info("phone call %s: nothing from the carrier for %.1f s", self.id, now - self.t_last_message)
                self.request_close("carrier_silent")
                return
            if self.limits.max_call_seconds is not None and now - self.t0 > self.limits.max_call_seconds:
                self.request_close("max_duration")
                return

    # ------------------------------------------------------------------ conversation -> carrier
    async def _pump_outputs(self) -> None:
        async for item in self.conversation.outputs():
            if isinstance(item, AudioOut):
                self.playback.push(item.response_id, item.pcm, item.sample_rate)
            elif isinstance(item, AudioClear):
                await self.playback.clear(item.response_id)
            elif isinstance(item, ConversationEvent):
                self.events.append(item)
                if self.tools is not None:
                    self.tools.observe(item)
                if isinstance(item, ResponseDone):
                    self.playback.end_response(item.response_id)

    async def _send(self, message: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        with contextlib.suppress(ConnectionResetError):
            await self.ws.send_str(json.dumps(message, separators=(",", ":")))
