"""Server events of the OpenAI Realtime protocol: the conversation's typed events mapped to the
wire vocabulary, in one place for every transport (WebRTC data channel, WebSocket, telephony).

Every event is stamped with `event_id` and `t_ms` (milliseconds since the session began, server
clock) so a client can line up timings. Long text is split over several `delta` events.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import time
from typing import Any

from engine.agent.conversation import events as conv

DELTA_CHARS = 400  # a transcript delta longer than this is sent as several deltas


class ServerEvents:
    """Builds server events for one session: ids and `t_ms` on a shared clock."""

    def __init__(self, t0: float) -> None:
        self._t0 = t0
        self._ids = itertools.count(1)

    def build(self, type_: str, data: dict[str, Any] | None = None, *, response_id: str | None = None,
              t: float) -> dict[str, Any]:
        event: dict[str, Any] = {"type": type_, "event_id": f"event_{next(self._ids)}"}
        event.update(data or {})
        if response_id is not None:
            event.setdefault("response_id", response_id)
        event["t_ms"] = round((t - self._t0) * 1000.0, 1)
        return event

    def error(self, code: str, message: str, *, t: float, type_: str = "invalid_request_error",
              event_id: str | None = None, param: str | None = None) -> dict[str, Any]:
        return self.build("error", {"error": {"type": type_, "code": code, "message": message, "param": param,
                                              "event_id": event_id}}, t=t)

    def from_conversation(self, event: conv.ConversationEvent) -> dict[str, Any]:
        """One conversation event as its OpenAI Realtime server event."""
        type_, data = wire_payload(event)
        return self.build(type_, data, response_id=getattr(event, "response_id", None), t=event.t)


def _latency(latency: conv.Latency) -> dict[str, float]:
    return {k: v for k, v in dataclasses.asdict(latency).items() if v is not None}


def _times(times: conv.ResponseTimes) -> dict[str, float]:
    return {f"t_{k}": v for k, v in dataclasses.asdict(times).items() if v is not None}


def _error_body(error: conv.ConversationError) -> dict[str, Any]:
    body = {"type": error.type, "code": error.code, "message": error.message}
    if error.item_id is not None:
        body["item_id"] = error.item_id
    return body


def _done(event: conv.ResponseDone) -> dict[str, Any]:
    details: dict[str, Any] | None = None
    if event.status == "cancelled":
        details = {"type": "cancelled", "reason": event.reason}
    elif event.status == "failed" and event.error is not None:
        details = {"type": "failed", "error": _error_body(event.error)}
    return {"response": {"id": event.response_id, "kind": event.kind, "status": event.status,
                         "status_details": details},
            "item_id": event.item_id, "transcript": event.transcript, "audio_seconds": event.audio_seconds,
            "latency_ms": _latency(event.latency), "t": _times(event.times)}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "object": "realtime.item", "type": "function_call", "status": status,
            "call_id": call_id, "name": name, "arguments": arguments}


def wire_payload(event: conv.ConversationEvent) -> tuple[str, dict[str, Any]]:
    """(type, fields) of the server event for a conversation event."""
    match event:
        case conv.UserSpeechStarted():
            return "input_audio_buffer.speech_started", {"audio_start_ms": event.audio_start_ms,
                                                         "item_id": event.item_id}
        case conv.UserSpeechStopped():
            return "input_audio_buffer.speech_stopped", {"audio_end_ms": event.audio_end_ms,
                                                         "item_id": event.item_id}
        case conv.UserAudioCommitted():
            return "input_audio_buffer.committed", {"item_id": event.item_id}
        case conv.UserTranscriptDelta():
            return "conversation.item.input_audio_transcription.delta", {
                "item_id": event.item_id, "content_index": 0, "delta": event.delta}
        case conv.UserTranscript():
            return "conversation.item.input_audio_transcription.completed", {
                "item_id": event.item_id, "transcript": event.transcript,
                "latency_ms": {"transcript": event.latency_ms}}
        case conv.ResponseCreated():
            return "response.created", {"response": {"id": event.response_id, "kind": event.kind,
                                                     "status": "in_progress"}, "item_id": event.item_id}
        case conv.ResponseTextDelta():
            return "response.output_audio_transcript.delta", {"item_id": event.item_id, "delta": event.delta}
        case conv.ResponseTextDone():
            return "response.output_audio_transcript.done", {"item_id": event.item_id,
                                                             "transcript": event.transcript}
        case conv.FunctionCallStarted():
            return "response.output_item.added", {"item": function_call_item(
                event.item_id, event.call_id, event.name, "", "in_progress")}
        case conv.FunctionCallDone():
            return "response.function_call_arguments.done", {"item_id": event.item_id, "call_id": event.call_id,
                                                             "name": event.name, "arguments": event.arguments}
        case conv.ResponseAudioStarted():
            return "output_audio_buffer.started", {"latency_ms": _latency(event.latency)}
        case conv.ResponseAudioStopped():
            return "output_audio_buffer.stopped", {"audio_end_ms": event.audio_end_ms}
        case conv.ResponseAudioCleared():
            return "output_audio_buffer.cleared", {"audio_end_ms": event.audio_end_ms}
        case conv.ResponseTruncated():
            return "conversation.item.truncated", {"item_id": event.item_id, "audio_end_ms": event.audio_end_ms,
                                                   "transcript": event.transcript}
        case conv.ResponseDone():
            return "response.done", _done(event)
        case conv.UserDtmf():
            return "input_audio_buffer.dtmf_event_received", {"event": event.digit,
                                                              "received_at": int(time.time())}
        case conv.ConversationError():
            return "error", {"error": _error_body(event)}
    raise TypeError(f"no wire mapping for {type(event).__name__}")


def split_event(event: dict[str, Any], chars: int = DELTA_CHARS) -> list[dict[str, Any]]:
    """A transcript delta with long text becomes several deltas (same order, same fields)."""
    delta = event.get("delta")
    if not isinstance(delta, str) or len(delta) <= chars:
        return [event]
    parts = [delta[i:i + chars] for i in range(0, len(delta), chars)]
    return [{**event, "delta": part, "event_id": f"{event['event_id']}_{n}" if n else event["event_id"]}
            for n, part in enumerate(parts)]


def encode(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
