"""The telephony bridge's parts on their own: G.711 through PyAV against an independent
reference, telephone-band speech through whisper, stream tokens, the three dialects' documented
message shapes, and the paced sender's marks and clears (driven in real time)."""
from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest

import speechkit
from phone_peer import mulaw_decode, mulaw_encode, telephone_speech
from signaling.telephony.codec import PhoneDecoder, PhoneEncoder, UnsupportedAudio
from signaling.telephony.messages import Dtmf, Media, MessageError, Played, Start, Stop
from signaling.telephony.playback import CarrierPlayback
from signaling.telephony.plivo import PlivoDialect
from signaling.telephony.telnyx import TelnyxDialect
from signaling.telephony.tokens import StreamTokens, TokenError
from signaling.telephony.twilio import TwilioDialect


# --------------------------------------------------------------------------- audio
def test_mulaw_decoding_matches_the_g711_reference_for_every_code():
    codes = bytes(range(256))
    decoder = PhoneDecoder("mulaw", 8000)
    # Through the 16 kHz resampler a constant stays that constant: compare on held values.
    held = b"".join(bytes([c]) * 80 for c in codes)
    pcm = decoder.decode(held)
    expected = np.repeat(mulaw_decode(codes).astype(np.float32) / 32768.0, 160)
    middle = np.concatenate([np.arange(i * 160 + 40, i * 160 + 120) for i in range(256)])  # away from edges
    assert np.abs(pcm[middle] - expected[middle]).max() < 2e-3


def test_encoder_quantises_within_one_g711_step_and_keeps_time():
    t = np.arange(44_100) / 44_100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    encoder = PhoneEncoder("mulaw", 8000)
    data = b"".join(encoder.encode(tone[i:i + 4410], 44_100) for i in range(0, len(tone), 4410)) + encoder.flush()
    assert abs(len(data) - 8000) <= 2  # one second in, one second (8000 bytes) out
    ours = mulaw_decode(data).astype(np.float64) / 32768.0
    reference = mulaw_decode(mulaw_encode((0.5 * np.sin(2 * np.pi * 440 * np.arange(len(data)) / 8000)
                                           * 32767).astype(np.int16))) / 32768.0
    # Same tone, same level: μ-law noise is ~-38 dB; the resampler's group delay aside, the spectra agree.
    spectrum = np.abs(np.fft.rfft(ours * np.hanning(len(ours))))
    assert abs(np.argmax(spectrum) * 8000 / len(ours) - 440) < 2
    assert abs(np.sqrt(np.mean(ours ** 2)) - np.sqrt(np.mean(reference ** 2))) < 0.01


def test_alaw_round_trip_and_unsupported_encodings():
    t = np.arange(8000) / 8000
    tone = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    encoder, decoder = PhoneEncoder("alaw", 8000), PhoneDecoder("alaw", 8000)
    back = decoder.decode(encoder.encode(tone, 8000) + encoder.flush())
    assert abs(np.sqrt(np.mean(back ** 2)) - 0.3 / np.sqrt(2)) < 0.01
    with pytest.raises(UnsupportedAudio):
        PhoneDecoder("opus")  # type: ignore[arg-type]


def test_telephone_band_mulaw_speech_is_still_transcribed():
    """The caller's line: 8 kHz, 300-3400 Hz, μ-law (the peer's own encoder) -> our decoder -> whisper."""
    from engine.agent.asr import Transcriber

    asr = Transcriber.load()
    for sentence in ("What is the capital of France?", "Please turn on the kitchen lights."):
        line = mulaw_encode(telephone_speech(speechkit.espeak_wav(sentence)))
        decoder = PhoneDecoder("mulaw", 8000)
        pcm = np.concatenate([decoder.decode(line[i:i + 160]) for i in range(0, len(line), 160)])
        assert abs(len(pcm) / 16_000 - len(line) / 8000) < 0.05
        transcript = asyncio.run(asr.transcribe(pcm))
        assert speechkit.wer(sentence, transcript) <= 0.25, transcript


# --------------------------------------------------------------------------- tokens
def test_stream_tokens_are_signed_bound_single_use_and_expire():
    tokens = StreamTokens("secret", ttl=60)
    token = tokens.issue("CA1")
    with pytest.raises(TokenError, match="another call"):
        tokens.redeem(token, "CA2")
    tokens.redeem(token, "CA1")
    with pytest.raises(TokenError, match="used already"):
        tokens.redeem(token, "CA1")
    with pytest.raises(TokenError, match="signature"):
        StreamTokens("other secret", 60).redeem(tokens.issue("CA1"), "CA1")
    with pytest.raises(TokenError, match="signature"):
        body, _, sig = tokens.issue(None).partition(".")
        tokens.redeem(body[:-2] + "AA." + sig)
    for bad in (None, "", "nodot", "a.b.c"):
        with pytest.raises(TokenError):
            tokens.redeem(bad)
    short = StreamTokens("secret", ttl=0.05)
    late = short.issue(None)
    time.sleep(0.1)
    with pytest.raises(TokenError, match="expired"):
        short.redeem(late)


# --------------------------------------------------------------------------- dialects
def test_twilio_messages_parse_and_build_in_the_documented_shapes():
    d = TwilioDialect()
    start = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
             "start": {"accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
                       "customParameters": {"mode": "tts", "token": "t"},
                       "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}
    assert d.is_start(start) and not TelnyxDialect().is_start(start) and not PlivoDialect().is_start(start)
    assert d.parse(start) == Start("MZ1", "CA1", {"mode": "tts", "token": "t"}, "mulaw", 8000, "AC1")
    silence = base64.b64encode(b"\xff" * 160).decode()
    media = {"event": "media", "sequenceNumber": "3", "streamSid": "MZ1",
             "media": {"track": "inbound", "chunk": "1", "timestamp": "5", "payload": silence}}
    assert d.parse(media) == Media(b"\xff" * 160, "inbound")
    assert d.parse({"event": "dtmf", "streamSid": "MZ1", "sequenceNumber": "5",
                    "dtmf": {"track": "inbound_track", "digit": "1"}}) == Dtmf("1")
    assert d.parse({"event": "mark", "sequenceNumber": "4", "streamSid": "MZ1", "mark": {"name": "m"}}) == Played("m")
    assert d.parse({"event": "stop", "sequenceNumber": "5", "streamSid": "MZ1",
                    "stop": {"accountSid": "AC1", "callSid": "CA1"}}) == Stop()
    opus = {"event": "start",
            "start": {"streamSid": "MZ1", "callSid": "CA1", "mediaFormat": {"encoding": "audio/opus"}}}
    for bad in ({"event": "media", "media": {"payload": "%%%"}}, {"event": "media"}, {"event": "what"},
                {"event": "mark", "mark": {}}, opus):
        with pytest.raises(MessageError):
            d.parse(bad)
    assert d.media("MZ1", b"\x01", "mulaw", 8000) == {"event": "media", "streamSid": "MZ1",
                                                       "media": {"payload": "AQ=="}}
    assert d.mark("MZ1", "x") == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "x"}}
    assert d.clear("MZ1") == {"event": "clear", "streamSid": "MZ1"}


def test_telnyx_and_plivo_messages():
    t = TelnyxDialect()
    start = {"event": "start", "sequence_number": "1", "stream_id": "S1",
             "start": {"user_id": "U", "call_control_id": "v3:C", "client_state": "aGk=",
                       "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}}
    assert t.is_start(start) and not TwilioDialect().is_start(start)
    assert t.parse(start) == Start("S1", "v3:C", {}, "alaw", 8000, "U")
    assert t.parse({"event": "dtmf", "stream_id": "S1", "sequence_number": "5", "dtmf": {"digit": "#"}}) == Dtmf("#")
    assert t.parse({"event": "error", "payload": {"code": 100002}}).event == "error"
    assert t.media("S1", b"\x01", "alaw", 8000) == {"event": "media", "media": {"payload": "AQ=="}}
    assert t.clear("S1") == {"event": "clear"} and t.mark("S1", "n") == {"event": "mark", "mark": {"name": "n"}}

    p = PlivoDialect()
    start = {"event": "start", "sequenceNumber": 0, "extra_headers": "token=abc,mode=tts",
             "start": {"callId": "C", "streamId": "S", "accountId": "A", "tracks": ["inbound"],
                       "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}}
    assert p.is_start(start) and not TelnyxDialect().is_start(start)
    assert p.parse(start) == Start("S", "C", {"token": "abc", "mode": "tts"}, "mulaw", 8000, "A")
    assert p.parse({"event": "playedStream", "streamId": "S", "name": "n"}) == Played("n")
    assert p.media("S", b"\x01", "mulaw", 8000) == {
        "event": "playAudio", "streamId": "S",
        "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": "AQ=="}}
    assert p.mark("S", "n") == {"event": "checkpoint", "streamId": "S", "name": "n"}
    assert p.clear("S") == {"event": "clearAudio", "streamId": "S"}


# --------------------------------------------------------------------------- the paced sender
async def test_playback_paces_marks_reports_heard_audio_and_clears():
    sent: list[tuple[float, dict]] = []
    played: list[tuple[str, float]] = []

    async def send(message: dict) -> None:
        sent.append((time.monotonic(), json.loads(json.dumps(message))))

    playback = CarrierPlayback(dialect=TwilioDialect(), stream_id="MZ1", encoding="mulaw", rate=8000, send=send,
                               on_played=lambda rid, seconds: played.append((rid, seconds)))
    task = asyncio.create_task(playback.run())
    try:
        playback.push("r1", np.full(44_100 * 2, 0.2, np.float32), 44_100)  # 2 s, all at once
        t0 = time.monotonic()
        await asyncio.sleep(1.0)
        media = [(t, m) for t, m in sent if m["event"] == "media"]
        # Paced: after 1 s, about 1 s + the lead has gone out, not the whole 2 s.
        seconds = sum(len(base64.b64decode(m["media"]["payload"])) for _, m in media) / 8000
        assert 1.0 + playback.lead - 0.25 <= seconds <= 1.0 + playback.lead + 0.15, seconds
        assert media[0][0] - t0 < 0.05  # the first chunk leaves at once
        # A mark follows every media message.
        kinds = [m["event"] for _, m in sent]
        assert kinds == ["media", "mark"] * (len(kinds) // 2)
        names = [m["mark"]["name"] for _, m in sent if m["event"] == "mark"]
        # The carrier echoes the third mark: 0.3 s of r1 has played.
        playback.played(names[2])
        assert played == [("r1", pytest.approx(0.3, abs=1e-6))]
        playback.played(names[1])  # an older echo after a newer one changes nothing
        assert len(played) == 1
        # Barge-in: a clear goes out, queued audio is dropped, echoes of dropped marks are ignored.
        await playback.clear("r1")
        assert sent[-1][1] == {"event": "clear", "streamSid": "MZ1"}
        assert playback.stats.cleared_seconds > 0.5
        playback.played(names[-1])
        assert len(played) == 1
        count = len(sent)
        await asyncio.sleep(0.3)
        assert len(sent) == count  # nothing of r1 after the clear
        # The next response starts at once, and its tail is padded to whole 20 ms frames.
        playback.push("r2", np.full(4410 + 100, 0.2, np.float32), 44_100)
        playback.end_response("r2")
        await asyncio.sleep(0.3)
        tail = [base64.b64decode(m["media"]["payload"]) for _, m in sent[count:] if m["event"] == "media"]
        assert sum(len(p) for p in tail) % 160 == 0 and tail[-1].endswith(b"\xff")
    finally:
        task.cancel()
