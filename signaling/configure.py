"""A call's conversation: built on the server's loaded models and configured by session options.

`build_conversation` makes the ConversationSession for a new call (mode, reference voice,
instructions, turn detection, TTS sampling, LLM reply length); `apply_options` applies a
`session.update` to a live one, validating everything before anything changes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine.agent.conversation import DEFAULT_INSTRUCTIONS, ConversationSession
from engine.agent.conversation_types import TurnDetection
from engine.agent.llm.base import ChatOptions
from engine.speech.types import SamplingOptions
from signaling.errors import CallError
from signaling.options import OptionsError, SessionOptions, resolve_voice, sampling_options


def _default_mode(services: Any, settings: Any) -> str:
    wanted = getattr(settings, "mode", None) or "agent"
    if wanted == "agent" and getattr(services, "llm", None) is None:
        return "tts"  # a TTS-only server
    return wanted


def _base_sampling(settings: Any) -> SamplingOptions:
    base = getattr(settings, "realtime_sampling", None)
    return base if isinstance(base, SamplingOptions) else SamplingOptions()


async def build_conversation(services: Any, settings: Any, options: SessionOptions) -> ConversationSession:
    """A ConversationSession on the server's loaded models, configured by the call's options."""
    asr, vad = getattr(services, "asr", None), getattr(services, "vad", None)
    if asr is None or vad is None:
        if getattr(services, "loading", False):
            raise CallError(503, "not_ready", "the models are still loading; retry shortly")
        raise CallError(503, "not_ready", "realtime calls need the ASR and VAD models, which are not loaded")
    tts, llm = getattr(services, "tts", None), getattr(services, "llm", None)
    mode = options.mode or _default_mode(services, settings)
    if mode == "agent" and llm is None:
        raise CallError(400, "no_agent", "agent mode needs an agent LLM and none is configured; use mode=tts",
                        param="mode")
    if mode == "tts" and tts is None:
        raise CallError(503, "not_ready", "TTS mode needs the TTS model, which is not loaded", param="mode")
    try:
        voice = await resolve_voice(services, options.voice_id) if options.voice_id else ()
        turn = TurnDetection() if options.turn_detection == "keep" else options.turn_detection
        return ConversationSession(
            tts=tts, asr=asr, llm=llm, vad_model=vad, mode=mode, voice=voice,  # type: ignore[arg-type]
            instructions=options.instructions or getattr(settings, "instructions", None) or DEFAULT_INSTRUCTIONS,
            turn_detection=turn, sampling=sampling_options(_base_sampling(settings), options.sampling),
            chat=_chat_options(_base_chat(settings), options))
    except OptionsError as exc:
        raise CallError(400, "invalid_value", str(exc), param=exc.param) from None
    except ValueError as exc:
        raise CallError(400, "invalid_value", str(exc)) from None


def _base_chat(settings: Any) -> ChatOptions:
    max_tokens = getattr(settings, "llm_max_tokens", None)
    return ChatOptions(max_tokens=int(max_tokens)) if max_tokens else ChatOptions()


def _chat_options(base: ChatOptions, options: SessionOptions) -> ChatOptions:
    changes: dict[str, Any] = {}
    if options.max_output_tokens is not None:
        changes["max_tokens"] = options.max_output_tokens
    if options.llm_temperature is not None:
        changes["temperature"] = options.llm_temperature
    return dataclasses.replace(base, **changes) if changes else base


async def apply_options(conv: ConversationSession, options: SessionOptions, services: Any) -> None:
    """A session.update on a live conversation (validated before anything changes)."""
    voice = await resolve_voice(services, options.voice_id) if options.voice_id else None
    sampling = sampling_options(conv.sampling, options.sampling) if options.sampling else None
    chat = _chat_options(conv.chat, options)
    conv.update(mode=options.mode, voice=voice, instructions=options.instructions,
                turn_detection=options.turn_detection, sampling=sampling,
                chat=chat if chat is not conv.chat else None)
