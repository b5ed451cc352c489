"""The one interface both agent LLM backends implement: chat messages in, streamed text out."""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from engine.agent.tools import Tool, ToolCallDelta, ToolChoice

Message = Mapping[str, Any]  # {"role": "system"|"user"|"assistant"|"tool", "content": str, ...}
ROLES = ("system", "user", "assistant", "tool")


class LLMError(RuntimeError):
    """The agent LLM failed: unreachable, timed out, refused the request or broke mid-stream."""


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """How replies are generated. Voice replies should be short, so the defaults are too."""

    max_tokens: int = 200
    temperature: float = 0.7
    history_window: int = 20  # most recent history messages sent along (the system prompt always is)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if self.history_window < 1:
            raise ValueError("history_window must be >= 1")


@runtime_checkable
class ChatLLM(Protocol):
    """Streams the assistant's reply to `messages` as text deltas.

    With `tools` (and a `tool_choice` other than "none") a backend may also yield `ToolCallDelta`s:
    the calls the model makes, in the Chat Completions sense (text, then calls, is allowed).

    Closing the iterator (aclose, or cancelling the task iterating it) stops generation promptly.
    Failures raise `LLMError` with a message fit for a user.
    """

    name: str

    def stream_chat(self, messages: Sequence[Message], *, max_tokens: int = 200, temperature: float = 0.7,
                    tools: Sequence["Tool"] = (), tool_choice: "ToolChoice | None" = None,
                    ) -> AsyncIterator["str | ToolCallDelta"]: ...

    async def aclose(self) -> None: ...


def validate_messages(messages: Sequence[Message], *, allow_empty: bool = False) -> list[dict[str, Any]]:
    """Plain {"role", "content"} dicts (plus `tool_calls` on assistant messages and `tool_call_id`
    on tool results, in the Chat Completions shape), or a clear error for anything else."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {dict(m)!r}")
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = [dict(call) for call in m["tool_calls"]]
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ValueError(f"message {i}: a tool message needs a string 'tool_call_id'")
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    if not out and not allow_empty:
        raise ValueError("no messages to answer: the conversation is empty and there are no instructions")
    return out


def build_messages(instructions: str, history: Sequence[Message], window: int = 20) -> list[dict[str, Any]]:
    """System prompt + the most recent `window` history messages (never starting on a tool result,
    which would have lost the call it answers)."""
    recent = list(history)[-window:]
    while recent and recent[0].get("role") == "tool":
        recent.pop(0)
    msgs = [{"role": "system", "content": instructions}] if instructions.strip() else []
    # An empty conversation with instructions is a greeting (a bot that speaks first, as OpenAI
    # allows); with neither there is nothing to answer.
    return msgs + validate_messages(recent, allow_empty=bool(msgs))
