"""LiveKit Agents' OpenAI Realtime plugin (`livekit-plugins-openai`) drives our server over the
Realtime WebSocket, with nothing changed but `base_url` and `api_key`.

No LiveKit server is involved: a `RealtimeModel(...).session()` opens its own WebSocket
(`GET /v1/realtime?model=...`, `Authorization: Bearer KEY`) and is driven directly, as LiveKit's
`AgentSession` drives it inside a worker: chat-context updates and `generate_reply(...)` for text
turns, `push_audio(rtc.AudioFrame)` for speech (the plugin resamples to 24 kHz PCM and our
server's VAD cuts the turn). Only `livekit.rtc`'s local audio helpers (AudioFrame, AudioResampler,
a bundled native library) run alongside; they need no server either.

The server is the product's own app (`server.app.create_app`) on 127.0.0.1 with its real models:
whisper tiny.en, silero VAD, SmolLM2 (llama.cpp) and the TTS engine on a tiny random checkpoint
(it speaks noise and never stops on its own, so a cap on frames per sentence is set). Reply words
are checked on the transcript (the real LLM); reply audio for presence, format and amount.
"""
from __future__ import annotations

import asyncio
import importlib.util
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import speechkit

ROOT = Path(__file__).resolve().parent.parent

lk_openai = pytest.importorskip("livekit.plugins.openai", reason="livekit-plugins-openai is not installed "
                                "(pip install -e '.[test]')")
from livekit import rtc  # noqa: E402 - after the skip check
from livekit.agents import APIConnectionError, APIConnectOptions, llm  # noqa: E402

API_KEY = "livekit-test-key"
QUESTION = "What is the capital of France?"
PLUGIN_RATE = 24_000  # the plugin's fixed PCM rate, both ways
# Our server's own session options, sent through the plugin's raw `send_event`: the random tiny
# checkpoint never stops speaking by itself (cap its frames per sentence), and SmolLM2 is only
# reliable on facts when greedy (GA dropped `temperature`; our server still takes it for its LLM).
FOR_THE_TINY_MODELS = {"type": "session.update",
                       "session": {"type": "realtime", "temperature": 0.0,
                                   "sampling": {"max_new_tokens": 24, "seed": 1}}}


@dataclass
class Reply:
    text: str
    pcm: np.ndarray  # int16 mono at `rate`
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.pcm) / self.rate

    @property
    def rms(self) -> float:
        return float(np.sqrt(np.mean((self.pcm / 32768.0) ** 2))) if len(self.pcm) else 0.0


@pytest.fixture(scope="module")
async def server(tiny_checkpoint, tmp_path_factory):
    from aiohttp import web

    from server.app import create_app
    from server.settings import Settings

    settings = Settings(checkpoint=str(tiny_checkpoint), device="cpu", data_dir=tmp_path_factory.mktemp("data"),
                        api_key=API_KEY)
    runner = web.AppRunner(create_app(settings))
    await runner.setup()  # loads the models
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield types.SimpleNamespace(app=runner.app, settings=settings,
                                    base_url=f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
    finally:
        await runner.cleanup()


@pytest.fixture
async def realtime(server):
    """RealtimeModel sessions against our server, each closed at the end of the test."""
    opened: list[tuple[lk_openai.realtime.RealtimeModel, lk_openai.realtime.RealtimeSession]] = []

    def open_session(api_key: str = API_KEY, **options) -> lk_openai.realtime.RealtimeSession:
        model = lk_openai.realtime.RealtimeModel(base_url=f"{server.base_url}/v1", api_key=api_key, **options)
        session = model.session()
        opened.append((model, session))
        session.send_event(FOR_THE_TINY_MODELS)
        return session

    yield open_session
    for model, session in opened:
        await session.aclose()
        await model.aclose()


async def collect(generation: llm.GenerationCreatedEvent) -> Reply:
    """Read a generation's messages to the end (response.done), text and audio together."""
    texts: list[str] = []
    frames: list[rtc.AudioFrame] = []

    async def read_text(stream) -> None:
        async for delta in stream:
            texts.append(delta)

    async def read_audio(stream) -> None:
        async for frame in stream:
            frames.append(frame)

    async for message in generation.message_stream:
        await asyncio.gather(read_text(message.text_stream), read_audio(message.audio_stream))
    rates = {f.sample_rate for f in frames} or {PLUGIN_RATE}
    assert rates == {PLUGIN_RATE} and {f.num_channels for f in frames} <= {1}, rates
    pcm = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames]) if frames else np.zeros(0, np.int16)
    return Reply("".join(texts), pcm, PLUGIN_RATE)


def messages(session: lk_openai.realtime.RealtimeSession) -> list[tuple[str, str]]:
    """The session's mirror of the server's conversation: (role, text) per message."""
    return [(item.role, item.text_content or "") for item in session.chat_ctx.items if item.type == "message"]


async def test_text_turns_get_spoken_replies_and_the_history_is_kept(realtime):
    session = realtime()
    chat_ctx = session.chat_ctx.copy()
    chat_ctx.add_message(role="user", content=QUESTION)
    await session.update_chat_ctx(chat_ctx)  # conversation.item.create, confirmed by conversation.item.added
    generation = await asyncio.wait_for(session.generate_reply(), 15)
    assert generation.user_initiated  # our response.created echoed the request's metadata
    reply = await asyncio.wait_for(collect(generation), 90)
    assert "paris" in reply.text.lower(), reply.text
    assert reply.seconds > 0.3 and reply.rms > 0.001, (reply.seconds, reply.rms)
    assert messages(session) == [("user", QUESTION), ("assistant", reply.text)]

    # generate_reply(instructions=...) on the same session: a reply with no new user message.
    generation = await asyncio.wait_for(session.generate_reply(instructions="Now say goodbye to the user."), 15)
    second = await asyncio.wait_for(collect(generation), 90)
    assert second.text.strip() and second.seconds > 0.3, second.text
    assert messages(session) == [("user", QUESTION), ("assistant", reply.text), ("assistant", second.text)]


@pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed (test speech)")
async def test_pushed_speech_is_transcribed_and_answered(realtime):
    session = realtime()  # the plugin's defaults: server-side turn detection, input transcription on
    transcripts: list[str] = []
    session.on("input_audio_transcription_completed", lambda ev: ev.is_final and transcripts.append(ev.transcript))
    generations: asyncio.Queue[llm.GenerationCreatedEvent] = asyncio.Queue()
    session.on("generation_created", generations.put_nowait)
    speech_started = asyncio.Event()
    session.on("input_speech_started", lambda _: speech_started.set())

    pcm, _ = speechkit.speech_with_gaps([0.5, QUESTION, 1.5])  # 16 kHz float; the plugin resamples
    samples = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    step = speechkit.SAMPLE_RATE // 50  # 20 ms frames, as a LiveKit room track delivers them
    t0 = time.monotonic()
    for start in range(0, len(samples), step):
        chunk = samples[start:start + step]
        session.push_audio(rtc.AudioFrame(data=chunk.tobytes(), sample_rate=speechkit.SAMPLE_RATE,
                                          num_channels=1, samples_per_channel=len(chunk)))
        await asyncio.sleep(0.005)  # faster than real time, as a server must accept
    generation = await asyncio.wait_for(generations.get(), 30)
    assert not generation.user_initiated  # the server's turn detection started it
    assert speech_started.is_set()
    reply = await asyncio.wait_for(collect(generation), 90)
    print(f"first frame pushed -> reply done: {time.monotonic() - t0:.1f} s; heard {transcripts}; "
          f"reply {reply.text!r} ({reply.seconds:.1f} s of audio)")
    assert transcripts and speechkit.wer(QUESTION, transcripts[0]) <= 0.25, transcripts
    assert "paris" in reply.text.lower(), reply.text
    assert reply.seconds > 0.3 and reply.rms > 0.001
    assert messages(session)[-1] == ("assistant", reply.text)


async def test_a_wrong_key_is_refused_and_reported(server):
    model = lk_openai.realtime.RealtimeModel(base_url=f"{server.base_url}/v1", api_key="not-the-key",
                                             conn_options=APIConnectOptions(max_retry=0, timeout=5))
    session = model.session()
    errors: asyncio.Queue[llm.RealtimeModelError] = asyncio.Queue()
    session.on("error", errors.put_nowait)
    try:
        error = await asyncio.wait_for(errors.get(), 15)
        assert not error.recoverable
        handshake = error.error.__cause__
        assert getattr(handshake, "status", None) == 401, repr(handshake)
    finally:
        with pytest.raises(APIConnectionError):  # the session ended on that error, and says so
            await session.aclose()
        await model.aclose()


def _worker_example(monkeypatch, base_url: str):
    """examples/livekit_worker.py, imported as LiveKit's worker process would (its settings from env)."""
    monkeypatch.setenv("FISHVOICE_URL", base_url)
    monkeypatch.setenv("FISHVOICE_API_KEY", API_KEY)
    spec = importlib.util.spec_from_file_location("livekit_worker", ROOT / "examples" / "livekit_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_worker_examples_agent_session_answers_and_reports_load(server, monkeypatch):
    """The example's own model and agent inside LiveKit's AgentSession (its whole turn machinery,
    minus a room: text in, the reply's transcript out), and its load figure from our /health."""
    from livekit.agents import AgentSession

    worker = _worker_example(monkeypatch, server.base_url)
    loop = asyncio.get_running_loop()
    idle = await loop.run_in_executor(None, worker.fishvoice_load)  # LiveKit calls it off the loop, too
    agent = worker.assistant()
    async with AgentSession(llm=worker.realtime_model()) as session:
        await session.start(agent)
        agent.realtime_llm_session.send_event(FOR_THE_TINY_MODELS)
        result = await asyncio.wait_for(session.run(user_input=QUESTION), 90)
        busy = await loop.run_in_executor(None, worker.fishvoice_load)  # its WebSocket session is open
    replies = [e.item.text_content for e in result.events if e.type == "message" and e.item.role == "assistant"]
    assert replies and "paris" in replies[0].lower(), result.events
    cap = server.settings.max_sessions
    assert (idle, busy) == (0.0, 1 / cap), (idle, busy)
