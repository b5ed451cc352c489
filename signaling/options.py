"""Session options for a call: from the offer's query string, the multipart `session` field and
`session.update` events, in the OpenAI Realtime shapes (GA and beta) plus a few extensions.

Accepted session fields:
  `mode` ("agent" | "tts", our extension), `instructions`, `voice` / `audio.output.voice` /
  `reference_id` (a reference voice id), `turn_detection` / `audio.input.turn_detection`
  (`server_vad` parameters, `semantic_vad` with `eagerness`, or null for manual turns; a type-less
  object keeps the current type), `max_output_tokens` and `temperature`
  (the agent LLM), `sampling` (TTS sampling: temperature, top_p, top_k, repetition_penalty,
  max_new_tokens, seed; our extension).
Query parameters carry the same, flattened: mode, voice, instructions,
turn_detection=none|server_vad|semantic_vad, threshold (or vad_threshold), prefix_padding_ms,
silence_duration_ms, eagerness, create_response, interrupt_response, and the sampling names.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from engine.agent.conversation import SemanticTurnDetection, TurnDetection
from engine.agent.smart_turn import EAGERNESS
from engine.agent.tools import Tool, ToolChoice, ToolConfigError, parse_tool_choice, parse_tools
from engine.speech.types import Reference, SamplingOptions
from signaling.audio_formats import AudioFormat

if TYPE_CHECKING:
    from signaling.host import RealtimeModels

KEEP = "keep"
_SAMPLING_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float,
                    "max_new_tokens": int, "seed": int}
_TURN_FIELDS = {"threshold": float, "prefix_padding_ms": int, "silence_duration_ms": int,
                "create_response": bool, "interrupt_response": bool}
_SEMANTIC_FIELDS = {"create_response": bool, "interrupt_response": bool}
_BOUNDS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "top_k": (1, 4096), "repetition_penalty": (0.5, 3.0),
           "max_new_tokens": (0, 8192), "threshold": (0.0, 1.0), "prefix_padding_ms": (0, 5000),
           "silence_duration_ms": (0, 10_000)}
MAX_INSTRUCTIONS_CHARS = 8000
# OpenAI's built-in voice names: clients written for OpenAI send them; without a reference voice of
# that name they mean "the default voice" here, rather than an error (a base-URL change should work).
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
                           "verse", "marin", "cedar"})


class OptionsError(ValueError):
    """A session option with a bad value; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclasses.dataclass
class SessionOptions:
    """A partial update: None (or KEEP for turn detection) leaves a setting unchanged."""

    mode: Literal["agent", "tts"] | None = None
    voice_id: str | None = None
    instructions: str | None = None
    turn_detection: TurnDetection | SemanticTurnDetection | None | Literal["keep"] = KEEP
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_output_tokens: int | None = None
    llm_temperature: float | None = None
    voice_echo: Any = None  # the voice as the client wrote it (a name, or {"id": ...}), reported back
    input_format: AudioFormat | None = None  # WebSocket sessions: the audio the client appends
    output_format: AudioFormat | None = None  # WebSocket sessions: the audio deltas it gets
    output_modalities: tuple[str, ...] | None = None  # ("audio",) or ("text",)
    model: str | None = None  # any name; reported back, the loaded checkpoint answers
    tools: tuple[Tool, ...] | None = None  # function tools (schemas checked)
    tool_choice: ToolChoice | None = None  # a named choice is checked against the tools when applied

    def merged(self, later: SessionOptions) -> SessionOptions:
        """These options, overridden by `later` wherever it sets something."""
        out = dataclasses.replace(self, sampling={**self.sampling, **later.sampling})
        for field in ("mode", "voice_id", "instructions", "max_output_tokens", "llm_temperature", "voice_echo",
                      "input_format", "output_format", "output_modalities", "model", "tools", "tool_choice"):
            if getattr(later, field) is not None:
                setattr(out, field, getattr(later, field))
        if later.turn_detection != KEEP:
            out.turn_detection = later.turn_detection
        return out


def _coerce(param: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        else:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
    except (TypeError, ValueError):
        raise OptionsError(param, f"expected {kind.__name__}, got {value!r}") from None
    if param in _BOUNDS:
        low, high = _BOUNDS[param]
        if not low <= out <= high:
            raise OptionsError(param, f"must be within [{low}, {high}], got {out}")
    return out


def _turn_detection(value: Any, base: TurnDetection | SemanticTurnDetection,
                    param: str) -> TurnDetection | SemanticTurnDetection | None:
    """An update applies to `base` (the current setting) when it keeps its type; a new type starts
    from that type's defaults."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise OptionsError(param, "must be an object or null")
    kind = value.get("type", "semantic_vad" if isinstance(base, SemanticTurnDetection) else "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise OptionsError(f"{param}.type", f"'server_vad', 'semantic_vad' or null (manual turns), got {kind!r}")
    if kind == "semantic_vad":
        start = base if isinstance(base, SemanticTurnDetection) else SemanticTurnDetection()
        changes = {k: _coerce(k, value[k], t) for k, t in _SEMANTIC_FIELDS.items() if value.get(k) is not None}
        if value.get("eagerness") is not None:
            if value["eagerness"] not in EAGERNESS:
                raise OptionsError(f"{param}.eagerness", f"must be one of {', '.join(map(repr, EAGERNESS))}, "
                                                         f"got {value['eagerness']!r}")
            changes["eagerness"] = value["eagerness"]
        return dataclasses.replace(start, **changes)
    start = base if isinstance(base, TurnDetection) else TurnDetection()
    changes = {k: _coerce(k, value[k], t) for k, t in _TURN_FIELDS.items() if value.get(k) is not None}
    return dataclasses.replace(start, **changes)


def _mode(value: Any) -> Literal["agent", "tts"]:
    if value not in ("agent", "tts"):
        raise OptionsError("mode", f"must be 'agent' or 'tts', got {value!r}")
    return value


def _text(param: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise OptionsError(param, "must be a string")
    if len(value) > limit:
        raise OptionsError(param, f"is limited to {limit} characters")
    return value


def from_session(session: Mapping[str, Any],
                 current: TurnDetection | SemanticTurnDetection | None = None) -> SessionOptions:
    """A `session` object (session.update, or the multipart `session` field) -> options."""
    if not isinstance(session, Mapping):
        raise OptionsError("session", "must be a JSON object")
    out = SessionOptions()
    if session.get("mode") is not None:
        out.mode = _mode(session["mode"])
    if session.get("instructions") is not None:
        out.instructions = _text("instructions", session["instructions"], MAX_INSTRUCTIONS_CHARS)
    audio = session.get("audio") if isinstance(session.get("audio"), Mapping) else {}
    output = audio.get("output") if isinstance(audio.get("output"), Mapping) else {}
    inputs = audio.get("input") if isinstance(audio.get("input"), Mapping) else {}
    for param, holder, key in (("reference_id", session, "reference_id"), ("voice", session, "voice"),
                               ("audio.output.voice", output, "voice")):
        value = holder.get(key)
        if value is not None:
            out.voice_echo = value
            if isinstance(value, Mapping):  # GA custom voice: {"id": "<reference id>"}
                value = value.get("id")
            out.voice_id = _text(param, value, 200).strip() or None
    for param, holder, key, attr in (("audio.input.format", inputs, "format", "input_format"),
                                     ("input_audio_format", session, "input_audio_format", "input_format"),
                                     ("audio.output.format", output, "format", "output_format"),
                                     ("output_audio_format", session, "output_audio_format", "output_format")):
        if holder.get(key) is not None:
            try:
                setattr(out, attr, AudioFormat.parse(holder[key]))
            except ValueError as exc:
                raise OptionsError(param, str(exc)) from None
    modalities = session.get("output_modalities", session.get("modalities"))
    if modalities is not None:
        if not isinstance(modalities, list) or not modalities or not set(modalities) <= {"audio", "text"}:
            raise OptionsError("output_modalities", 'must be ["audio"] or ["text"]')
        out.output_modalities = ("audio",) if "audio" in modalities else ("text",)
    if session.get("model") is not None:
        out.model = _text("model", session["model"], 200)
    base = current or TurnDetection()
    for param, holder in (("turn_detection", session), ("audio.input.turn_detection", inputs)):
        if "turn_detection" in holder:
            out.turn_detection = _turn_detection(holder["turn_detection"], base, param)
    sampling = session.get("sampling")
    if sampling is not None:
        if not isinstance(sampling, Mapping):
            raise OptionsError("sampling", "must be an object")
        unknown = set(sampling) - set(_SAMPLING_FIELDS)
        if unknown:
            raise OptionsError("sampling", f"unknown fields {sorted(unknown)}; known: {sorted(_SAMPLING_FIELDS)}")
        out.sampling = {k: _coerce(k, v, _SAMPLING_FIELDS[k]) for k, v in sampling.items() if v is not None}
    tokens = session.get("max_output_tokens", session.get("max_response_output_tokens"))
    if tokens is not None and tokens != "inf":
        out.max_output_tokens = _coerce("max_output_tokens", tokens, int)
        if out.max_output_tokens < 1:
            raise OptionsError("max_output_tokens", "must be >= 1")
    if session.get("temperature") is not None:
        out.llm_temperature = _coerce("temperature", session["temperature"], float)
    try:
        if session.get("tools") is not None:
            out.tools = parse_tools(session["tools"])
        if session.get("tool_choice") is not None:
            out.tool_choice = parse_tool_choice(session["tool_choice"], None)
    except ToolConfigError as exc:
        raise OptionsError(exc.param, str(exc).split(": ", 1)[-1]) from None
    return out


def from_query(query: Mapping[str, str]) -> SessionOptions:
    """The call URL's query parameters -> options (flat names; see the module docstring)."""
    session: dict[str, Any] = {}
    for key in ("mode", "instructions", "voice", "reference_id", "model"):
        if query.get(key):
            session[key] = query[key]
    turn: dict[str, Any] = {}
    if query.get("vad_threshold"):
        turn["threshold"] = query["vad_threshold"]
    for key in (*_TURN_FIELDS, "eagerness"):
        if query.get(key):
            turn[key] = query[key]
    kind = (query.get("turn_detection") or "").lower()
    if kind in ("none", "null", "manual"):
        if turn:
            raise OptionsError("turn_detection", "turn_detection=none cannot be combined with VAD parameters")
        session["turn_detection"] = None
    elif kind or turn:
        session["turn_detection"] = {**turn, "type": kind} if kind else turn
    sampling = {k: query[k] for k in _SAMPLING_FIELDS if query.get(k)}
    if sampling:
        session["sampling"] = sampling
    return from_session(session)


def sampling_options(base: SamplingOptions, overrides: Mapping[str, Any]) -> SamplingOptions:
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


async def resolve_voice(services: "RealtimeModels", voice_id: str) -> tuple[Reference, ...]:
    """A reference voice id -> the references to speak with, via the server's reference store.
    OpenAI's preset voice names mean the default voice unless a saved voice has that name."""
    store = services.references
    if store is None:
        if voice_id.lower() in OPENAI_VOICES:
            return ()
        raise OptionsError("voice", "this server keeps no reference voices")
    try:
        found = store.get_references(voice_id)
        if inspect.isawaitable(found):
            found = await found
    except KeyError:
        found = None
    except ValueError as exc:
        raise OptionsError("voice", str(exc)) from None
    if not found:
        if voice_id.lower() in OPENAI_VOICES:
            return ()
        raise OptionsError("voice", f"unknown reference voice {voice_id!r}")
    refs = (found,) if isinstance(found, Reference) else tuple(found)
    if not all(isinstance(r, Reference) for r in refs):
        raise OptionsError("voice", f"reference voice {voice_id!r} has no usable audio")
    return refs


OPUS = {"type": "audio/opus", "rate": 48000}


def describe_turn_detection(turn: TurnDetection | SemanticTurnDetection | None) -> dict[str, Any] | None:
    """A session's turn detection in the GA shape (`type` first, then that type's parameters)."""
    if turn is None:
        return None
    kind = "semantic_vad" if isinstance(turn, SemanticTurnDetection) else "server_vad"
    return {"type": kind, **dataclasses.asdict(turn)}


def describe(mode: str, voice_id: str | None, instructions: str, turn: TurnDetection | SemanticTurnDetection | None,
             sampling: SamplingOptions, *, session_id: str | None = None, model: str | None = None,
             voice: Any = None, input_format: dict[str, Any] = OPUS, output_format: dict[str, Any] = OPUS,
             output_modalities: tuple[str, ...] = ("audio",)) -> dict[str, Any]:
    """The session as reported in session.created / session.updated (GA shape; `mode` and
    `sampling` are our extensions, also gathered under `fishvoice`)."""
    turn_detection = describe_turn_detection(turn)
    voice = voice if voice is not None else voice_id
    out = {
        "type": "realtime",
        "object": "realtime.session",
        "mode": mode,
        "instructions": instructions,
        "voice": voice,
        "output_modalities": list(output_modalities),
        "audio": {"input": {"format": input_format, "turn_detection": turn_detection,
                            "transcription": {"model": "whisper"}},
                  "output": {"format": output_format, "voice": voice}},
        "turn_detection": turn_detection,
        "sampling": dataclasses.asdict(sampling),
        "fishvoice": {"mode": mode, "reference_id": voice_id, "sampling": dataclasses.asdict(sampling)},
    }
    if session_id is not None:
        out["id"] = session_id
    if model is not None:
        out["model"] = model
    return out
