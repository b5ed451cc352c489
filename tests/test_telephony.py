"""Phone calls end to end: the aiohttp app on 127.0.0.1 with the real models (silero VAD, whisper
tiny.en, SmolLM2, the TTS engine on a tiny random checkpoint), and a faithful carrier peer
(tests/phone_peer.py) that dials the voice webhook and speaks Twilio's (or Telnyx's) documented
media-stream messages in real time, with espeak-ng speech carried as telephone-band μ-law.

The tiny checkpoint speaks noise and never stops on its own, so TTS requests cap max_new_tokens;
reply audio is checked for presence, amount and timing, reply words on the conversation's events.
"""
from __future__ import annotations

import asyncio
import time
import types

import aiohttp
import numpy as np
import pytest

import speechkit
from engine.agent.conversation.events import (ResponseAudioCleared, ResponseAudioStopped, ResponseCreated,
                                              ResponseDone, ResponseTextDelta, ResponseTruncated, UserDtmf,
                                              UserTranscript)
from engine.agent.llm.base import ChatOptions
from phone_peer import CarrierPeer, of_type, phone_call, phone_line, wait_event, wait_until
from rtc_client import LocalServer
from signaling import TelephonyConfig

QUESTION = "What is the capital of France?"
AUTH_TOKEN = "12345678901234567890123456789012"  # a Twilio auth token's shape (32 hex-ish chars)


@pytest.fixture(scope="module")
def models(tts_engine):
    from engine.agent.asr import Transcriber
    from engine.agent.llm.embedded import EmbeddedLLM
    from engine.agent.vad import SileroVAD

    llm = EmbeddedLLM.load()
    yield types.SimpleNamespace(asr=Transcriber.load(), vad=SileroVAD.load(), smart_turn=None, llm=llm, tts=tts_engine,
                                references=None, loading=False)
    llm.close()


async def start_server(models, max_sessions: int = 4, **telephony) -> LocalServer:
    telephony.setdefault("liveness_timeout", 1.5)
    return await LocalServer(models, max_sessions=max_sessions, telephony=TelephonyConfig(**telephony)).start()


@pytest.fixture
async def server(models):
    srv = await start_server(models)
    yield srv
    await srv.stop()


@pytest.fixture
async def dial(server):
    """Place calls the carrier's way; every one is hung up at the end of the test."""
    peers: list[CarrierPeer] = []

    async def place(dialect: str = "twilio", **query) -> CarrierPeer:
        peer = CarrierPeer(server.base_url, dialect)
        peers.append(peer)
        status, body = await peer.dial(query)
        assert status == 200, body
        await peer.connect()
        await wait_until(lambda: phone_call(server, peer) is not None, 10, "the call to register")
        return peer

    yield place
    for peer in peers:
        await peer.close()


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pcm / 32768.0) ** 2))) if pcm.size else 0.0


# --------------------------------------------------------------------------- the headline
@pytest.mark.parametrize("dialect", ["twilio", "telnyx", "plivo"])
async def test_spoken_question_over_mulaw_gets_transcript_and_audible_reply(server, dial, dialect):
    peer = await dial(dialect, mode="agent", max_new_tokens=24)
    call = phone_call(server, peer)
    assert call.dialect.name == dialect and call.start.encoding == "mulaw"
    call.conversation.update(chat=ChatOptions(temperature=0.0, max_tokens=40))  # SmolLM2, greedy
    peer.say(phone_line(QUESTION))
    heard = await wait_event(call, UserTranscript, timeout=30)
    # Telephone-band μ-law in, resampled to 16 kHz: whisper still gets the words.
    assert speechkit.wer(QUESTION, heard.transcript) <= 0.25, heard.transcript
    t_voice_end = await peer.voice_ended()
    done = await wait_event(call, ResponseDone, timeout=60)
    assert done.status == "completed" and "paris" in done.transcript.lower(), done.transcript
    assert done.audio_seconds > 0.5

    # The reply reaches the caller as μ-law media in the documented shapes, paced, and is played.
    await wait_until(lambda: peer.played_seconds() >= done.audio_seconds - 0.05, 30, "the reply to play out")
    assert not peer.violations, peer.violations[:5]
    received = sum(len(p) for _, p in peer.received) / 8000
    assert abs(received - done.audio_seconds) < 0.1 * done.audio_seconds + 0.1, (received, done.audio_seconds)
    first = peer.first_audible(after=t_voice_end)
    assert first is not None and rms(peer.heard(after=first)) > 0.01
    # Paced: the server never ran more than its lead (plus a chunk) ahead of the caller's playout.
    t_first_media = peer.first_media(after=t_voice_end)
    last_arrival = peer.received[-1][0]
    assert last_arrival - t_first_media > received - call.playback.lead - 0.1 - 0.3, "sent in a burst"
    # Each chunk's mark came back after its audio played, and the conversation was told.
    await wait_until(lambda: len(peer.marks_echoed) == len(peer.marks_received), 5, "the last mark echo")
    assert all(played for _, _, played in peer.marks_echoed)
    assert [name for _, name, _ in peer.marks_echoed] == peer.marks_received
    await wait_until(lambda: call.playback.stats.marks_played == len(peer.marks_received) > 0, 5,
                     "the server to take every echo")
    print(f"{dialect}: end of caller speech -> first reply media {1000 * (t_first_media - t_voice_end):.0f} ms, "
          f"-> first audible frame played {1000 * (first - t_voice_end):.0f} ms; server {done.latency}")


async def test_barge_in_clears_the_carrier_and_history_keeps_what_was_played(server, dial):
    peer = await dial("twilio", mode="agent", max_new_tokens=100)  # ~4.6 s of audio per sentence
    call = phone_call(server, peer)
    call.conversation.update(chat=ChatOptions(temperature=0.0, max_tokens=60))
    await call.conversation.send_text("Tell me a long story about a dragon and a knight.")
    await wait_until(lambda: peer.played_seconds() > 1.0, 60, "a second of the reply to play")
    rid = next(e.response_id for e in of_type(call, ResponseCreated))
    assert not of_type(call, ResponseAudioStopped), "the reply must still be playing"
    peer.say(phone_line("Hello from the server.", lead=0.0, tail=0.8))
    await wait_until(lambda: peer.clears, 10, "a clear message")
    t_clear = peer.clears[0]
    cleared = await wait_event(call, ResponseAudioCleared, timeout=5)
    assert cleared.response_id == rid
    played_before_clear = peer.played_seconds(before=t_clear)
    # What the history keeps is what the caller's line really played (mark echoes), not what was sent.
    assert abs(cleared.audio_end_ms / 1000 - played_before_clear) < 0.25, (cleared.audio_end_ms, played_before_clear)
    # Nothing more of that reply reaches the caller after the clear (each of its chunks is marked).
    marks_at_clear = sum(name.startswith(rid + ".") for name in peer.marks_received)
    await asyncio.sleep(0.5)
    assert sum(name.startswith(rid + ".") for name in peer.marks_received) == marks_at_clear
    # The reply is cut at what was heard (cancelled mid-generation, or truncated when already complete).
    done = await wait_event(call, ResponseDone, lambda e: e.response_id == rid, timeout=10)
    truncated = [e for e in of_type(call, ResponseTruncated) if e.response_id == rid]
    heard = truncated[-1].transcript if truncated else done.transcript
    full = "".join(e.delta for e in of_type(call, ResponseTextDelta) if e.response_id == rid).strip()
    kept = next(m["content"] for m in call.conversation.history if m["role"] == "assistant")
    assert kept == heard and 0 < len(kept) < len(full), (kept, full)
    assert full.startswith(kept.split()[0])
    assert not peer.violations, peer.violations[:5]


async def test_dtmf_reaches_the_conversation_and_bad_messages_are_skipped(server, dial):
    peer = await dial("twilio", mode="tts")
    call = phone_call(server, peer)
    await peer.send_raw("this is not JSON")
    await peer.send_raw('{"event": "bogus", "streamSid": "x"}')
    await peer.send_raw('{"event": "media", "media": {"payload": "***not base64***"}}')
    await peer.dtmf("5")
    await peer.dtmf("#")
    digits = await wait_event(call, UserDtmf, lambda e: e.digit == "#", timeout=5)
    assert [e.digit for e in of_type(call, UserDtmf)] == ["5", "#"] and digits.digit == "#"
    assert call.skipped == 3 and call.close_reason is None  # logged, skipped, the call goes on


async def test_stop_ends_the_call_and_frees_its_session(server, dial, models):
    baseline = set(asyncio.all_tasks())
    peer = await dial("twilio", mode="tts", max_new_tokens=400)  # ~18 s of audio: still generating
    call = phone_call(server, peer)
    await call.conversation.speak("Keep talking until the caller hangs up.")
    await wait_until(lambda: peer.received, 30, "reply media")
    assert models.tts.active_requests == 1
    await peer.stop()
    await asyncio.wait_for(call.closed.wait(), 5)
    assert call.close_reason == "stop" and call.id not in server.calls
    await asyncio.sleep(0.3)
    assert models.tts.active_requests == 0, "the call's TTS work must stop with the call"
    leftover = [t for t in asyncio.all_tasks() - baseline if not t.done() and "phone_" in t.get_name()]
    assert not leftover, [t.get_name() for t in leftover]


async def test_a_carrier_that_stops_sending_is_ended_and_freed(server, dial):
    peer = await dial("twilio", mode="tts")
    call = phone_call(server, peer)
    await peer.go_silent()
    t0 = time.monotonic()
    await asyncio.wait_for(call.closed.wait(), 6)
    assert call.close_reason == "carrier_silent" and call.id not in server.calls
    assert time.monotonic() - t0 < 1.5 + 2.0  # the liveness timeout plus a check interval and slack
    await wait_until(lambda: peer.closed.is_set(), 5, "the server to close the socket")


# --------------------------------------------------------------------------- security
async def test_twilio_signature_and_stream_token_are_enforced(models):
    server = await start_server(models, twilio_auth_token=AUTH_TOKEN)
    try:
        unsigned = CarrierPeer(server.base_url)
        status, _ = await unsigned.dial({"mode": "tts"}, signature="")
        assert status == 403
        forged = CarrierPeer(server.base_url, auth_token="0" * 32)  # signed with the wrong token
        assert (await forged.dial({"mode": "tts"}))[0] == 403
        tampered = CarrierPeer(server.base_url, auth_token=AUTH_TOKEN)
        form = tampered.webhook_form()
        from twilio.request_validator import RequestValidator
        signature = RequestValidator(AUTH_TOKEN).compute_signature(
            server.base_url + "/v1/telephony/twilio/voice?mode=tts", form)
        status, _ = await tampered.dial({"mode": "agent"}, signature=signature)  # the URL was changed
        assert status == 403
        await asyncio.gather(unsigned.close(), forged.close(), tampered.close())

        good = CarrierPeer(server.base_url, auth_token=AUTH_TOKEN)
        status, twiml = await good.dial({"mode": "tts", "voice": "alloy"})
        assert status == 200 and "<Connect><Stream" in twiml and "?" not in good.stream_url
        assert good.parameters["mode"] == "tts" and good.parameters["voice"] == "alloy" and good.parameters["token"]

        # A guessed stream: no token, a forged token, another call's token -> refused, nothing registered.
        for parameters in ({}, {"token": "eyJjYWxsIjoiIn0.deadbeef"}, None):
            intruder = CarrierPeer(server.base_url, auth_token=AUTH_TOKEN)
            intruder.stream_url = good.stream_url
            intruder.parameters = dict(good.parameters if parameters is None else parameters)
            await intruder.connect()  # parameters=None: the real token, but this is another CallSid
            await wait_until(lambda: intruder.closed.is_set(), 5, "the server to refuse the stream")
            assert intruder.ws.close_code == 1008 and not server.calls
            await intruder.close()

        await good.connect()
        await wait_until(lambda: phone_call(server, good) is not None, 10, "the admitted call")
        await good.stop()
        # The token opened one stream; it cannot open another.
        again = CarrierPeer(server.base_url, auth_token=AUTH_TOKEN)
        again.stream_url, again.parameters, again.call_sid = good.stream_url, dict(good.parameters), good.call_sid
        await again.connect()
        await wait_until(lambda: again.closed.is_set(), 5, "the reused token to be refused")
        assert again.ws.close_code == 1008
        await again.close()
    finally:
        await server.stop()


async def test_webhook_options_are_validated_and_telnyx_needs_its_key(models):
    server = await start_server(models, webhook_key="s3cret")
    try:
        peer = CarrierPeer(server.base_url, "telnyx")
        assert (await peer.dial({"mode": "tts"}))[0] == 403
        assert (await peer.dial({"mode": "tts", "key": "wrong"}))[0] == 403
        status, body = await peer.dial({"mode": "tts", "instructions": "Be brief.", "key": "s3cret"})
        assert status == 200 and 'bidirectionalMode="rtp"' in body and "token=" in peer.stream_url
        assert "key=" not in peer.stream_url  # the webhook key stays between the carrier and us
        # The webhook's session options reach the call's conversation.
        await peer.connect()
        await wait_until(lambda: phone_call(server, peer) is not None, 10, "the Telnyx call")
        conversation = phone_call(server, peer).conversation
        assert conversation.mode == "tts" and conversation.instructions == "Be brief."
        await peer.stop()
        twilio = CarrierPeer(server.base_url)
        status, body = await twilio.dial({"mode": "sing"})
        assert status == 400 and "mode" in body
        await twilio.close()
    finally:
        await server.stop()


async def test_phone_calls_count_against_the_shared_session_cap(models):
    server = await start_server(models, max_sessions=1)
    try:
        first = CarrierPeer(server.base_url)
        assert (await first.dial({"mode": "tts"}))[0] == 200
        second = CarrierPeer(server.base_url)
        assert (await second.dial({"mode": "tts"}))[0] == 200  # admitted before the first call streams
        await first.connect()
        await wait_until(lambda: phone_call(server, first) is not None, 10, "the first call")
        async with aiohttp.ClientSession() as http:
            async with http.get(server.base_url + "/v1/realtime/config") as resp:
                assert (await resp.json())["calls"] == {"active": 1, "max": 1}
        # Full: a new webhook is told so (503), and an admitted stream over the cap is closed.
        third = CarrierPeer(server.base_url)
        assert (await third.dial({"mode": "tts"}))[0] == 503
        await second.connect()
        await wait_until(lambda: second.closed.is_set(), 10, "the stream over the cap to be closed")
        assert second.ws.close_code == 1011 and phone_call(server, second) is None
        await first.stop()
        await wait_until(lambda: not server.calls, 5, "the slot to free")
        assert (await third.dial({"mode": "tts"}))[0] == 200
        await asyncio.gather(second.close(), third.close())
    finally:
        await server.stop()
