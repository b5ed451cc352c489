"""Client events -> the conversation, for one realtime session on any transport.

A transport hands every client message to `RealtimeControl.handle`; what cannot be parsed or
acted on goes back as an `error` event carrying the client's `event_id`, never as an exception
that would end the session. Transport-specific events (audio buffer appends on a WebSocket,
output-buffer clears on WebRTC) are handled by the hooks the transport registers.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from engine.agent.conversation import ConversationSession
from signaling import protocol as ev
from signaling.configure import apply_options
from signaling.host import RealtimeModels
from signaling.options import OptionsError, describe, from_session, resolve_voice, sampling_options

log = logging.getLogger(__name__)

Hook = Callable[[Any], Awaitable[None]]


class RealtimeControl:
    def __init__(self, *, session_id: str, conversation: ConversationSession, services: RealtimeModels,
                 events: ev.ServerEvents, send: Callable[[dict[str, Any]], None], voice_id: str | None) -> None:
        self.session_id = session_id
        self.conversation = conversation
        self.services = services
        self.events = events
        self.send = send
        self.voice_id = voice_id
        self.hooks: dict[type, Hook] = {}  # transport-specific client events

    def describe(self) -> dict[str, Any]:
        conv = self.conversation
        return describe(conv.mode, self.voice_id, conv.instructions, conv.turn_detection, conv.sampling)

    def error(self, code: str, message: str, *, event_id: str | None = None, param: str | None = None,
              type_: str = "invalid_request_error") -> None:
        self.send(self.events.error(code, message, event_id=event_id, param=param, type_=type_, t=time.monotonic()))

    async def handle(self, message: str | bytes) -> None:
        if ev.is_keepalive(message):
            return
        try:
            event = ev.parse_client_event(message)
        except ev.ProtocolError as exc:
            self.error(exc.code, str(exc), event_id=exc.event_id, param=exc.param)
            return
        try:
            await self.dispatch(event)
        except OptionsError as exc:
            self.error("invalid_value", str(exc), param=exc.param, event_id=event.event_id)
        except ValueError as exc:  # the conversation refused it (empty text, agent mode without LLM, ...)
            self.error("invalid_request", str(exc), event_id=event.event_id)
        except RuntimeError as exc:  # the conversation is closing
            log.info("session %s: client event after close: %s", self.session_id, exc)

    async def dispatch(self, event: Any) -> None:
        conv = self.conversation
        hook = self.hooks.get(type(event))
        if hook is not None:
            await hook(event)
        elif isinstance(event, ev.SessionUpdate):
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
            await conv.send_text(text, respond=False)
            self.send(self.events.build("conversation.item.added", {"item": {
                "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_text", "text": text}]}}, t=time.monotonic()))
        elif isinstance(event, ev.ResponseCreate):
            await conv.create_response()
        elif isinstance(event, (ev.ResponseCancel, ev.OutputAudioBufferClear)):
            await conv.cancel_response()
        elif isinstance(event, ev.InputAudioBufferClear):
            conv.clear_audio()
        elif isinstance(event, ev.InputAudioBufferCommit):
            await conv.commit_audio()
        elif isinstance(event, ev.TTSRequestEvent):
            voice = await resolve_voice(self.services, event.voice) if event.voice else None
            sampling = sampling_options(conv.sampling, event.merged_sampling().model_dump())
            await conv.speak(event.text, sampling=sampling, voice=voice)
