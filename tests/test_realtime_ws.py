"""The OpenAI Realtime WebSocket (`GET /v1/realtime`) driven by the official `openai` SDK, against
the real models: silero VAD, whisper tiny.en, SmolLM2 via llama.cpp, the TTS engine on a tiny
random checkpoint (it speaks noise, so reply words are checked on transcripts, reply audio on its
level and amount)."""
from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp
import numpy as np
import pytest

import speechkit
from rtc_client import LocalServer

openai = pytest.importorskip("openai")
pytest.importorskip("websockets")

QUESTION = "What is the capital of France?"
TTS_FRAMES = 24  # ~1.1 s of audio per sentence; the random tiny checkpoint never stops on its own

pytestmark = pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed")


@pytest.fixture
async def server(models):
    latencies: list[dict] = []  # what the server hands its metrics (server.metrics in the product)
    speculations: list[str] = []
    srv = await LocalServer(models, max_sessions=2, api_key="sekrit", observe_latency=latencies.append,
                            observe_speculation=speculations.append).start()
    srv.latencies, srv.speculations = latencies, speculations
    yield srv
    await srv.stop()


def client_for(server) -> "openai.AsyncOpenAI":
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="sekrit")


async def events_until(conn, stop_type: str, timeout: float = 60.0, seen: list | None = None) -> list:
    """Typed events from the SDK up to and including the first of `stop_type`."""
    got = [] if seen is None else seen

    async def run():
        async for event in conn:
            got.append(event)
            if event.type == stop_type:
                return

    await asyncio.wait_for(run(), timeout)
    return got


async def append_audio(conn, audio: bytes, chunk_ms: int = 100, paced: bool = False) -> None:
    """`input_audio_buffer.append` of 24 kHz 16-bit audio in `chunk_ms` pieces, at once or (`paced`)
    at the pace of a microphone."""
    chunk, t0 = 24_000 * 2 * chunk_ms // 1000, time.monotonic()
    for n, i in enumerate(range(0, len(audio), chunk)):
        if paced:
            await asyncio.sleep(max(0.0, t0 + n * chunk_ms / 1000 - time.monotonic()))
        await conn.input_audio_buffer.append(audio=base64.b64encode(audio[i:i + chunk]).decode())


async def start_text_session_with_server_vad(conn, max_output_tokens: int) -> None:
    """After session.created: text replies only, 24 kHz PCM in, turns ended by 500 ms of silence."""
    await events_until(conn, "session.created", 20)
    await conn.session.update(session={
        "type": "realtime", "output_modalities": ["text"], "max_output_tokens": max_output_tokens,
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
    await events_until(conn, "session.updated", 20)


def pcm24k(text: str, lead: float = 0.3, tail: float = 1.0) -> bytes:
    return speechkit.pcm24k_bytes(speechkit.speech_with_gaps([lead, text, tail])[0])


async def test_text_turn_with_the_openai_sdk(server):
    async with client_for(server).realtime.connect(model="gpt-realtime") as conn:
        created = await events_until(conn, "session.created", 20)
        assert created[-1].session.model == "gpt-realtime"  # any name is accepted and reported back
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "temperature": 0.0, "max_output_tokens": 40})
        await events_until(conn, "session.updated", 20)
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": QUESTION}]})
        await conn.response.create()
        events = await events_until(conn, "response.done")
        types_seen = [e.type for e in events]
        for expected in ("conversation.item.added", "response.created", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                         "response.content_part.done", "response.output_item.done", "response.done"):
            assert expected in types_seen, (expected, types_seen)
        assert types_seen.index("response.created") < types_seen.index("response.output_text.delta") \
            < types_seen.index("response.done")
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert "paris" in text.lower(), text  # SmolLM2, greedy
        done = events[-1]
        assert done.response.status == "completed"
        assert done.response.output[0].content[0].text.strip() == text.strip()
        assert not any(e.type == "response.output_audio.delta" for e in events)  # text only
        assert len(server.latencies) == 1 and server.latencies[0]["first_token"] > 0


async def test_spoken_turn_with_the_openai_sdk_gives_transcript_reply_text_and_audio(server):
    async with client_for(server).realtime.connect(model="gpt-realtime") as conn:
        await events_until(conn, "session.created", 20)
        await conn.session.update(session={
            "type": "realtime", "sampling": {"max_new_tokens": TTS_FRAMES, "seed": 1},
            "temperature": 0.0, "max_output_tokens": 40,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}},
                      "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}}})
        await events_until(conn, "session.updated", 20)
        await append_audio(conn, pcm24k(QUESTION))
        t_appended = time.monotonic()
        events = await events_until(conn, "response.done", 90)
        types_seen = [e.type for e in events]
        order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
                 "response.created", "response.output_audio.delta", "response.output_audio.done",
                 "response.output_audio_transcript.done", "response.done"]
        positions = [types_seen.index(t) for t in order]
        assert positions == sorted(positions), types_seen
        transcript = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed")
        assert speechkit.wer(QUESTION, transcript.transcript) <= 0.3, transcript.transcript
        reply = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert "paris" in reply.lower(), reply
        pcm = np.frombuffer(b"".join(base64.b64decode(e.delta) for e in events
                                     if e.type == "response.output_audio.delta"), dtype="<i2")
        seconds = len(pcm) / 24_000
        done = events[-1]
        assert done.response.status == "completed"
        usage = done.response.usage.output_token_details
        assert usage.audio_tokens == pytest.approx(seconds * 44_100 / 2048, abs=2)  # codec frames of audio
        assert seconds > 0.5 and float(np.sqrt(np.mean((pcm / 32768.0) ** 2))) > 0.003  # audible, not silence
        first_audio = next(i for i, e in enumerate(events) if e.type == "response.output_audio.delta")
        assert first_audio > types_seen.index("input_audio_buffer.speech_stopped")
        print(f"appended speech -> response.done in {time.monotonic() - t_appended:.2f} s")

        # The history is kept: the user's spoken item can be retrieved, then deleted.
        user_item = transcript.item_id
        await conn.conversation.item.retrieve(item_id=user_item)
        retrieved = (await events_until(conn, "conversation.item.retrieved", 20))[-1]
        assert retrieved.item.id == user_item and retrieved.item.role == "user"
        assert retrieved.item.content[0].transcript == transcript.transcript
        await conn.conversation.item.delete(item_id=user_item)
        assert (await events_until(conn, "conversation.item.deleted", 20))[-1].item_id == user_item


async def test_live_speech_gets_transcription_deltas_that_add_up_to_the_completed_transcript(server):
    """Speech appended in real time (20 ms every 20 ms): the input transcription deltas arrive in
    order, for the spoken item, before `completed`, and together they are its transcript."""
    spoken = ("Please turn on the kitchen lights.", "What is the weather going to be like tomorrow in Paris?")
    async with client_for(server).realtime.connect(model="gpt-realtime") as conn:
        await start_text_session_with_server_vad(conn, max_output_tokens=8)
        pcm16k, _ = speechkit.speech_with_gaps([0.3, spoken[0], 0.3, spoken[1], 1.0])
        audio = speechkit.pcm24k_bytes(pcm16k)
        events: list = []
        reader = asyncio.ensure_future(events_until(conn, "conversation.item.input_audio_transcription.completed",
                                                    120, seen=events))
        await append_audio(conn, audio, chunk_ms=20, paced=True)
        await reader
        completed = events[-1]
        deltas = [e for e in events if e.type == "conversation.item.input_audio_transcription.delta"]
        assert deltas, [e.type for e in events]
        assert all(d.item_id == completed.item_id and d.content_index == 0 for d in deltas)
        assert "".join(d.delta for d in deltas) == completed.transcript, (deltas, completed.transcript)
        assert speechkit.wer(" ".join(spoken), completed.transcript) <= 0.2, completed.transcript
        started = next(i for i, e in enumerate(events) if e.type == "input_audio_buffer.speech_started")
        assert events.index(deltas[0]) > started


async def test_bad_events_get_error_events_and_the_session_goes_on(server):
    async with client_for(server).realtime.connect(model="anything") as conn:
        await events_until(conn, "session.created", 20)
        await conn.send({"type": "no.such.event", "event_id": "evt_1"})
        error = (await events_until(conn, "error", 20))[-1]
        assert error.error.event_id == "evt_1" and error.error.param == "type"
        await conn.send({"type": "input_audio_buffer.append", "audio": "not base64!!", "event_id": "evt_2"})
        error = (await events_until(conn, "error", 20))[-1]
        assert error.error.event_id == "evt_2" and "base64" in error.error.message
        await conn.send({"type": "conversation.item.retrieve", "item_id": "item_nope", "event_id": "evt_3"})
        error = (await events_until(conn, "error", 20))[-1]
        assert error.error.event_id == "evt_3" and error.error.code == "item_retrieve_invalid_item_id"
        await conn.session.update(session={"type": "realtime", "instructions": "Still here."})
        updated = (await events_until(conn, "session.updated", 20))[-1]
        assert updated.session.instructions == "Still here."


async def test_websocket_needs_the_key_and_respects_the_session_cap(server):
    url = server.base_url.replace("http", "ws") + "/v1/realtime?model=x"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url)
        assert refused.value.status == 401
        # The browser form: the key as a subprotocol (browsers cannot set headers on a WebSocket).
        ws1 = await http.ws_connect(url, protocols=("realtime", "openai-insecure-api-key.sekrit"))
        assert json.loads((await ws1.receive()).data)["type"] == "session.created"
        ws2 = await http.ws_connect(url, headers={"Authorization": "Bearer sekrit"})
        assert json.loads((await ws2.receive()).data)["type"] == "session.created"
        async with http.get(server.base_url + "/v1/realtime/config",
                            headers={"Authorization": "Bearer sekrit"}) as resp:
            assert (await resp.json())["calls"] == {"active": 2, "max": 2}
        with pytest.raises(aiohttp.WSServerHandshakeError) as full:
            await http.ws_connect(url, headers={"Authorization": "Bearer sekrit"})
        assert full.value.status == 503
        await ws1.close()
        await ws2.close()
        for _ in range(50):  # the slots free up once the sessions have wound down
            if not server.calls:
                break
            await asyncio.sleep(0.1)
        assert not server.calls


async def test_response_on_an_empty_conversation_greets_from_the_instructions(server):
    """A bot that speaks first (Pipecat's `LLMRunFrame` at start, a phone agent's greeting): with
    no items yet, `response.create` answers from the instructions alone, as OpenAI does; with no
    instructions either, the response fails with a clear reason and the session goes on."""
    async with client_for(server).realtime.connect(model="gpt-realtime") as conn:
        await events_until(conn, "session.created", 20)
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "max_output_tokens": 30, "instructions":
                                           "You are a friendly receptionist. Greet the caller in one sentence."})
        await events_until(conn, "session.updated", 20)
        await conn.response.create()
        events = await events_until(conn, "response.done")
        assert not [e for e in events if e.type == "error"], events
        done = events[-1].response
        assert done.status == "completed", done
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text.strip() and done.output[0].content[0].text.strip() == text.strip()

        await conn.session.update(session={"type": "realtime", "instructions": ""})
        await events_until(conn, "session.updated", 20)
        await conn.conversation.item.delete(item_id=done.output[0].id)
        await events_until(conn, "conversation.item.deleted", 20)
        await conn.response.create()
        events = await events_until(conn, "response.done")
        failed = events[-1].response
        assert failed.status == "failed", failed
        assert "no instructions" in json.dumps(failed.status_details.model_dump()), failed.status_details
        await conn.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": QUESTION}]})
        await conn.response.create()
        events = await events_until(conn, "response.done")
        assert events[-1].response.status == "completed"  # the session went on


async def test_a_reply_speculated_in_the_pause_is_reported_to_the_metrics(server):
    """Speech appended in real time with a long silence window: the reply is started from the pause
    pass and adopted at the end of the turn, and both outcomes reach the server's metrics hook."""
    async with client_for(server).realtime.connect(model="gpt-realtime") as conn:
        await events_until(conn, "session.created", 20)
        await conn.session.update(session={
            "type": "realtime", "output_modalities": ["text"], "max_output_tokens": 20, "temperature": 0.0,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": {"type": "server_vad", "silence_duration_ms": 1500}}}})
        await events_until(conn, "session.updated", 20)
        pcm16k, _ = speechkit.speech_with_gaps([0.3, QUESTION, 2.0])
        reader = asyncio.ensure_future(events_until(conn, "response.done", 120))
        await append_audio(conn, speechkit.pcm24k_bytes(pcm16k), chunk_ms=20, paced=True)
        events = await reader
        assert events[-1].response.status == "completed"
        assert "Paris" in "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert server.speculations == ["started", "adopted"]


async def test_a_text_only_session_answers_a_spoken_turn_in_text(server):
    """`output_modalities: ["text"]` holds for the responses server VAD starts too, not only for
    the client's own response.create."""
    async with client_for(server).realtime.connect(model="gpt-realtime") as conn:
        await start_text_session_with_server_vad(conn, max_output_tokens=30)
        await append_audio(conn, pcm24k(QUESTION))
        events = await events_until(conn, "response.done", 90)
        types_seen = [e.type for e in events]
        assert "conversation.item.input_audio_transcription.completed" in types_seen
        assert "response.output_text.delta" in types_seen, types_seen
        assert not [t for t in types_seen if t.startswith("response.output_audio")], types_seen
        assert events[-1].response.status == "completed"
