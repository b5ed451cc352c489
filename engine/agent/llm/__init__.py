"""Agent LLM backends behind one streaming interface (`ChatLLM`), and the factory that picks one."""
from __future__ import annotations

from engine.agent.llm.base import ChatLLM, ChatOptions, LLMError, Message, build_messages, validate_messages


def create_llm(*, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
               timeout: float = 30.0, gguf_path: str | None = None, n_ctx: int = 2048,
               n_threads: int | None = None) -> ChatLLM:
    """An OpenAI-compatible endpoint when `base_url` is set, else the embedded llama.cpp model."""
    if base_url:
        from engine.agent.llm.openai_compat import OpenAICompatLLM

        return OpenAICompatLLM(base_url, model or "default", api_key, timeout)
    from engine.agent.llm.embedded import EmbeddedLLM

    return EmbeddedLLM.load(gguf_path, n_ctx=n_ctx, n_threads=n_threads)


__all__ = ["ChatLLM", "ChatOptions", "LLMError", "Message", "build_messages", "create_llm", "validate_messages"]
