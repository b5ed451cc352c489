"""Conversation outputs -> the OpenAI Realtime GA server events, for one session on one transport.

The conversation speaks in typed events (`engine.agent.conversation.events`); `server_events`
maps each to its base event. This layer adds what the GA protocol builds around them: conversation
items (`conversation.item.added` / `done`), the response's output item and content part
(`response.output_item.*`, `response.content_part.*`), the GA response object with `output` and
`usage`, indices on every delta, and on a WebSocket the audio itself
(`response.output_audio.delta` / `done`, base64 in the session's output format). The
`output_audio_buffer.*` events exist on WebRTC only, as in the GA API.
"""
from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

from engine.agent.conversation import events as conv
from engine.agent.conversation.history import HistoryItem
from signaling.audio_formats import AudioFormat, OutputEncoder
from signaling.protocol.server_events import ServerEvents, function_call_item

Transport = Literal["webrtc", "websocket"]
_EMPTY = np.zeros(0, np.float32)
MAX_AUDIO_DELTA_BYTES = 256 * 1024  # raw bytes per delta: well under 1 MiB once base64 and JSON wrap it
_WEBRTC_ONLY = (conv.ResponseAudioStarted, conv.ResponseAudioStopped, conv.ResponseAudioCleared)
FRAMES_PER_SECOND = 44_100 / 2048  # codec frames (audio tokens) per second of speech


def item_object(item: HistoryItem, *, status: str = "completed") -> dict[str, Any]:
    """A history item in the GA `realtime.item` shape."""
    if item.type == "function_call":
        return function_call_item(item.id, item.call_id or "", item.name or "", item.text, status)
    if item.type == "function_call_output":
        return {"id": item.id, "object": "realtime.item", "type": "function_call_output", "status": status,
                "call_id": item.call_id, "output": item.text}
    if item.role == "assistant":
        part = ({"type": "output_audio", "transcript": item.text} if item.source == "audio"
                else {"type": "output_text", "text": item.text})
    elif item.source == "audio":
        part = {"type": "input_audio", "transcript": item.text}
    else:
        part = {"type": "input_text", "text": item.text}
    return {"id": item.id, "object": "realtime.item", "type": "message", "status": status, "role": item.role,
            "content": [part]}


@dataclasses.dataclass
class _Output:
    """The one assistant message item a response produces, while it is being built."""

    item_id: str
    audio: bool
    text: str = ""
    text_deltas: int = 0
    audio_bytes: int = 0
    part_done: bool = False
    audio_done: bool = False
    cleared: bool = False  # barge-in or cancel: what is still in the encoder is dropped
    encoder: OutputEncoder | None = None
    index: int = 0  # its output_index in the response
    announced: bool = True  # False: a response that may call tools, before its first text

    def part(self) -> dict[str, Any]:
        return {"type": "audio", "transcript": self.text} if self.audio else {"type": "text", "text": self.text}

    def item(self, status: str) -> dict[str, Any]:
        content = [{"type": "output_audio", "transcript": self.text} if self.audio
                   else {"type": "output_text", "text": self.text}]
        return {"id": self.item_id, "object": "realtime.item", "type": "message", "status": status,
                "role": "assistant", "content": content if (self.text or status != "in_progress") else []}


@dataclasses.dataclass
class _Call:
    """A function_call output item of a response."""

    item_id: str
    call_id: str
    name: str
    index: int
    arguments: str = ""
    done: bool = False

    def item(self, status: str) -> dict[str, Any]:
        return function_call_item(self.item_id, self.call_id, self.name, self.arguments, status)


class RealtimeEvents:
    def __init__(self, events: ServerEvents, *, transport: Transport, session_id: str,
                 output_format: AudioFormat | None = None,
                 observe_latency: Callable[[Mapping[str, float]], None] | None = None,
                 response_metadata: dict[str, dict[str, Any]] | None = None) -> None:
        self.events = events
        self.observe_latency = observe_latency
        self.response_metadata = response_metadata if response_metadata is not None else {}
        self.transport = transport
        self.session_id = session_id
        self.output_format = output_format or AudioFormat()
        self._outputs: dict[str, _Output] = {}  # response id -> its message output item
        self._calls: dict[str, list[_Call]] = {}  # response id -> its function_call output items
        self._last_item: str | None = None
        self._user_items: dict[str, str] = {}  # item id -> "audio" for user turns announced at commit

    def note_item(self, item_id: str) -> None:
        """A client-created item is now the conversation's last: the next item follows it."""
        self._last_item = item_id

    # ------------------------------------------------------------------ events
    def conversation_event(self, event: conv.ConversationEvent) -> list[dict[str, Any]]:
        if self.transport == "websocket" and isinstance(event, _WEBRTC_ONLY):
            out = self._outputs.get(event.response_id)
            if out is not None and isinstance(event, conv.ResponseAudioCleared):
                out.cleared = True
            return []
        base = self.events.from_conversation(event)
        match event:
            case conv.UserSpeechStopped() | conv.UserAudioCommitted():
                extra = [] if isinstance(event, conv.UserAudioCommitted) else [
                    self._build("input_audio_buffer.committed", event,
                                {"item_id": event.item_id, "previous_item_id": self._last_item})]
                if isinstance(event, conv.UserAudioCommitted):
                    base["previous_item_id"] = self._last_item
                return [base, *extra, self._user_item_added(event)]
            case conv.UserTranscript():
                base["content_index"] = 0
                item = {"id": event.item_id, "object": "realtime.item", "type": "message", "status": "completed",
                        "role": "user", "content": [{"type": "input_audio", "transcript": event.transcript}]}
                return [base, self._build("conversation.item.done", event, {"item": item})]
            case conv.ResponseCreated():
                return self._response_created(event, base)
            case conv.ResponseTextDelta():
                out = self._outputs.get(event.response_id)
                announce: list[dict[str, Any]] = []
                if out is not None:
                    announce = self._announce_message(event, out)
                    out.text += event.delta
                    out.text_deltas += 1
                    base.update(output_index=out.index, content_index=0)
                    if not out.audio:
                        base["type"] = "response.output_text.delta"
                return announce + [base]
            case conv.FunctionCallStarted():
                return self._call_started(event, base)
            case conv.FunctionCallDone():
                return self._call_done(event, base)
            case conv.ResponseTextDone():
                return self._text_done(event, base)
            case conv.ResponseTruncated():
                base["content_index"] = 0
                return [base]
            case conv.ResponseDone():
                return self._response_done(event, base)
        return [base]

    def audio(self, out: conv.AudioOut) -> list[dict[str, Any]]:
        """Audio as `response.output_audio.delta` events (WebSocket); on WebRTC it goes on the track."""
        output = self._outputs.get(out.response_id)
        if self.transport != "websocket" or output is None or not output.audio:
            return []
        if output.encoder is None:
            output.encoder = OutputEncoder(self.output_format, out.sample_rate)
        return self._audio_deltas(out.response_id, output, output.encoder.encode(out.pcm))

    # ------------------------------------------------------------------ pieces
    def _build(self, type_: str, event: conv.ConversationEvent, data: dict[str, Any]) -> dict[str, Any]:
        return self.events.build(type_, data, response_id=getattr(event, "response_id", None), t=event.t)

    def _user_item_added(self, event) -> dict[str, Any]:
        item = {"id": event.item_id, "object": "realtime.item", "type": "message", "status": "in_progress",
                "role": "user", "content": [{"type": "input_audio", "transcript": None}]}
        added = self._build("conversation.item.added", event, {"previous_item_id": self._last_item, "item": item})
        self._last_item = event.item_id
        return added

    def _response_created(self, event: conv.ResponseCreated, base: dict[str, Any]) -> list[dict[str, Any]]:
        # A response that may call tools opens its message item with its first text, so a reply
        # that only calls a tool has just the function_call item, as peers send it.
        out = _Output(event.item_id, event.audio, announced=False)
        self._outputs[event.response_id] = out
        self._calls[event.response_id] = []
        base["response"].update({"object": "realtime.response", "status_details": None, "output": [],
                                 "conversation_id": self.session_id,
                                 "output_modalities": ["audio"] if event.audio else ["text"], "usage": None})
        if event.response_id in self.response_metadata:
            base["response"]["metadata"] = self.response_metadata[event.response_id]
        return [base] + ([] if event.tools else self._announce_message(event, out))

    def _next_index(self, response_id: str) -> int:
        out = self._outputs.get(response_id)
        return len(self._calls.get(response_id, ())) + (1 if out is not None and out.announced else 0)

    def _announce_message(self, event: conv.ConversationEvent, out: _Output) -> list[dict[str, Any]]:
        if out.announced:
            return []
        response_id = getattr(event, "response_id")
        out.index = self._next_index(response_id)
        out.announced = True
        item = out.item("in_progress")
        ids = {"response_id": response_id, "output_index": out.index}
        events = [self._build("response.output_item.added", event, {**ids, "item": item}),
                  self._build("conversation.item.added", event, {"previous_item_id": self._last_item, "item": item}),
                  self._build("response.content_part.added", event,
                              {**ids, "item_id": out.item_id, "content_index": 0, "part": out.part()})]
        self._last_item = out.item_id
        return events

    def _call_started(self, event: conv.FunctionCallStarted, base: dict[str, Any]) -> list[dict[str, Any]]:
        calls = self._calls.setdefault(event.response_id, [])
        call = _Call(event.item_id, event.call_id, event.name, self._next_index(event.response_id))
        calls.append(call)
        base["output_index"] = call.index
        added = self._build("conversation.item.added", event,
                            {"previous_item_id": self._last_item, "item": call.item("in_progress")})
        self._last_item = call.item_id
        return [base, added]

    def _call_done(self, event: conv.FunctionCallDone, base: dict[str, Any]) -> list[dict[str, Any]]:
        call = next((c for c in self._calls.get(event.response_id, ()) if c.item_id == event.item_id), None)
        if call is None:  # not announced (cannot happen with the engine's order): announce it now
            started = conv.FunctionCallStarted(response_id=event.response_id, item_id=event.item_id,
                                               call_id=event.call_id, name=event.name, t=event.t)
            return self._call_started(started, self.events.from_conversation(started)) +                 self._call_done(event, base)
        call.arguments, call.done = event.arguments, True
        ids = {"item_id": call.item_id, "output_index": call.index, "call_id": call.call_id}
        deltas = [self._build("response.function_call_arguments.delta", event, {**ids, "delta": delta})
                  for delta in event.deltas]
        base.update(output_index=call.index)
        item = call.item("completed")
        return deltas + [base,
                         self._build("response.output_item.done", event, {"output_index": call.index, "item": item}),
                         self._build("conversation.item.done", event, {"previous_item_id": None, "item": item})]

    def _audio_deltas(self, response_id: str, out: _Output, data: bytes) -> list[dict[str, Any]]:
        out.audio_bytes += len(data)
        now = time.monotonic()
        return [self.events.build("response.output_audio.delta", {
            "item_id": out.item_id, "output_index": out.index, "content_index": 0,
            "delta": base64.b64encode(data[i:i + MAX_AUDIO_DELTA_BYTES]).decode("ascii")},
            response_id=response_id, t=now) for i in range(0, len(data), MAX_AUDIO_DELTA_BYTES)]

    def _finish_audio(self, event: conv.ConversationEvent, response_id: str, out: _Output) -> list[dict[str, Any]]:
        """WebSocket: the encoder's tail, then response.output_audio.done (once)."""
        if self.transport != "websocket" or not out.audio or out.audio_done or not out.announced:
            return []
        out.audio_done = True
        events: list[dict[str, Any]] = []
        if out.encoder is not None and not out.cleared:
            events = self._audio_deltas(response_id, out, out.encoder.encode(_EMPTY, final=True))
        out.encoder = None
        return events + [self._build("response.output_audio.done", event,
                                     {"item_id": out.item_id, "output_index": out.index, "content_index": 0})]

    def _close_output(self, event: conv.ConversationEvent, response_id: str, out: _Output,
                      status: str) -> list[dict[str, Any]]:
        """The audio, content part, output item and conversation item of a response end."""
        if out.part_done or not out.announced:
            return []
        out.part_done = True
        ids = {"item_id": out.item_id, "output_index": out.index, "content_index": 0}
        events = self._finish_audio(event, response_id, out)
        events.append(self._build("response.content_part.done", event, {**ids, "part": out.part()}))
        item = out.item(status)
        events.append(self._build("response.output_item.done", event, {"output_index": out.index, "item": item}))
        events.append(self._build("conversation.item.done", event, {"item": item}))
        return events

    def _text_done(self, event: conv.ResponseTextDone, base: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._outputs.get(event.response_id)
        if out is None:
            return [base]
        if not out.announced:
            if not event.transcript:
                return []  # a reply that only called tools: there is no message to finish
            events = self._announce_message(event, out)
            return events + self._text_done(event, base)
        out.text = event.transcript
        base.update(output_index=out.index, content_index=0)
        if not out.audio:
            base["type"] = "response.output_text.done"
            base["text"] = event.transcript
        return self._finish_audio(event, event.response_id, out) + [base]

    def _response_done(self, event: conv.ResponseDone, base: dict[str, Any]) -> list[dict[str, Any]]:
        if self.observe_latency is not None and event.status == "completed":
            self.observe_latency(base.get("latency_ms", {}))
        out = self._outputs.pop(event.response_id, None)
        calls = self._calls.pop(event.response_id, [])
        events: list[dict[str, Any]] = []
        status = {"completed": "completed", "cancelled": "incomplete", "failed": "incomplete"}.get(event.status,
                                                                                                 "incomplete")
        output: list[tuple[int, dict[str, Any]]] = []
        if out is not None and out.announced:
            events += self._close_output(event, event.response_id, out, status)
            output.append((out.index, out.item(status)))
        for call in calls:
            if not call.done:  # cut off (barge-in, cancel, failure) before its arguments were complete
                item = call.item("incomplete")
                events.append(self._build("response.output_item.done", event,
                                          {"output_index": call.index, "item": item}))
                events.append(self._build("conversation.item.done", event, {"previous_item_id": None, "item": item}))
            output.append((call.index, call.item("completed" if call.done else "incomplete")))
        audio_tokens = round(event.audio_seconds * FRAMES_PER_SECOND)
        text_tokens = out.text_deltas if out is not None else 0
        base["response"].update({
            "object": "realtime.response", "output": [item for _, item in sorted(output, key=lambda o: o[0])],
            "conversation_id": self.session_id,
            "output_modalities": ["audio"] if out is None or out.audio else ["text"],
            "usage": {"total_tokens": text_tokens + audio_tokens, "input_tokens": 0,
                      "output_tokens": text_tokens + audio_tokens,
                      "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens}}})
        if event.response_id in self.response_metadata:
            base["response"]["metadata"] = self.response_metadata.pop(event.response_id)
        events.append(base)
        events.append(self._build("rate_limits.updated", event, {"rate_limits": []}))
        return events


