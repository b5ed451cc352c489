"""The TTS engine in a child process, so that model compute never waits for the server's GIL.

In one process the model worker thread and the asyncio loop (every call's RTP, Opus and VAD)
share one interpreter lock. A frame step is thousands of small torch ops, and each one takes the
lock back after its kernel; whenever the loop holds it, the worker waits. Measured on the tiny
model: a Python thread busy 40 % of the time made one batched frame step 14 → 25 ms, and a 2-core
server never went past ~1.1 cores however many calls it had.

`TTSProcess` is a `SpeechSynthesizer` like `TTSEngine`; it runs a `TTSEngine` in a spawned child
and moves only requests, audio chunks and codes across a pipe. A child that dies (killed, out of
memory) fails the requests in flight with `TTSProcessError` and is started again; the server
and its other sessions carry on.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from engine.speech.types import AudioChunk, TTSRequest, synthesize_whole
from engine.speech.text import speakable_chunks

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 900.0  # a full checkpoint on a slow disk (or a first download) takes minutes
RESTART_DELAYS_S = (0.5, 2.0, 10.0, 30.0)  # between attempts to bring a dead child back; then every 30 s
_END = "end"


class TTSProcessError(RuntimeError):
    """The TTS process could not start, or died while serving a request."""


class TTSProcess:
    """Implements `engine.speech.types.SpeechSynthesizer` with a `TTSEngine` in a child process.

    `load_kwargs` are `TTSEngine.load`'s arguments; the constructor returns once the child has
    loaded the model, and raises `TTSProcessError` with the child's reason if it could not."""

    def __init__(self, load_kwargs: dict[str, Any], ready_timeout: float = READY_TIMEOUT_S) -> None:
        self._load_kwargs = dict(load_kwargs)
        self._ready_timeout = ready_timeout
        self._context = multiprocessing.get_context("spawn")  # fork would copy the loop's threads
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._closed = False
        self._up = threading.Event()
        self.restarts = 0
        self._conn, self._process, self._facts = self._spawn()
        self._up.set()
        self._start_reader()

    # --- facts the transports read
    @property
    def sample_rate(self) -> int:
        return self._facts["sample_rate"]

    @property
    def num_codebooks(self) -> int:
        return self._facts["num_codebooks"]

    @property
    def facts(self) -> dict[str, Any]:
        """What the child loaded: sample_rate, num_codebooks, quantize, device, family, decode_slots."""
        return dict(self._facts)

    @property
    def active_requests(self) -> int:
        return len(self._streams)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        """The child's exit code once it has ended (0 after a clean `close`), else None."""
        return self._process.exitcode

    def prepare_text(self, request: TTSRequest) -> list[str]:
        return speakable_chunks(request)

    # --- requests
    async def stream(self, request: TTSRequest) -> AsyncIterator[AudioChunk]:
        self.prepare_text(request)  # refuse unspeakable text here, as the in-process engine does
        rid = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        ended = False
        try:
            self._send(("stream", rid, request))
            while True:
                item = await queue.get()
                if item is _END:
                    ended = True
                    return
                if isinstance(item, BaseException):
                    ended = True  # the child sends its end after the error; nothing to cancel
                    raise item
                yield item
        finally:
            self._streams.pop(rid, None)
            if not ended:  # the consumer stopped early: stop the model work for it
                self._send_quietly(("cancel", rid))

    async def synthesize(self, request: TTSRequest) -> np.ndarray:
        return await synthesize_whole(self, request)

    async def encode_reference(self, audio: bytes, *, use_memory_cache: bool = True,
                               pcm: np.ndarray | None = None) -> np.ndarray:
        return await self._call("encode", audio, use_memory_cache, pcm)

    async def child_status(self) -> dict[str, Any]:
        """What the child's engine is doing: {"pid", "active_requests"} (the model jobs still
        running there, which a cancelled stream must not leave behind)."""
        return await self._call("status")

    async def _call(self, kind: str, *args: Any) -> Any:
        rid = next(self._ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls[rid] = future
        try:
            self._send((kind, rid, *args))
        except BaseException:
            self._calls.pop(rid, None)
            raise
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self._send_quietly(("close",))  # before marking it closed, which refuses every send
        self._closed = True
        self._up.clear()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._conn.close()
        self._fail_all(TTSProcessError("the TTS engine is closed"))

    # --- the pipe
    def _send(self, message: tuple) -> None:
        if not self._up.is_set():
            raise TTSProcessError("the TTS engine is closed" if self._closed
                                  else "the TTS process is restarting; retry shortly")
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:  # the child went away between the check and the send
            raise TTSProcessError(f"the TTS process is not reachable: {exc}") from exc

    def _send_quietly(self, message: tuple) -> None:
        try:
            self._send(message)
        except TTSProcessError:
            pass

    def _start_reader(self) -> None:
        threading.Thread(target=self._read, args=(self._conn, self._process), name="tts-process-reader",
                         daemon=True).start()

    def _read(self, conn: Connection, process) -> None:
        """Deliver the child's messages until its end of the pipe closes."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # one message that does not unpickle: drop it, keep the pipe
                log.exception("a message from the TTS process could not be read")
                continue
            try:
                self._deliver(message)
            except Exception:
                log.exception("delivering a message from the TTS process failed")
        self._child_gone(process)

    def _deliver(self, message: tuple) -> None:
        kind, rid, *rest = message
        if kind in ("chunk", "error", _END):
            target = self._streams.get(rid)
            if target is not None:
                item = _END if kind == _END else rest[0]
                _put(target, item)
        elif kind in ("result", "raised"):
            future = self._calls.pop(rid, None)
            if future is not None and not future.done():
                if kind == "result":
                    future.set_result(rest[0])
                else:
                    future.set_exception(rest[0])

    def _fail_all(self, exc: BaseException) -> None:
        for target in list(self._streams.values()):
            _put(target, exc)
        for rid in list(self._calls):
            future = self._calls.pop(rid, None)
            if future is not None and not future.done():
                future.set_exception(exc)

    def _child_gone(self, process) -> None:
        if self._closed:
            return
        self._up.clear()
        process.join(timeout=5)
        log.error("the TTS process exited unexpectedly (exit code %s); restarting it", process.exitcode)
        self._fail_all(TTSProcessError(f"the TTS process exited unexpectedly (exit code {process.exitcode}); "
                                       "it is being restarted"))
        for attempt in itertools.count():
            if self._closed:
                return
            time.sleep(RESTART_DELAYS_S[min(attempt, len(RESTART_DELAYS_S) - 1)])
            try:
                conn, new_process, facts = self._spawn()
            except TTSProcessError as exc:
                log.error("restarting the TTS process failed: %s", exc)
                continue
            if self._closed:  # closed while it was loading
                conn.close()
                new_process.kill()
                return
            self._conn, self._process, self._facts = conn, new_process, facts
            self.restarts += 1
            self._up.set()
            self._start_reader()
            log.info("the TTS process is back (pid %s)", new_process.pid)
            return

    def _spawn(self) -> tuple[Connection, Any, dict[str, Any]]:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(target=child_main, args=(theirs, self._load_kwargs, log.getEffectiveLevel()),
                                        name="tts-engine", daemon=True)
        process.start()
        theirs.close()  # the child holds its own copy: EOF here means the child is gone
        try:
            if not ours.poll(self._ready_timeout):
                raise TTSProcessError(f"the TTS process did not load its model within {self._ready_timeout:.0f} s")
            kind, info = ours.recv()
        except (EOFError, OSError):
            process.join(timeout=5)
            raise TTSProcessError(f"the TTS process exited while loading (exit code {process.exitcode})") from None
        except TTSProcessError:
            process.kill()
            raise
        if kind != "ready":
            process.join(timeout=5)
            raise TTSProcessError(info)
        return ours, process, info


def _put(target: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item: object) -> None:
    loop, queue = target
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # that request's loop is closed: nobody is listening any more
        pass


# ---------------------------------------------------------------------------- the child
def child_main(conn: Connection, load_kwargs: dict[str, Any], log_level: int = logging.WARNING) -> None:
    """The child's entry point: load the engine, say so, then serve requests until told to stop
    or until the parent's end of the pipe closes (the parent died)."""
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when the child stops
    # (its close, or the pipe closing when it dies), never the child on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s tts-process %(levelname)s %(name)s: %(message)s")
    from engine.speech.tts import TTSEngine

    try:
        engine = TTSEngine.load(**load_kwargs)
    except BaseException as exc:  # noqa: BLE001 - the reason goes to the parent, which reports it
        conn.send(("failed", str(exc) or type(exc).__name__))
        return
    models = engine.models
    conn.send(("ready", {"sample_rate": engine.sample_rate, "num_codebooks": engine.num_codebooks,
                         "quantize": models.quantize, "device": str(models.device), "family": models.family,
                         "decode_slots": models.runner.static.slots if models.runner.static is not None else 0}))
    try:
        asyncio.run(_serve(engine, conn))
    finally:
        engine.close()


async def _serve(engine, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    tasks: dict[int, asyncio.Task] = {}

    def read() -> None:  # a thread: a blocking recv never holds up the loop
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("close",)
            except Exception:
                log.exception("a request from the server could not be read")
                continue
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if message[0] == "close":
                return

    def send(message: tuple) -> None:
        try:
            conn.send(message)
        except (OSError, ValueError):  # the parent is gone; the reader will see it and stop us
            pass

    async def run_stream(rid: int, request: TTSRequest) -> None:
        try:
            async for chunk in engine.stream(request):
                send(("chunk", rid, chunk))
        except asyncio.CancelledError:
            return  # the parent cancelled it and no longer listens
        except Exception as exc:  # noqa: BLE001 - handed to the request's consumer
            send(("error", rid, _portable(exc)))
        finally:
            tasks.pop(rid, None)
        send((_END, rid))

    async def run_encode(rid: int, audio: bytes, use_memory_cache: bool, pcm) -> None:
        try:
            codes = await engine.encode_reference(audio, use_memory_cache=use_memory_cache, pcm=pcm)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            send(("raised", rid, _portable(exc)))
        else:
            send(("result", rid, codes))
        finally:
            tasks.pop(rid, None)

    threading.Thread(target=read, name="tts-process-requests", daemon=True).start()
    while True:
        kind, *args = await inbox.get()
        if kind == "close":
            break
        if kind == "stream":
            tasks[args[0]] = loop.create_task(run_stream(*args))
        elif kind == "encode":
            tasks[args[0]] = loop.create_task(run_encode(*args))
        elif kind == "status":
            send(("result", args[0], {"pid": os.getpid(), "active_requests": engine.active_requests}))
        elif kind == "cancel" and (task := tasks.pop(args[0], None)) is not None:
            task.cancel()
    for task in list(tasks.values()):
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (the engine's own errors do), else a RuntimeError naming it;
    ValueErrors stay ValueErrors, because transports answer those as the input's fault."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any unpicklable exception
        kind = ValueError if isinstance(exc, ValueError) else RuntimeError
        return kind(f"{type(exc).__name__}: {exc}")
