"""Client events of the OpenAI Realtime protocol: one pydantic model each, and the parser.

Bad input becomes a `ProtocolError` (which the transport sends back as an `error` event), never an
exception in the session.
"""
from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

log = logging.getLogger(__name__)

MAX_CLIENT_MESSAGE_BYTES = 64 * 1024  # a typed message or TTS text, never audio (the data channel's limit)
MAX_AUDIO_MESSAGE_BYTES = 15 * 1024 * 1024  # a WebSocket `input_audio_buffer.append`, as upstream allows
MAX_TEXT_CHARS = 4000
ITEM_ID = r"^[A-Za-z0-9_\-.:]{1,64}$"


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")

    event_id: str | None = None


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: dict[str, Any] = Field(default_factory=dict)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "input_text"
    text: str | None = None
    transcript: str | None = None


class ConversationItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(None, pattern=ITEM_ID)  # the client may choose it (Pipecat sends 32 hex digits)
    type: Literal["message", "function_call_output"] = "message"
    role: Literal["user", "system", "assistant", "developer"] = "user"
    content: list[ContentPart] = Field(default_factory=list, max_length=16)
    call_id: str | None = Field(None, max_length=200)  # function_call_output: the call it answers
    output: str | None = Field(None, max_length=MAX_CLIENT_MESSAGE_BYTES)  # function_call_output: its result

    def text(self) -> str:
        return " ".join((p.text or p.transcript or "").strip() for p in self.content).strip()


class ConversationItemCreate(_Event):
    type: Literal["conversation.item.create"]
    previous_item_id: str | None = None
    item: ConversationItem


class ConversationItemRetrieve(_Event):
    type: Literal["conversation.item.retrieve"]
    item_id: str = Field(max_length=64)


class ConversationItemDelete(_Event):
    type: Literal["conversation.item.delete"]
    item_id: str = Field(max_length=64)


class ConversationItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str = Field(max_length=64)
    content_index: int = Field(0, ge=0)
    audio_end_ms: int = Field(ge=0)


class InputAudioBufferAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str  # base64 in the session's input format


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: dict[str, Any] | None = None


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


class OutputAudioBufferClear(_Event):
    type: Literal["output_audio_buffer.clear"]


class InputAudioBufferClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class InputAudioBufferCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class TTSSampling(BaseModel):
    """Per-request sampling knobs of a `tts.request` (any left out keep the session's)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, gt=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=4096)
    repetition_penalty: float | None = Field(None, ge=0.5, le=3.0)
    max_new_tokens: int | None = Field(None, ge=0, le=8192)
    seed: int | None = None


class TTSRequestEvent(_Event):
    """Our extension: speak exactly `text` on the audio track, answered with `response.*` events."""

    type: Literal["tts.request"]
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    voice: str | None = Field(None, max_length=200, description="reference voice id; default: the session's")
    sampling: TTSSampling = Field(default_factory=TTSSampling)
    # Flat aliases, for clients that prefer the job API's field names.
    temperature: float | None = Field(None, gt=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_new_tokens: int | None = Field(None, ge=0, le=8192)
    repetition_penalty: float | None = Field(None, ge=0.5, le=3.0)
    seed: int | None = None

    def merged_sampling(self) -> TTSSampling:
        flat = {k: getattr(self, k) for k in ("temperature", "top_p", "max_new_tokens", "repetition_penalty", "seed")}
        return self.sampling.model_copy(update={k: v for k, v in flat.items() if v is not None})


ClientEvent = Annotated[
    Union[SessionUpdate, ConversationItemCreate, ConversationItemRetrieve, ConversationItemDelete,
          ConversationItemTruncate, ResponseCreate, ResponseCancel, OutputAudioBufferClear, InputAudioBufferAppend,
          InputAudioBufferClear, InputAudioBufferCommit, TTSRequestEvent],
    Field(discriminator="type"),
]
_CLIENT_EVENT = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = ("session.update", "conversation.item.create", "conversation.item.retrieve",
                      "conversation.item.delete", "conversation.item.truncate", "response.create", "response.cancel",
                      "output_audio_buffer.clear", "input_audio_buffer.append", "input_audio_buffer.clear",
                      "input_audio_buffer.commit", "tts.request")


class ProtocolError(ValueError):
    """A client message that cannot be acted on; becomes an `error` event."""

    def __init__(self, code: str, message: str, *, event_id: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.event_id = event_id
        self.param = param


def is_keepalive(message: str | bytes) -> bool:
    """Pipecat-style `ping...` strings: they only keep the call alive."""
    text = message if isinstance(message, str) else message[:8].decode("latin-1")
    return text.startswith("ping")


def parse_client_event(message: str | bytes, *, max_bytes: int = MAX_CLIENT_MESSAGE_BYTES) -> ClientEvent:
    """One client message -> its event model, or ProtocolError saying what is wrong."""
    if isinstance(message, bytes):
        try:
            message = message.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("invalid_json", "messages must be UTF-8 JSON text") from None
    if len(message) > max_bytes:
        raise ProtocolError("message_too_large", f"messages are limited to {max_bytes} bytes")
    try:
        raw = json.loads(message)
    except json.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", f"not JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # huge integers, deep nesting
        raise ProtocolError("invalid_json", f"not acceptable JSON: {type(exc).__name__}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ProtocolError("invalid_event", "an event is a JSON object with a string `type`")
    event_id = raw.get("event_id") if isinstance(raw.get("event_id"), str) else None
    if raw["type"] not in CLIENT_EVENT_TYPES:
        raise ProtocolError("unknown_event", f"unsupported event type {raw['type']!r}; supported: "
                            + ", ".join(CLIENT_EVENT_TYPES), event_id=event_id, param="type")
    try:
        return _CLIENT_EVENT.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None  # drop the discriminator tag
        raise ProtocolError("invalid_value", f"{raw['type']}: {param or 'event'}: {first['msg']}",
                            event_id=event_id, param=param) from None
