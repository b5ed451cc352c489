"""Agent LLM over any OpenAI-compatible /v1/chat/completions endpoint, streamed as SSE.

Works with vLLM, Ollama, llama.cpp's server, LM Studio and hosted APIs. `base_url` is given the
way OpenAI clients take it, e.g. "http://localhost:11434/v1"; "/chat/completions" is appended.
Tools and `tool_choice` pass through in the Chat Completions shape; streamed `tool_calls` deltas
come back as `ToolCallDelta`s.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from engine.agent.llm.base import LLMError, Message, validate_messages
from engine.agent.tools import Tool, ToolCallDelta, ToolChoice, may_call_tools


class OpenAICompatLLM:
    """`ChatLLM` over HTTP. `timeout` bounds connecting and every wait for the next bytes."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"LLM base URL must start with http:// or https://, got {base_url!r}")
        if timeout <= 0:
            raise ValueError("LLM timeout must be > 0 seconds")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"{model}@{base_url}"
        self._api_key = api_key
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session._loop is not loop:
            # A slow server should fail fast between bytes, not only after a total deadline.
            timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def stream_chat(self, messages: Sequence[Message], *, max_tokens: int = 200, temperature: float = 0.7,
                          tools: Sequence[Tool] = (), tool_choice: ToolChoice | None = None,
                          ) -> AsyncIterator[str | ToolCallDelta]:
        body: dict[str, Any] = {"model": self.model, "messages": validate_messages(messages), "stream": True,
                                "max_tokens": max_tokens, "temperature": temperature}
        if may_call_tools(tools, tool_choice):
            body["tools"] = [tool.chat_completions() for tool in tools]
            if tool_choice is not None:
                body["tool_choice"] = tool_choice.chat_completions()
        headers = {"Accept": "text/event-stream"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            async with self._client().post(self.url, json=body, headers=headers) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    raise LLMError(f"LLM endpoint {self.url} answered HTTP {resp.status}: {detail}")
                finished = False
                try:
                    async for delta in _sse_deltas(resp):
                        yield delta
                    finished = True
                finally:
                    if not finished:  # abandoned mid-stream: drop the connection so the server stops
                        resp.close()
        except LLMError:
            raise
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise LLMError(f"LLM endpoint {self.url} timed out (no data for {self.timeout:g} s)") from exc
        except aiohttp.ClientError as exc:
            raise LLMError(f"cannot reach LLM endpoint {self.url}: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _sse_deltas(resp: aiohttp.ClientResponse) -> AsyncIterator[str | ToolCallDelta]:
    """Content and tool-call deltas from an OpenAI chat-completions event stream."""
    finished = False  # some servers end with a finish_reason but no [DONE]
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue  # comments, event names, keep-alives, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        try:
            event = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise LLMError(f"LLM endpoint sent malformed stream data: {payload[:120]!r}") from exc
        if event.get("error"):
            raise LLMError(f"LLM endpoint reported an error: {event['error']}")
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                yield delta["content"]
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                yield ToolCallDelta(index=int(call.get("index", 0)), name=function.get("name") or None,
                                    call_id=call.get("id") or None, arguments=function.get("arguments") or "")
            finished = finished or bool(choice.get("finish_reason"))
    if not finished:
        raise LLMError("LLM endpoint closed the stream before [DONE]")
