"""The transport-free conversation pipeline (agent mode and realtime TTS mode).

    session.py    ConversationSession: configuration, history, the public API
    turns.py      user turns: VAD or manual commits -> transcripts, in spoken order
    responses.py  responses one at a time: LLM/TTS out, cancel and barge-in
    playout.py    one response's audio schedule: what was heard, timings
    history.py    the chat history as heard
    events.py     the typed events and audio a session yields
    outputs.py    the ordered output stream
"""
from engine.agent.conversation.events import (INPUT_SAMPLE_RATE, AudioClear, AudioOut,  # noqa: F401
                                              ConversationError, ConversationEvent, Output, TurnDetection)
from engine.agent.conversation.session import DEFAULT_INSTRUCTIONS, ConversationSession  # noqa: F401
from engine.agent.smart_turn import SemanticTurnDetection  # noqa: F401 - semantic_vad, beside TurnDetection
