"""A call's conversation: built on the server's loaded models and configured by session options.

`build_conversation` makes the ConversationSession for a new call (mode, reference voice,
instructions, turn detection, TTS sampling, LLM reply length); `apply_options` applies a
`session.update` to a live one, validating everything before anything changes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from engine.agent.conversation import DEFAULT_INSTRUCTIONS, ConversationSession, SemanticTurnDetection, TurnDetection
from engine.agent.llm.base import ChatOptions
from engine.agent.tools import AUTO, ToolConfigError
from signaling.errors import CallError
from signaling.host import RealtimeConfig, RealtimeModels
from signaling.options import OptionsError, SessionOptions, resolve_voice, sampling_options


def _default_mode(services: RealtimeModels, config: RealtimeConfig) -> str:
    if config.mode == "agent" and services.llm is None:
        return "tts"  # a TTS-only server
    return config.mode


async def build_conversation(services: RealtimeModels, config: RealtimeConfig,
                             options: SessionOptions) -> ConversationSession:
    """A ConversationSession on the server's loaded models, configured by the session's options."""
    asr, vad = services.asr, services.vad
    if asr is None or vad is None:
        if services.loading:
            raise CallError(503, "not_ready", "the models are still loading; retry shortly")
        raise CallError(503, "not_ready", "realtime calls need the ASR and VAD models, which are not loaded")
    tts, llm = services.tts, services.llm
    mode = options.mode or _default_mode(services, config)
    if mode == "agent" and llm is None:
        raise CallError(400, "no_agent", "agent mode needs an agent LLM and none is configured; use mode=tts",
                        param="mode")
    if mode == "tts" and tts is None:
        raise CallError(503, "not_ready", "TTS mode needs the TTS model, which is not loaded", param="mode")
    try:
        voice = await resolve_voice(services, options.voice_id) if options.voice_id else ()
        turn = options.turn_detection
        if turn == "keep":
            turn = config.turn_detection or TurnDetection()  # the server's default
        _check_semantic(turn, services)
        base_chat = ChatOptions(max_tokens=config.llm_max_tokens) if config.llm_max_tokens else ChatOptions()
        return ConversationSession(
            tts=tts, asr=asr, llm=llm, vad_model=vad, smart_turn=services.smart_turn,  # type: ignore[arg-type]
            mode=mode, voice=voice,
            instructions=options.instructions or config.instructions or DEFAULT_INSTRUCTIONS,
            turn_detection=turn, sampling=sampling_options(config.sampling, options.sampling),
            chat=_chat_options(base_chat, options), tools=options.tools or (),
            tool_choice=options.tool_choice or AUTO, speculate=config.speculative_replies,
            on_speculation=config.observe_speculation)
    except (OptionsError, ToolConfigError) as exc:
        raise CallError(400, "invalid_value", str(exc), param=exc.param) from None
    except ValueError as exc:
        raise CallError(400, "invalid_value", str(exc)) from None


def _check_semantic(turn: Any, services: RealtimeModels) -> None:
    if isinstance(turn, SemanticTurnDetection) and services.smart_turn is None:
        reason = "still loading; retry shortly" if services.loading else "not loaded"
        raise OptionsError("turn_detection", f"semantic_vad needs the Smart Turn model, which is {reason}")


def _chat_options(base: ChatOptions, options: SessionOptions) -> ChatOptions:
    changes: dict[str, Any] = {}
    if options.max_output_tokens is not None:
        changes["max_tokens"] = options.max_output_tokens
    if options.llm_temperature is not None:
        changes["temperature"] = options.llm_temperature
    return dataclasses.replace(base, **changes) if changes else base


async def apply_options(conv: ConversationSession, options: SessionOptions, services: RealtimeModels) -> None:
    """A session.update on a live conversation (validated before anything changes)."""
    if options.turn_detection != "keep":
        _check_semantic(options.turn_detection, services)
    voice = await resolve_voice(services, options.voice_id) if options.voice_id else None
    sampling = sampling_options(conv.sampling, options.sampling) if options.sampling else None
    chat = _chat_options(conv.chat, options)
    conv.update(mode=options.mode, voice=voice, instructions=options.instructions,
                turn_detection=options.turn_detection, sampling=sampling,
                chat=chat if chat is not conv.chat else None, tools=options.tools, tool_choice=options.tool_choice)
