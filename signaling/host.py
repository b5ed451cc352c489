"""What the realtime transports need from the server that hosts them, declared once.

`RealtimeModels` is the loaded-model holder (the server's `Services` satisfies it); any model may
be None when it is not loaded. `RealtimeConfig` is the part of the server's configuration that
realtime sessions read, built by the server from its settings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

from engine.speech.types import SamplingOptions

if TYPE_CHECKING:
    from engine.agent.asr import Transcriber
    from signaling.server_tools import ServerTools
    from engine.agent.llm.base import ChatLLM
    from engine.agent.smart_turn import SemanticTurnDetection, SmartTurn
    from engine.agent.vad import SileroVAD, TurnDetection
    from engine.speech.types import Reference, SpeechSynthesizer


class ReferenceLookup(Protocol):
    """Named reference voices (the server's ReferenceStore)."""

    def get_references(self, reference_id: str) -> "tuple[Reference, ...]": ...


class RealtimeModels(Protocol):
    tts: "SpeechSynthesizer | None"
    asr: "Transcriber | None"
    vad: "SileroVAD | None"
    smart_turn: "SmartTurn | None"  # semantic_vad's end-of-turn model
    llm: "ChatLLM | None"
    references: ReferenceLookup | None
    loading: bool  # models are still being loaded: a missing one is a retryable 503


@dataclasses.dataclass(frozen=True)
class CallLimits:
    liveness_timeout: float = 6.0  # seconds without a packet from the peer -> gone
    connect_timeout: float = 20.0  # seconds from the answer to an established connection
    check_interval: float = 0.5
    max_call_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class TelephonyConfig:
    """Phone calls through carrier media streams (signaling.telephony)."""

    twilio_auth_token: str | None = None  # when set, Twilio webhooks must carry a valid X-Twilio-Signature
    webhook_key: str | None = None  # when set, Telnyx/Plivo webhooks must carry ?key=<this>
    public_url: str | None = None  # how carriers reach this server (https://voice.example.com); else the Host seen
    token_secret: str | None = None  # signs stream tokens; None: a random secret per process
    token_ttl: float = 60.0  # seconds a webhook's stream token stays valid
    liveness_timeout: float = 5.0  # seconds without any message from the carrier -> the call is over
    tools: "ServerTools | None" = None  # tools the server runs itself through webhooks (TELEPHONY_TOOLS)


@dataclasses.dataclass(frozen=True)
class RealtimeConfig:
    api_key: str | None = None  # Authorization: Bearer KEY on every realtime route when set
    cors_origins: tuple[str, ...] = ()  # "*" or exact origins
    ice_servers: tuple[Any, ...] = ()  # STUN/TURN URLs or {urls, username, credential}
    max_sessions: int = 8  # concurrent realtime sessions, all transports together
    mode: Literal["agent", "tts"] = "agent"  # the default for sessions that do not choose
    instructions: str | None = None  # the agent's default system prompt
    llm_max_tokens: int | None = None
    sampling: SamplingOptions = SamplingOptions()  # TTS sampling a session starts from
    # The turn detection a session starts with (None: server_vad's defaults).
    turn_detection: "TurnDetection | SemanticTurnDetection | None" = None
    speculative_replies: bool = True  # replies started from a turn's pause transcript (see ConversationSession)
    limits: CallLimits = CallLimits()
    model_name: str = "fish-speech"  # what sessions report as their model
    telephony: TelephonyConfig = TelephonyConfig()
    # Called with each finished response's stage latencies in ms (transcript, first_token, first_audio).
    observe_latency: Callable[[Mapping[str, float]], None] | None = None
    # Called with (tool name, outcome, seconds) for each tool call the server runs (signaling.tool_executor).
    observe_tool_run: Callable[[str, str, float], None] | None = None
    # Called with each speculative reply's outcome: "started", "adopted" or "dropped" (ConversationSession).
    observe_speculation: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        origins = self.cors_origins
        if isinstance(origins, str):
            origins = origins.split(",")
        object.__setattr__(self, "cors_origins",
                           tuple(o.strip().rstrip("/") for o in origins or () if o and o.strip()))
        object.__setattr__(self, "ice_servers", tuple(self.ice_servers or ()))
