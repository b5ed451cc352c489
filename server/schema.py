"""Wire messages: the RunPod job input (the original endpoint's field names and defaults),
upstream Fish Speech's ServeTTSRequest, and the error shapes both APIs answer with."""
from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal

import yarl
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

AudioFormat = Literal["wav", "mp3", "flac", "pcm", "opus"]
MAX_POLICY_MS = 7 * 24 * 3600 * 1000
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


class RequestError(Exception):
    """A request we refuse, with the HTTP status to answer (400, 404, 413, 415, 503, ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def job_error_body(message: str) -> dict[str, Any]:
    """The job API's error body; the original guide's `safe_request` reads output.error."""
    return {"error": message, "output": {"status": "error", "error": message}}


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def decode_base64_audio(value: str, field: str, max_bytes: int) -> bytes:
    """Base64 (or a data: URL) -> bytes, with 400 for bad base64 and 413 over the size limit."""
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = "".join(text.split())  # line-wrapped base64 is common
    if len(text) * 3 // 4 > max_bytes + 3:
        raise RequestError(413, f"{field} is about {len(text) * 3 // 4} bytes; the limit is {max_bytes} bytes")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"{field} is not valid base64: {exc}") from None
    if not data:
        raise RequestError(400, f"{field} is empty")
    if len(data) > max_bytes:
        raise RequestError(413, f"{field} is {len(data)} bytes; the limit is {max_bytes} bytes")
    return data


def _on_off(value: Any) -> Any:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("on", "true", "1", "yes"):
            return True
        if low in ("off", "false", "0", "no"):
            return False
    return value


class JobInput(BaseModel):
    """`input` of a job, as the original RunPod endpoint documented it (plus a few extensions)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False, allow_inf_nan=False)

    message: str | None = None  # agent mode: what the user says
    text: str | None = None  # TTS mode: what to speak
    reference_text: str | None = None  # transcript of system_audio
    system_message: str | None = None  # agent mode: the assistant's instructions
    tts: bool | None = None  # True = speak `text`, False = agent reply; None = the server's MODE
    system_audio: str | None = None  # base64 reference audio (any common format)
    streaming: bool = True  # chunks appear on /stream as they are produced
    format: AudioFormat = "wav"
    conversation_id: str | None = Field(None, max_length=256)
    temperature: float = Field(0.7, gt=0.0, le=2.0)
    top_p: float = Field(0.7, gt=0.0, le=1.0)
    chunk_length: int = Field(200, ge=50, le=1000)
    max_new_tokens: int = Field(0, ge=0, le=8192)  # per text chunk; 0 = until the model stops
    repetition_penalty: float = Field(1.2, ge=0.5, le=2.0)
    normalize: bool = True
    use_memory_cache: bool = True
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    # extensions
    reference_id: str | None = None  # a named voice from /v1/references
    user_audio: str | None = None  # agent mode: base64 audio of what the user said (transcribed by ASR)
    top_k: int = Field(30, ge=1, le=4096)
    max_tokens: int | None = Field(None, ge=1, le=4096)  # agent mode: reply length in LLM tokens

    @field_validator("use_memory_cache", mode="before")
    @classmethod
    def _cache_flag(cls, value: Any) -> Any:
        return _on_off(value)

    @field_validator("format", mode="before")
    @classmethod
    def _format_any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("message", "text", "reference_text", "system_message", "conversation_id", "reference_id",
                     "system_audio", "user_audio", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


class JobPolicy(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # ms; bounded so that no value overflows when converted to seconds (a week is far past any job)
    executionTimeout: int | None = Field(None, ge=1000, le=MAX_POLICY_MS)
    ttl: int | None = Field(None, ge=1000, le=MAX_POLICY_MS)  # ms; accepted for compatibility
    lowPriority: bool = False


class JobRequest(BaseModel):
    """The body of /run and /runsync."""

    model_config = ConfigDict(extra="ignore")

    input: dict[str, Any]
    webhook: str | None = None  # POSTed the job's /status body when it ends
    policy: JobPolicy | None = None

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        url = yarl.URL(value.strip())
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("webhook must be an http:// or https:// URL")
        return str(url)


class ServeReference(BaseModel):
    model_config = ConfigDict(extra="ignore")

    audio: bytes
    text: str

    @field_validator("audio", mode="before")
    @classmethod
    def _base64_in_json(cls, value: Any) -> Any:
        # JSON bodies carry the audio as base64; msgpack bodies carry raw bytes.
        if isinstance(value, str):
            return decode_base64_audio(value, "references[].audio", 1 << 62)
        return value


class ServeTTSRequest(BaseModel):
    """Upstream Fish Speech's /v1/tts body (defaults of its current HTTP server)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    text: str
    chunk_length: int = Field(200, ge=50, le=1000)
    format: AudioFormat = "wav"
    latency: str = "normal"  # a hosted-API option; accepted and ignored
    references: list[ServeReference] = []
    reference_id: str | None = None
    seed: int | None = Field(None, ge=0)
    use_memory_cache: bool = False  # upstream's "on" / "off"
    normalize: bool = True
    streaming: bool = False
    max_new_tokens: int = Field(1024, ge=0, le=8192)
    top_p: float = Field(0.8, ge=0.1, le=1.0)
    repetition_penalty: float = Field(1.1, ge=0.9, le=2.0)
    temperature: float = Field(0.8, ge=0.1, le=1.0)

    @field_validator("use_memory_cache", mode="before")
    @classmethod
    def _cache_flag(cls, value: Any) -> Any:
        return _on_off(value)

    @field_validator("reference_id", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value
