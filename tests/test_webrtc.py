"""Realtime calls end to end in one process: the aiohttp app on 127.0.0.1 with the real models
(silero VAD, whisper tiny.en, SmolLM2 via llama.cpp, the TTS engine on a tiny random
checkpoint) and an aiortc client that speaks espeak-ng sentences into its microphone track.

The tiny checkpoint has random weights: it speaks noise, and never stops on its own, so every
TTS request here caps `max_new_tokens`. Reply *audio* is checked for presence, timing and
amount; reply *words* are checked on the transcript events (they come from the real LLM).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aioice.ice
import pytest

import speechkit
from engine.speech.types import SamplingOptions
from rtc_client import LocalServer, RealtimeClient, force_loopback_ice
from signaling import tracks

QUESTION = "What is the capital of France?"
TTS_FRAMES = 24  # ~1.1 s of audio per sentence from the random tiny checkpoint
LONG_FRAMES = 400  # ~18 s: a reply that is still playing when the user barges in


@pytest.fixture(scope="module", autouse=True)
def loopback_ice():
    undo = force_loopback_ice()
    yield
    undo()


@pytest.fixture
async def server(models):
    srv = await LocalServer(models, rtc_liveness_timeout=2.0).start()
    yield srv
    await srv.stop()


@pytest.fixture
async def connect(server):
    """Open calls; every one is hung up (or closed) at the end of the test."""
    clients: list[RealtimeClient] = []

    async def open_call(**query) -> RealtimeClient:
        client = RealtimeClient(server.base_url)
        clients.append(client)
        await client.connect(query=query)
        await client.wait_for("session.created")
        return client

    yield open_call
    for client in clients:
        await client.hang_up()


def speech(text: str, lead: float = 0.3, tail: float = 0.9):
    pcm, _ = speechkit.speech_with_gaps([lead, text, tail])
    return pcm


async def test_speech_in_transcript_and_spoken_reply_out(server, connect):
    """The headline: say a question, get its transcript, the agent's reply text and its audio."""
    client = await connect(mode="agent", max_new_tokens=TTS_FRAMES)
    client.send({"type": "session.update", "session": {"temperature": 0.0, "max_output_tokens": 40}})
    await client.wait_for("session.updated")
    call = server.calls[client.call_id]
    client.mic.play(speech(QUESTION))
    heard = await client.wait_for("conversation.item.input_audio_transcription.completed", timeout=20)
    assert speechkit.wer(QUESTION, heard["transcript"]) <= 0.25, heard["transcript"]
    # What reached the server was Opus decoded to 48 kHz (aiortc hands it over as packed stereo).
    assert call.inbound[0].input_format == ("s16", "stereo", 48000)
    # ...through the analysis-only jitter buffer (one packet, not aiortc's 4 = 80 ms of delay); this
    # fails if an aiortc upgrade moves the private attribute use_shallow_jitter_buffer replaces.
    receivers = [t.receiver for t in call.pc.getTransceivers() if t.receiver.track is call.inbound[0].track]
    assert [getattr(r, tracks._RECEIVER_JITTER_BUFFER)._prefetch for r in receivers] == [tracks.INBOUND_PREFETCH]
    t_speech_end = await client.mic.played()

    started = await client.wait_for("output_audio_buffer.started", timeout=30)
    assert started["latency_ms"]["first_audio"] > 0
    done = await client.wait_for("response.done", timeout=60)
    assert done["response"]["status"] == "completed"
    assert "paris" in done["transcript"].lower(), done["transcript"]  # SmolLM2, greedy
    deltas = "".join(e["delta"] for e in client.of_type("response.output_audio_transcript.delta"))
    assert deltas.strip() == done["transcript"].strip()
    assert done["audio_seconds"] > 0.5

    # The reply's audio arrives on the track, about as much as was synthesised.
    await client.wait_for("output_audio_buffer.stopped", timeout=30)
    await asyncio.sleep(0.3)
    first = client.sink.first_audible(after=t_speech_end)
    assert first is not None, "no reply audio reached the client"
    received = client.sink.audible_seconds(after=t_speech_end)
    assert abs(received - done["audio_seconds"]) < 0.25 * done["audio_seconds"] + 0.2, (received, done)
    print(f"voice-to-voice latency (end of speech at the client -> first reply audio at the client): "
          f"{(first - t_speech_end) * 1000:.0f} ms; server: {started['latency_ms']}")
    # Events carry timings on one clock, in order.
    times = [e["t_ms"] for e in client.events]
    assert times == sorted(times)
    assert call.conversation.history[-1]["role"] == "assistant"
    assert call.outbound.stats.underruns < 10


async def test_tts_request_speaks_exactly_that_text(server, connect):
    client = await connect(mode="tts")
    text = "Hello from the server."
    t_sent = time.monotonic()
    client.send({"type": "tts.request", "text": text, "sampling": {"max_new_tokens": TTS_FRAMES, "seed": 1},
                 "event_id": "evt_tts"})
    created = await client.wait_for("response.created")
    assert created["response"]["kind"] == "tts"
    rid = created["response_id"]
    done = await client.wait_for("response.done", lambda e: e["response_id"] == rid, timeout=30)
    assert done["response"]["status"] == "completed" and done["transcript"] == text
    assert done["audio_seconds"] == pytest.approx(TTS_FRAMES / 21.5, rel=0.3)
    await client.wait_for("output_audio_buffer.stopped", lambda e: e["response_id"] == rid, timeout=10)
    await asyncio.sleep(0.3)
    first = client.sink.first_audible(after=t_sent)
    assert first is not None
    assert abs(client.sink.audible_seconds(after=t_sent) - done["audio_seconds"]) < 0.3
    print(f"data-channel TTS time to first audio at the client: {(first - t_sent) * 1000:.0f} ms")
    # The TTS request is not an agent turn.
    assert server.calls[client.call_id].conversation.history == []

    # Bad requests are answered with an error event naming the problem; the call goes on.
    client.send({"type": "tts.request", "text": "x", "temperature": 9, "event_id": "evt_bad"})
    err = await client.wait_for("error", lambda e: e["error"]["event_id"] == "evt_bad")
    assert err["error"]["code"] == "invalid_value" and err["error"]["param"] == "temperature"
    client.send({"type": "tts.request", "text": "x", "voice": "no-such-voice", "event_id": "evt_voice"})
    err = await client.wait_for("error", lambda e: e["error"]["event_id"] == "evt_voice")
    assert err["error"]["param"] == "voice"


async def test_reference_voice_by_id(server, connect, models, tmp_path):
    """A stored voice (espeak speech + its transcript) is used by id, from the query, session.update
    and tts.request; OpenAI's preset names fall back to the default voice instead of failing."""
    ref_text = "Please turn on the kitchen lights."
    wav = tmp_path / "ref.wav"
    pcm = speechkit.espeak_wav(ref_text)
    import wave

    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())
    models.references.add("kitchen", wav.read_bytes(), ref_text, "ref.wav")
    client = await connect(mode="tts", voice="kitchen")
    call = server.calls[client.call_id]
    assert client.of_type("session.created")[0]["session"]["voice"] == "kitchen"
    assert [r.text for r in call.conversation.voice] == [ref_text]
    client.send({"type": "tts.request", "text": "Hello from the server.", "voice": "kitchen",
                 "sampling": {"max_new_tokens": TTS_FRAMES}})
    done = await client.wait_for("response.done", timeout=30)
    assert done["response"]["status"] == "completed" and done["audio_seconds"] > 0.5
    seen = len(client.events)
    client.send({"type": "session.update", "session": {"audio": {"output": {"voice": "alloy"}}}})
    updated = await client.wait_for("session.updated", after=seen)
    assert updated["session"]["voice"] == "alloy" and call.conversation.voice == ()
    client.send({"type": "session.update", "event_id": "evt_v", "session": {"voice": "../etc"}})
    err = await client.wait_for("error", lambda e: e["error"]["event_id"] == "evt_v")
    assert err["error"]["param"] == "voice"
    status, text, _ = await client.post_offer(client.pc.localDescription.sdp, query={"voice": "nobody-here"})
    assert status == 400 and "nobody-here" in text


async def test_barge_in_clears_queued_audio_at_once(server, connect):
    client = await connect(mode="tts")
    call = server.calls[client.call_id]
    client.send({"type": "tts.request", "text": "This is a long answer that the user will interrupt.",
                 "sampling": {"max_new_tokens": LONG_FRAMES}})
    created = await client.wait_for("response.created")
    rid = created["response_id"]
    await client.wait_for("output_audio_buffer.started", timeout=20)
    # Let the reply play for a moment, with plenty still queued (a busy CPU makes the TTS run less far
    # ahead of playback, so wait for the queue rather than for a fixed time).
    await asyncio.sleep(1.0)
    for _ in range(100):
        if call.outbound.queued_seconds > 2.5:
            break
        await asyncio.sleep(0.1)
    assert call.outbound.queued_seconds > 2.5, "the TTS never got 2.5 s ahead of playback"
    assert client.sink.first_audible() is not None
    client.mic.play(speech("Hello from the server.", lead=0.0, tail=0.8))
    barge = await client.wait_for("input_audio_buffer.speech_started", timeout=10)
    cleared = await client.wait_for("output_audio_buffer.cleared", lambda e: e["response_id"] == rid, timeout=5)
    assert cleared["t_ms"] - barge["t_ms"] < 300  # the flush follows the speech start at once
    assert call.outbound.stats.cleared_seconds > 1.0  # queued audio was dropped, not played out
    # Silence at the client right after the flush (allowing for the jitter buffer).
    await asyncio.sleep(1.0)
    t_cleared = cleared["_t"]
    assert client.sink.audible_seconds(after=t_cleared + 0.3) < 0.1
    done = await client.wait_for("response.done", lambda e: e["response_id"] == rid, timeout=10)
    heard = client.sink.audible_seconds()
    assert heard < done["audio_seconds"] - 1.0, (heard, done["audio_seconds"])


async def test_barge_in_on_an_agent_reply_keeps_only_what_was_played(server, connect):
    """The track's played-time reports decide what the history keeps of an interrupted reply."""
    client = await connect(mode="agent", max_new_tokens=60)  # ~2.8 s of audio per sentence
    client.send({"type": "session.update", "session": {"temperature": 0.0, "max_output_tokens": 120}})
    await client.wait_for("session.updated")
    call = server.calls[client.call_id]
    client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Tell me a long story about a dragon and a knight."}]}})
    client.send({"type": "response.create"})
    created = await client.wait_for("response.created")
    rid = created["response_id"]
    started = await client.wait_for("output_audio_buffer.started", timeout=30)
    await asyncio.sleep(max(0.0, 1.5 - (time.monotonic() - started["_t"])))
    client.mic.play(speech("Hello from the server.", lead=0.0, tail=0.8))
    cleared = await client.wait_for("output_audio_buffer.cleared", lambda e: e["response_id"] == rid, timeout=10)
    played = call.outbound._sent[rid] / 48000  # what actually went out on the track
    assert abs(cleared["audio_end_ms"] / 1000 - played) < 0.15, (cleared["audio_end_ms"], played)
    await asyncio.sleep(0.3)
    full = "".join(e["delta"] for e in client.of_type("response.output_audio_transcript.delta")
                   if e["response_id"] == rid)
    kept = next(m["content"] for m in reversed(call.conversation.history) if m["role"] == "assistant")
    assert kept and len(kept) < len(full.strip()), (kept, full)
    assert full.strip().startswith(kept.split()[0])


async def test_hang_up_releases_tasks_tracks_and_model_work(server, connect, models):
    baseline = set(asyncio.all_tasks())
    client = RealtimeClient(server.base_url)
    await client.connect(query={"mode": "tts"})
    call = server.calls[client.call_id]
    client.send({"type": "tts.request", "text": "Keep talking until the line goes dead.",
                 "sampling": {"max_new_tokens": LONG_FRAMES}})
    await client.wait_for("output_audio_buffer.started", timeout=20)
    assert models.tts.active_requests == 1
    assert await client.hang_up() == 200
    assert client.call_id not in server.calls and call.close_reason == "hangup"
    assert call.pc.connectionState == "closed" and call.outbound.readyState == "ended"
    await asyncio.sleep(0.3)
    assert models.tts.active_requests == 0, "the call's TTS work must stop with the call"
    leftover = [t for t in asyncio.all_tasks() - baseline if not t.done()]
    assert not leftover, [t.get_name() for t in leftover]


async def test_vanished_peer_is_detected_and_cleaned_up(server, models):
    """A client killed without a goodbye: no BYE, no DTLS close, just silence."""
    client = subprocess.Popen([sys.executable, str(Path(__file__).with_name("rtc_client.py")), server.base_url,
                               "--loopback", "--query", "mode=tts"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, client.stdout.readline), 30)
        call_id = json.loads(line)["location"].rsplit("/", 1)[-1]
        call = server.calls[call_id]
        await call.conversation.speak("Nobody is listening any more.",
                                      sampling=SamplingOptions(max_new_tokens=LONG_FRAMES))
        for _ in range(100):
            if call.outbound.stats.audio_frames:
                break
            await asyncio.sleep(0.1)
        assert models.tts.active_requests == 1
        t_kill = time.monotonic()
        os.killpg(client.pid, signal.SIGKILL)
        await asyncio.wait_for(call.closed.wait(), 10)
        waited = time.monotonic() - t_kill
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
        client.wait()
    assert call.close_reason == "peer_gone"
    assert waited < 2.0 + 1.5, waited  # the liveness timeout plus one check
    assert call_id not in server.calls
    await asyncio.sleep(0.2)
    assert models.tts.active_requests == 0


async def test_data_channel_protocol_and_small_packets(server, connect, monkeypatch):
    sizes: list[int] = []
    original = aioice.ice.StunProtocol.send_data

    async def recording(self, data, addr):
        sizes.append(len(data))
        return await original(self, data, addr)

    monkeypatch.setattr(aioice.ice.StunProtocol, "send_data", recording)
    client = await connect(mode="agent")
    client.send({"type": "no.such.event", "event_id": "evt_1"})
    err = await client.wait_for("error", lambda e: e["error"]["event_id"] == "evt_1")
    assert err["error"]["code"] == "unknown_event"
    client.channel.send("{broken json")
    err = await client.wait_for("error", lambda e: e["error"]["code"] == "invalid_json")
    client.send({"type": "session.update", "event_id": "evt_2", "session": {"turn_detection": {"threshold": 2}}})
    err = await client.wait_for("error", lambda e: e["error"]["event_id"] == "evt_2")
    assert err["error"]["param"] == "threshold"

    client.send({"type": "session.update", "session": {
        "mode": "tts", "instructions": "Be brief.",
        "audio": {"input": {"turn_detection": {"silence_duration_ms": 800}}}, "sampling": {"max_new_tokens": 30}}})
    updated = (await client.wait_for("session.updated"))["session"]
    assert (updated["mode"], updated["instructions"]) == ("tts", "Be brief.")
    assert updated["turn_detection"]["silence_duration_ms"] == 800 and updated["sampling"]["max_new_tokens"] == 30
    seen = len(client.events)
    client.send({"type": "session.update", "session": {"turn_detection": None}})
    assert (await client.wait_for("session.updated", after=seen))["session"]["turn_detection"] is None

    # A message several times the path MTU crosses both ways intact, in packets that fit 1280 bytes.
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 80)  # ~3.6 kB
    client.send({"type": "session.update", "session": {"mode": "agent"}})
    client.send({"type": "conversation.item.create",
                 "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": long_text}]}})
    added = await client.wait_for("conversation.item.added")
    assert added["item"]["content"][0]["text"] == long_text
    assert server.calls[client.call_id].conversation.history[-1] == {"role": "user", "content": long_text}
    assert max(sizes) <= 1232, max(sizes)  # 1280 - IPv6 header (40) - UDP header (8)
