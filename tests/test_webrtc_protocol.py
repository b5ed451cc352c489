"""The `oai-events` protocol and session options, parsed without a network: every client event
shape we accept, the errors for the ones we refuse, and the OpenAI (GA and beta) session shapes."""
from __future__ import annotations

import json

import pytest

from engine.agent.conversation import TurnDetection
from signaling import protocol as ev
from signaling.options import OptionsError, from_query, from_session


def parse(event: dict) -> object:
    return ev.parse_client_event(json.dumps(event))


def test_each_client_event_parses_to_its_model():
    assert isinstance(parse({"type": "session.update", "session": {"mode": "tts"}}), ev.SessionUpdate)
    item = parse({"type": "conversation.item.create", "event_id": "e1", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": " Hi there "}]}})
    assert isinstance(item, ev.ConversationItemCreate) and item.item.text() == "Hi there" and item.event_id == "e1"
    assert isinstance(parse({"type": "response.create"}), ev.ResponseCreate)
    assert isinstance(parse({"type": "response.cancel"}), ev.ResponseCancel)
    assert isinstance(parse({"type": "output_audio_buffer.clear"}), ev.OutputAudioBufferClear)
    assert isinstance(parse({"type": "input_audio_buffer.commit"}), ev.InputAudioBufferCommit)
    tts = parse({"type": "tts.request", "text": "Say this.", "voice": "alice", "temperature": 0.5,
                 "sampling": {"top_p": 0.9, "max_new_tokens": 100}})
    assert isinstance(tts, ev.TTSRequestEvent) and tts.voice == "alice"
    assert tts.merged_sampling().model_dump(exclude_none=True) == {"temperature": 0.5, "top_p": 0.9,
                                                                  "max_new_tokens": 100}


@pytest.mark.parametrize("message, code, param", [
    ("{not json", "invalid_json", None),
    ('["a list"]', "invalid_event", None),
    ('{"type": "transcription_session.update", "session": {}, "event_id": "e7"}', "unknown_event", "type"),
    ('{"type": "tts.request", "text": ""}', "invalid_value", "text"),
    ('{"type": "tts.request", "text": "hi", "sampling": {"top_p": 1.5}}', "invalid_value", "sampling.top_p"),
    ('{"type": "tts.request", "text": "hi", "sampling": {"beam": 3}}', "invalid_value", "sampling.beam"),
    ('{"type": "conversation.item.create", "item": {"role": "robot"}}', "invalid_value", "item.role"),
])
def test_bad_client_events_name_the_problem(message, code, param):
    with pytest.raises(ev.ProtocolError) as err:
        ev.parse_client_event(message)
    assert err.value.code == code and err.value.param == param
    assert str(err.value)
    if '"event_id"' in message:
        assert err.value.event_id == "e7"  # so the client can match the error to its event


def test_oversized_and_binary_messages_are_refused():
    with pytest.raises(ev.ProtocolError, match="limited"):
        ev.parse_client_event("x" * (ev.MAX_CLIENT_MESSAGE_BYTES + 1))
    with pytest.raises(ev.ProtocolError) as err:
        ev.parse_client_event(b"\xff\xfe")
    assert err.value.code == "invalid_json"
    assert ev.is_keepalive("ping") and ev.is_keepalive(b"ping 42") and not ev.is_keepalive('{"type":"ping"}')


def test_server_events_carry_ids_and_timing():
    events = ev.ServerEvents(t0=100.0)
    first = events.build("response.created", {"response": {"id": "resp_1"}}, response_id="resp_1", t=100.25)
    second = events.error("invalid_value", "bad", param="voice", event_id="c1", t=100.5)
    assert first["event_id"] != second["event_id"]
    assert first["t_ms"] == 250.0 and first["response_id"] == "resp_1"
    assert second["error"] == {"type": "invalid_request_error", "code": "invalid_value", "message": "bad",
                               "param": "voice", "event_id": "c1"}


def test_long_transcript_deltas_are_split_in_order():
    events = ev.ServerEvents(t0=0.0)
    text = "word " * 300  # 1500 characters
    delta = events.build("response.output_audio_transcript.delta", {"delta": text, "item_id": "i"}, t=1.0)
    parts = ev.split_event(delta)
    assert len(parts) == 4 and "".join(p["delta"] for p in parts) == text
    assert all(len(ev.encode(p).encode()) < 1000 for p in parts)
    assert len({p["event_id"] for p in parts}) == 4 and all(p["item_id"] == "i" for p in parts)
    assert ev.split_event({"type": "x", "event_id": "e", "delta": "short"}) == [
        {"type": "x", "event_id": "e", "delta": "short"}]


def test_sctp_chunks_are_only_ever_lowered(monkeypatch):
    from aiortc import rtcsctptransport

    from signaling import datachannel as ev

    monkeypatch.setattr(rtcsctptransport, "USERDATA_MAX_LENGTH", 1200)  # what older aiortc used
    assert ev.clamp_sctp_chunks() == ev.SAFE_SCTP_USERDATA == rtcsctptransport.USERDATA_MAX_LENGTH
    monkeypatch.setattr(rtcsctptransport, "USERDATA_MAX_LENGTH", 900)
    assert ev.clamp_sctp_chunks() == 900


def test_session_shapes_ga_and_beta():
    ga = from_session({"type": "realtime", "instructions": "Be nice.", "audio": {
        "input": {"turn_detection": {"type": "server_vad", "threshold": 0.7, "silence_duration_ms": 300}},
        "output": {"voice": "alice"}}, "max_output_tokens": 64})
    assert ga.instructions == "Be nice." and ga.voice_id == "alice" and ga.max_output_tokens == 64
    assert ga.turn_detection == TurnDetection(threshold=0.7, silence_duration_ms=300)
    beta = from_session({"voice": "bob", "turn_detection": None, "mode": "tts",
                         "sampling": {"temperature": 0.3, "seed": 7}})
    assert (beta.voice_id, beta.turn_detection, beta.mode) == ("bob", None, "tts")
    assert beta.sampling == {"temperature": 0.3, "seed": 7}
    kept = from_session({"instructions": "x"})
    assert kept.turn_detection == "keep" and kept.mode is None
    # A partial turn_detection changes only what it names.
    partial = from_session({"turn_detection": {"silence_duration_ms": 900}}, TurnDetection(threshold=0.8))
    assert partial.turn_detection == TurnDetection(threshold=0.8, silence_duration_ms=900)


@pytest.mark.parametrize("session, param", [
    ({"mode": "karaoke"}, "mode"),
    ({"turn_detection": {"type": "loudness_vad"}}, "turn_detection.type"),
    ({"turn_detection": {"threshold": 1.5}}, "threshold"),
    ({"turn_detection": {"create_response": "maybe"}}, "create_response"),
    ({"sampling": {"top_k": 0}}, "top_k"),
    ({"sampling": {"beams": 2}}, "sampling"),
    ({"instructions": 42}, "instructions"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"turn_detection": "loud"}, "turn_detection"),
])
def test_bad_session_options_name_the_field(session, param):
    with pytest.raises(OptionsError) as err:
        from_session(session)
    assert err.value.param == param


def test_query_parameters_map_to_the_same_options():
    opts = from_query({"mode": "tts", "voice": "alice", "vad_threshold": "0.6", "silence_duration_ms": "800",
                       "interrupt_response": "false", "max_new_tokens": "50", "temperature": "0.4"})
    assert (opts.mode, opts.voice_id) == ("tts", "alice")
    assert opts.turn_detection == TurnDetection(threshold=0.6, silence_duration_ms=800, interrupt_response=False)
    assert opts.sampling == {"max_new_tokens": 50, "temperature": 0.4}
    assert from_query({"turn_detection": "none"}).turn_detection is None
    with pytest.raises(OptionsError):
        from_query({"turn_detection": "none", "threshold": "0.5"})
    with pytest.raises(OptionsError) as err:
        from_query({"max_new_tokens": "lots"})
    assert err.value.param == "max_new_tokens"
