"""Client events -> the conversation, for one realtime session on any transport.

A transport hands every client message to `RealtimeControl.handle`; what cannot be parsed or
acted on goes back as an `error` event carrying the client's `event_id`, never as an exception
that would end the session. Transport-specific events (audio appends on a WebSocket, output
buffer clears on WebRTC) are handled by the hooks the transport registers.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from engine.agent.conversation import ConversationSession
from signaling import protocol as ev
from signaling.audio_formats import AudioFormat
from signaling.configure import apply_options
from signaling.host import RealtimeModels
from signaling.options import OPUS, OptionsError, SessionOptions, describe, from_session, resolve_voice, \
    sampling_options
from engine.agent.tools import ToolConfigError, parse_tool_choice, parse_tools
from signaling.protocol.ga import item_object

log = logging.getLogger(__name__)

Hook = Callable[[Any], Awaitable[None]]


class RealtimeControl:
    def __init__(self, *, session_id: str, conversation: ConversationSession, services: RealtimeModels,
                 events: ev.ServerEvents, send: Callable[[dict[str, Any]], None], options: SessionOptions,
                 model: str, audio_formats: bool = False,
                 max_message_bytes: int = ev.MAX_CLIENT_MESSAGE_BYTES) -> None:
        """`audio_formats`: the transport carries audio in events (WebSocket), so the session has
        input/output formats; otherwise audio is Opus on a media track."""
        self.session_id = session_id
        self.conversation = conversation
        self.services = services
        self.events = events
        self.send = send
        self.voice_id = options.voice_id
        self.voice_echo = options.voice_echo
        self.model = options.model or model
        conversation.speak_replies = "audio" in (options.output_modalities or ("audio",))
        self.audio_formats = audio_formats
        self.input_format = options.input_format or AudioFormat()
        self.output_format = options.output_format or AudioFormat()
        self.max_message_bytes = max_message_bytes
        self.hooks: dict[type, Hook] = {}  # transport-specific client events
        self.on_formats: Callable[[], None] | None = None  # the transport re-reads input/output formats
        self.on_item_added: Callable[[str], None] | None = None  # a client item joined the conversation
        # response id -> the `metadata` its response.create carried, echoed on its response object
        # (LiveKit's plugin pairs generate_reply() with response.created by it)
        self.response_metadata: dict[str, dict[str, Any]] = {}

    @property
    def output_modalities(self) -> tuple[str, ...]:
        """The session's reply modality, kept once: on the conversation, which speaks or not."""
        return ("audio",) if self.conversation.speak_replies else ("text",)

    def describe(self) -> dict[str, Any]:
        conv = self.conversation
        formats = ({"input_format": self.input_format.describe(), "output_format": self.output_format.describe()}
                   if self.audio_formats else {"input_format": OPUS, "output_format": OPUS})
        session = describe(conv.mode, self.voice_id, conv.instructions, conv.turn_detection, conv.sampling,
                           session_id=self.session_id, model=self.model, voice=self.voice_echo,
                           output_modalities=self.output_modalities, **formats)
        session.update(tools=[tool.wire() for tool in conv.tools], tool_choice=conv.tool_choice.wire())
        return session

    def now(self) -> float:
        return time.monotonic()

    def error(self, code: str, message: str, *, event_id: str | None = None, param: str | None = None,
              type_: str = "invalid_request_error") -> None:
        self.send(self.events.error(code, message, event_id=event_id, param=param, type_=type_, t=self.now()))

    async def handle(self, message: str | bytes) -> None:
        if ev.is_keepalive(message):
            return
        try:
            event = ev.parse_client_event(message, max_bytes=self.max_message_bytes)
        except ev.ProtocolError as exc:
            self.error(exc.code, str(exc), event_id=exc.event_id, param=exc.param)
            return
        try:
            await self.dispatch(event)
        except (OptionsError, ToolConfigError) as exc:
            self.error("invalid_value", str(exc), param=exc.param, event_id=event.event_id)
        except LookupError as exc:
            # OpenAI's codes name the verb (item_retrieve_invalid_item_id, ...); Pipecat keys on them
            verb = event.type.rsplit(".", 1)[-1] if event.type.startswith("conversation.item.") else None
            self.error(f"item_{verb}_invalid_item_id" if verb else "item_not_found",
                       f"no conversation item {exc.args[0]!r}", param="item_id", event_id=event.event_id)
        except ValueError as exc:  # the conversation refused it (empty text, agent mode without LLM, ...)
            self.error("invalid_request", str(exc), event_id=event.event_id)
        except RuntimeError as exc:  # the conversation is closing
            log.info("session %s: client event after close: %s", self.session_id, exc)

    async def dispatch(self, event: Any) -> None:
        hook = self.hooks.get(type(event))
        if hook is not None:
            await hook(event)
            return
        handler = getattr(self, "_on_" + type(event).__name__, None)
        if handler is None:
            raise ValueError(f"{event.type} is not available on this transport")
        await handler(event)

    # ------------------------------------------------------------------ session
    async def _on_SessionUpdate(self, event: ev.SessionUpdate) -> None:
        conv = self.conversation
        options = from_session(event.session, conv.turn_detection)
        if not self.audio_formats:
            options.input_format = options.output_format = None  # WebRTC audio is Opus on the track
        await apply_options(conv, options, self.services)
        if options.voice_id is not None:
            self.voice_id = options.voice_id
            self.voice_echo = options.voice_echo
        if options.output_modalities is not None:
            conv.speak_replies = "audio" in options.output_modalities
        if options.model is not None:
            self.model = options.model
        if options.input_format is not None or options.output_format is not None:
            self.input_format = options.input_format or self.input_format
            self.output_format = options.output_format or self.output_format
            if self.on_formats is not None:
                self.on_formats()
        self.send(self.events.build("session.updated", {"session": self.describe()}, t=self.now()))

    # ------------------------------------------------------------------ items
    async def _on_ConversationItemCreate(self, event: ev.ConversationItemCreate) -> None:
        conv = self.conversation
        if event.item.type == "function_call_output":
            await self._function_call_output(event)
            return
        text = event.item.text()
        if not text:
            raise ValueError("conversation.item.create needs a message with text (input_text, or a transcript)")
        role = "system" if event.item.role == "developer" else event.item.role
        previous = conv.items()[-1].id if conv.items() else None
        item_id = conv.add_message(role, text, item_id=event.item.id)
        part_type = "input_text" if role != "assistant" else "output_text"
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": "completed",
                "content": [{"type": part_type, "text": text}]}
        self.send(self.events.build("conversation.item.added", {"previous_item_id": previous, "item": item},
                                    t=self.now()))
        self.send(self.events.build("conversation.item.done", {"previous_item_id": previous, "item": item},
                                    t=self.now()))
        if self.on_item_added is not None:
            self.on_item_added(item_id)

    async def _function_call_output(self, event: ev.ConversationItemCreate) -> None:
        """The client's result of a tool call; the next response.create answers with it."""
        conv, spec = self.conversation, event.item
        if spec.call_id is None or spec.output is None:
            raise OptionsError("item.call_id" if spec.call_id is None else "item.output",
                               "a function_call_output item needs call_id and output")
        previous = conv.items()[-1].id if conv.items() else None
        try:
            item = conv.add_function_output(spec.call_id, spec.output, item_id=spec.id)
        except LookupError:
            self.error("invalid_value", f"no function call with call_id {spec.call_id!r} in this conversation",
                       param="item.call_id", event_id=event.event_id)
            return
        wire = item_object(item)
        for type_ in ("conversation.item.added", "conversation.item.done"):
            self.send(self.events.build(type_, {"previous_item_id": previous, "item": wire}, t=self.now()))

    async def _on_ConversationItemRetrieve(self, event: ev.ConversationItemRetrieve) -> None:
        item = self.conversation.get_item(event.item_id)
        if item is None:
            raise LookupError(event.item_id)
        self.send(self.events.build("conversation.item.retrieved", {"item": item_object(item)}, t=self.now()))

    async def _on_ConversationItemDelete(self, event: ev.ConversationItemDelete) -> None:
        self.conversation.delete_item(event.item_id)  # KeyError (a LookupError) for an unknown id
        self.send(self.events.build("conversation.item.deleted", {"item_id": event.item_id}, t=self.now()))

    async def _on_ConversationItemTruncate(self, event: ev.ConversationItemTruncate) -> None:
        await self.conversation.truncate_item(event.item_id, event.audio_end_ms)

    # ------------------------------------------------------------------ responses
    async def _on_ResponseCreate(self, event: ev.ResponseCreate) -> None:
        params = event.response or {}
        instructions = params.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise OptionsError("response.instructions", "must be a string")
        modalities = params.get("output_modalities", params.get("modalities")) or self.output_modalities
        if not isinstance(modalities, (list, tuple)) or not set(modalities) <= {"audio", "text"}:
            raise OptionsError("response.output_modalities", 'must be ["audio"] or ["text"]')
        audio = params.get("audio") if isinstance(params.get("audio"), dict) else {}
        voice_value = (audio.get("output") or {}).get("voice") if isinstance(audio.get("output"), dict) else None
        voice_value = voice_value or params.get("voice")
        if isinstance(voice_value, dict):
            voice_value = voice_value.get("id")
        metadata = params.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise OptionsError("response.metadata", "must be an object")
        voice = await resolve_voice(self.services, str(voice_value)) if voice_value else None
        try:
            tools = parse_tools(params["tools"]) if params.get("tools") is not None else None
            choice = parse_tool_choice(params["tool_choice"], None) if params.get("tool_choice") is not None else None
            response_id = await self.conversation.create_response(
                instructions=instructions, text_only="audio" not in modalities, voice=voice, tools=tools,
                tool_choice=choice)
        except ToolConfigError as exc:
            raise OptionsError(f"response.{exc.param}", str(exc).split(": ", 1)[-1]) from None
        if metadata and response_id:
            self.response_metadata[response_id] = metadata

    async def _on_ResponseCancel(self, event: ev.ResponseCancel) -> None:
        await self.conversation.cancel_response()

    # ------------------------------------------------------------------ input audio buffer
    async def _on_InputAudioBufferClear(self, event: ev.InputAudioBufferClear) -> None:
        self.conversation.clear_audio()
        self.send(self.events.build("input_audio_buffer.cleared", {}, t=self.now()))

    async def _on_InputAudioBufferCommit(self, event: ev.InputAudioBufferCommit) -> None:
        await self.conversation.commit_audio()

    # ------------------------------------------------------------------ our extension
    async def _on_TTSRequestEvent(self, event: ev.TTSRequestEvent) -> None:
        conv = self.conversation
        voice = await resolve_voice(self.services, event.voice) if event.voice else None
        sampling = sampling_options(conv.sampling, event.merged_sampling().model_dump())
        await conv.speak(event.text, sampling=sampling, voice=voice)
