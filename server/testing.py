"""A live server in a background thread, for tests, benchmarks and examples.

Synchronous client code (requests, the `runpod` package, the original guide's examples) can
call it from the main thread while the server runs its own event loop on loopback.

    with LiveServer(Settings(mode="tts", data_dir=tmp), Services(tts=engine)) as server:
        requests.post(server.url + "/runsync", json={"input": {"text": "Hi"}})
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from server.app import create_app
from server.services import Services
from server.settings import Settings


class LiveServer:
    def __init__(self, settings: Settings, services: Services | None = None, host: str = "127.0.0.1") -> None:
        self.settings = settings
        self.services = services
        self.host = host
        self.url = ""
        self.app: web.Application | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 120.0) -> LiveServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())  # type: ignore[union-attr]
            loop.close()

        self._thread = threading.Thread(target=serve, name="live-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the server did not start in time")
        if failure:
            raise failure[0]
        return self

    async def _start(self) -> None:
        self.app = create_app(self.settings, self.services)
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}"

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's loop (to inspect or poke its state)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop = None

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
