"""Pipecat pipelines on our `/v1/realtime` WebSocket, unchanged: Pipecat's own
`OpenAIRealtimeLLMService` (GA protocol) in a real `Pipeline` with an input transport fed 24 kHz
PCM of espeak-ng speech and an output transport that plays in real time (examples/pipecat_bot.py),
against the real models: silero VAD, whisper tiny.en, SmolLM2 via llama.cpp, the TTS engine on a
tiny random checkpoint (it speaks noise, so reply audio is checked on its level and amount).

Pipecat parses every server event with its own pydantic models and treats almost any `error`
event as fatal, so each test also checks the wire: every event we sent parsed, none was an error.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import base64
import io
import secrets
import time
import types
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

import speechkit
from rtc_client import LocalServer

pytest.importorskip("pipecat")
pytestmark = pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed")

from pipecat.frames.frames import (EndFrame, ErrorFrame, Frame, LLMRunFrame, LLMTextFrame,  # noqa: E402
                                   TranscriptionFrame)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.services.openai.realtime import events as pipecat_events  # noqa: E402
from pipecat.services.openai.realtime import llm as pipecat_llm  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

_spec = importlib.util.spec_from_file_location("pipecat_bot", Path(__file__).parents[1] / "examples/pipecat_bot.py")
bot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bot)

QUESTION = "What is the capital of France?"
SECOND = "Please turn on the kitchen lights."
TTS_FRAMES = 24  # ~1.1 s of audio per sentence; the random tiny checkpoint never stops on its own
DELTAS = ("response.output_audio.delta", "response.output_audio_transcript.delta", "response.output_text.delta")
DONES = ("response.output_audio.done", "response.output_audio_transcript.done", "response.output_text.done",
         "response.content_part.done", "response.content_part.added")


@pytest.fixture
async def server(models):
    from engine.speech.types import SamplingOptions

    srv = await LocalServer(models, max_sessions=2, api_key="sekrit", llm_max_tokens=40,
                            sampling=SamplingOptions(max_new_tokens=TTS_FRAMES, seed=1)).start()
    yield srv
    await srv.stop()


@pytest.fixture
def wire(monkeypatch):
    """Every message Pipecat's service sent and received, and whether Pipecat's own models parsed
    what it received (a parse failure ends its receive loop)."""
    log = types.SimpleNamespace(sent=[], received=[], unparsed=[], largest=0)
    parse = pipecat_events.parse_server_event
    ws_send = pipecat_llm.OpenAIRealtimeLLMService._ws_send

    def recording_parse(message):
        event = json.loads(message)
        log.received.append(event)
        log.largest = max(log.largest, len(message.encode() if isinstance(message, str) else message))
        try:
            return parse(message)
        except Exception as exc:
            log.unparsed.append((event.get("type"), str(exc)[:300]))
            raise

    async def recording_send(self, message):
        log.sent.append(message)
        await ws_send(self, message)

    monkeypatch.setattr(pipecat_events, "parse_server_event", recording_parse)
    monkeypatch.setattr(pipecat_llm.OpenAIRealtimeLLMService, "_ws_send", recording_send)
    return log


class Tap(FrameProcessor):
    """Notes the frames that pass (both ways), with the time they passed."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        self.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def of(self, kind: type) -> list:
        return [f for _, f in self.frames if isinstance(f, kind)]


class Call:
    """One Pipecat pipeline against the server: mic -> user context -> tap -> realtime service ->
    tap -> speaker -> assistant context."""

    def __init__(self, server, *, text_only: bool = False, context: LLMContext | None = None,
                 voice: str = "alloy", turn_detection=None) -> None:
        url = server.base_url.replace("http", "ws") + "/v1/realtime"
        self.mic, self.speaker = bot.PcmInput(), bot.PcmSpeaker()
        self.llm = bot.realtime_service(url, "sekrit", text_only=text_only, voice=voice,
                                        turn_detection=turn_detection)
        self.context = context or LLMContext()
        user, assistant = LLMContextAggregatorPair(self.context)
        self.up, self.down = Tap(), Tap()
        pipeline = Pipeline([self.mic, user, self.up, self.llm, self.down, self.speaker, assistant])
        self.worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True),
                                     cancel_on_idle_timeout=False)
        self.runner = WorkerRunner(handle_sigint=False)
        self._run: asyncio.Task | None = None
        self._silence: asyncio.Task | None = None

    async def __aenter__(self) -> Call:
        await self.runner.add_workers(self.worker)
        self._run = asyncio.create_task(self.runner.run())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._silence is not None:
            self._silence.cancel()
        await self.worker.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(self._run, 20)
        except asyncio.TimeoutError:
            await self.worker.cancel()
            await asyncio.gather(self._run, return_exceptions=True)

    async def until(self, predicate, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert not self.up.of(ErrorFrame), self.up.of(ErrorFrame)
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    async def greet(self, wire) -> None:
        """Start as Pipecat's own bots do: an `LLMRunFrame` on connect sets the service's
        conversation up at once (the bot greets from its instructions), so it never re-sends the
        context as new items after a server-VAD turn (Pipecat 1.14 does that otherwise)."""
        await self.worker.queue_frame(LLMRunFrame())
        await self.until(lambda: self.responses_done(wire) and self.speaker.stopped.is_set())
        self.speaker.stopped.clear()

    async def say(self, text: str) -> float:
        """Speak `text` into the mic, then keep the mic open with silence; returns when the speech ended."""
        if self._silence is not None:
            self._silence.cancel()
        await self.mic.speak(pcm24k(text))
        ended = time.monotonic()
        self._silence = asyncio.create_task(self.mic.silence(600))
        return ended

    def responses_done(self, wire) -> list[dict]:
        return [e for e in wire.received if e["type"] == "response.done"]


def pcm24k(text: str) -> bytes:
    return speechkit.pcm24k_bytes(speechkit.speech_with_gaps([0.2, text, 0.1])[0])


def assert_wire_clean(wire, allowed_errors: tuple[str, ...] = ()) -> None:
    """What Pipecat relies on: each event parsed, carries an event_id, no `error`; deltas and
    dones name their response, item, output and content index; every response.created ends in a
    response.done."""
    assert not wire.unparsed, wire.unparsed
    assert wire.largest < 1 << 20, wire.largest  # every WebSocket message under 1 MiB
    errors = [e for e in wire.received if e["type"] == "error" and e["error"]["code"] not in allowed_errors]
    assert not errors, errors
    for event in wire.received:
        assert event.get("event_id"), event["type"]
        if event["type"] in DELTAS + DONES:
            missing = {"response_id", "item_id", "output_index", "content_index"} - set(event)
            assert not missing, (event["type"], missing)
    created = [e["response"]["id"] for e in wire.received if e["type"] == "response.created"]
    done = [e["response"]["id"] for e in wire.received if e["type"] == "response.done"]
    assert created == done, (created, done)


def event_table(wire) -> str:
    def counts(events):
        out: dict[str, int] = {}
        for e in events:
            out[e["type"]] = out.get(e["type"], 0) + 1
        return out

    lines = ["| direction | event | count |", "| --- | --- | --- |"]
    lines += [f"| Pipecat -> server | {t} | {n} |" for t, n in counts(wire.sent).items()]
    lines += [f"| server -> Pipecat | {t} | {n} |" for t, n in counts(wire.received).items()]
    return "\n".join(lines)


async def test_text_turn(server, wire):
    context = LLMContext(messages=[{"role": "user", "content": QUESTION}])
    async with Call(server, text_only=True, context=context) as call:
        await call.worker.queue_frame(LLMRunFrame())
        await call.until(lambda: call.responses_done(wire))
        await call.until(lambda: any(m.get("role") == "assistant" for m in context.get_messages()), 10)
    text = "".join(f.text for f in call.down.of(LLMTextFrame))
    assert text.strip(), "no reply text"
    assistant = [m for m in context.get_messages() if m.get("role") == "assistant"]
    assert assistant and assistant[-1]["content"].strip() == text.strip()
    sent = [m["type"] for m in wire.sent]
    assert sent[:1] == ["session.update"] and "conversation.item.create" in sent and "response.create" in sent
    item = next(m["item"] for m in wire.sent if m["type"] == "conversation.item.create")
    created = next(e for e in wire.received if e["type"] == "conversation.item.added" and e["item"]["role"] == "user")
    assert created["item"]["id"] == item["id"]  # the client's own id is kept
    done = call.responses_done(wire)[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"].strip() == text.strip()
    assert not [e for e in wire.received if e["type"] == "response.output_audio.delta"]  # text only
    assert_wire_clean(wire)


async def test_spoken_turns_with_server_vad_keep_history(server, wire):
    """The bot starts as Pipecat's own examples do: an `LLMRunFrame` on connect, so the service sets
    up its conversation at once and the bot greets from its instructions (a response on an empty
    conversation). Then two spoken turns, each ended by the server's VAD, which answers them; the
    server and Pipecat's context both hold the same five messages. (Without the run frame, Pipecat
    1.14 sets up its conversation on the first context update after a server-VAD turn and re-sends
    that turn as a new item: a duplicate question, and a race between two responses.)"""
    async with Call(server) as call:
        await call.greet(wire)
        greeting = len(wire.received)
        ended = await call.say(QUESTION)
        await call.until(lambda: len(call.responses_done(wire)) >= 2 and call.speaker.stopped.is_set())
        first_audio = call.speaker.first_audio_at[1] - ended

        transcripts = [f.text for f in call.up.of(TranscriptionFrame)]
        assert transcripts and speechkit.wer(QUESTION, transcripts[0]) <= 0.3, transcripts
        pcm = np.frombuffer(bytes(call.speaker.audio), dtype="<i2")
        assert len(pcm) / 24_000 > 1.0 and float(np.sqrt(np.mean((pcm / 32768.0) ** 2))) > 0.003
        assert len(call.speaker.ttfb) >= 2, "Pipecat reported no TTFB for the spoken turn"
        types_seen = [e["type"] for e in wire.received[greeting:]]
        order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
                 "response.created", "response.output_audio.delta", "response.done"]
        positions = [types_seen.index(t) for t in order]
        assert positions == sorted(positions), types_seen
        print("\n" + event_table(wire))
        print(f"Pipecat TTFB (speech_stopped -> first audio delta): {call.speaker.ttfb[1]:.2f} s; "
              f"end of input speech -> first reply audio played: {first_audio:.2f} s")

        # The second turn: the server and Pipecat's context both hold the whole conversation.
        call.speaker.stopped.clear()
        await call.say(SECOND)
        await call.until(lambda: len(call.responses_done(wire)) >= 3 and call.speaker.stopped.is_set())
        await call.until(lambda: len([m for m in call.context.get_messages() if m.get("role") == "assistant"]) >= 3,
                         10)
        session = next(iter(server.calls.values()))
        items = session.conversation.items()
        expected = ["assistant", "user", "assistant", "user", "assistant"]
        assert [i.role for i in items] == expected, items
    roles = [m["role"] for m in call.context.get_messages()]
    assert roles == expected, call.context.get_messages()
    assert [m["type"] for m in wire.sent].count("conversation.item.create") == 0  # nothing re-sent
    assert all(r["response"]["status"] == "completed" for r in call.responses_done(wire))
    assert_wire_clean(wire)


@pytest.mark.parametrize("turns", ["server_vad", "truncate_only"])
async def test_barge_in_cancels_the_reply(server, wire, turns):
    """Speech while the reply plays: the server's VAD cancels it (interrupt_response, true by
    default), or, with interrupt_response off, Pipecat's conversation.item.truncate alone stops it."""
    detection = (pipecat_events.SemanticTurnDetection(create_response=True, interrupt_response=False)
                 if turns == "truncate_only" else None)
    async with Call(server, turn_detection=detection) as call:
        await call.greet(wire)
        await call.say(QUESTION)
        await call.until(lambda: len(call.speaker.first_audio_at) >= 2)  # the reply (after the greeting) plays
        # Speech while the reply plays, with no pause inside: the truncate-only case is semantic_vad
        # (Pipecat sets interrupt_response only there), which would end a turn at a comma.
        await call.say("Please stop talking now.")
        await call.until(lambda: len(call.responses_done(wire)) >= 3)
        session = next(iter(server.calls.values()))
        items = session.conversation.items()
    first, second = (r["response"] for r in call.responses_done(wire)[1:3])
    updated = [e for e in wire.received if e["type"] == "session.updated"][-1]["session"]
    turn = updated["audio"]["input"]["turn_detection"]
    assert turn["create_response"] is True and turn["interrupt_response"] is (turns == "server_vad"), turn
    assert first["status"] == "cancelled" and second["status"] == "completed", (first, second)
    truncate = [m for m in wire.sent if m["type"] == "conversation.item.truncate"]
    assert truncate and truncate[0]["item_id"] == first["output"][0]["id"]  # Pipecat cut it where it was heard
    # The server keeps only what was heard of the cut reply (maybe nothing), then the new turn. What
    # was heard is Pipecat's truncate when it comes after the cancel: it may say a word more than the
    # server's own estimate at the cancel, which response.done carried, so compare with what was written.
    generated = "".join(e["delta"] for e in wire.received
                        if e["type"] == "response.output_audio_transcript.delta" and e["response_id"] == first["id"])
    cut = [i for i in items if i.id == first["output"][0]["id"]]
    assert not cut or generated.strip().startswith(cut[0].text), (cut, generated)
    assert [i.role for i in items if i not in cut] == ["assistant", "user", "user", "assistant"], items
    assert items[-1].id == second["output"][0]["id"]
    assert [m["type"] for m in wire.sent].count("conversation.item.create") == 0  # nothing re-sent
    assert_wire_clean(wire)


async def test_odd_but_legal_events_keep_the_session(server, wire):
    async with Call(server, text_only=True) as call:
        await call.until(lambda: any(e["type"] == "session.updated" for e in wire.received), 20)
        send = call.llm.send_client_event
        await call.llm._ws_send({"type": "input_audio_buffer.append", "audio": ""})
        await call.llm._ws_send({"type": "session.update", "session": {
            "type": "realtime", "tools": [], "tool_choice": "auto", "tracing": None, "include": None,
            "model": "some-other-model", "x_unknown_option": 1,
            "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe", "language": "en"},
                                "noise_reduction": {"type": "near_field"},
                                "turn_detection": {"type": "semantic_vad", "eagerness": "auto"}},
                      "output": {"voice": "marin", "speed": 1.0}}}})
        await send(pipecat_events.ConversationItemCreateEvent(item=pipecat_events.ConversationItem(
            id=secrets.token_hex(16), type="message", role="system",
            content=[pipecat_events.ItemContent(type="input_text", text="Be brief.")])))
        await call.llm._ws_send({"type": "conversation.item.create", "item": {
            "id": secrets.token_hex(16), "type": "message", "role": "developer",
            "content": [{"type": "input_text", "text": "Answer in English."}]}})
        await send(pipecat_events.ResponseCancelEvent())  # nothing to cancel
        await call.until(lambda: sum(e["type"] == "conversation.item.done" for e in wire.received) >= 2, 20)
        updated = [e for e in wire.received if e["type"] == "session.updated"][-1]["session"]
        assert updated["audio"]["output"]["voice"] == "marin" and updated["model"] == "some-other-model"

        # A finished reply's item truncated afterwards (as Pipecat does when speech starts late).
        await call.llm._ws_send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}})
        await call.llm._ws_send({"type": "response.create"})
        await call.until(lambda: call.responses_done(wire))
        reply = call.responses_done(wire)[-1]["response"]["output"][0]["id"]
        await send(pipecat_events.ConversationItemTruncateEvent(item_id=reply, content_index=0, audio_end_ms=0))
        item = await asyncio.wait_for(call.llm.retrieve_conversation_item(reply), 20)
        assert item.id == reply and item.role == "assistant"
        # An unknown item is an error, one Pipecat's own retrieve call turns into an exception (not a dead call).
        with pytest.raises(Exception, match="no conversation item"):
            await asyncio.wait_for(call.llm.retrieve_conversation_item("item_nope"), 20)
        await send(pipecat_events.ResponseCreateEvent())
        await call.until(lambda: len(call.responses_done(wire)) >= 2)
        assert not call.up.of(ErrorFrame)
    assert_wire_clean(wire, allowed_errors=("item_retrieve_invalid_item_id",))
    errors = [e["error"] for e in wire.received if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["item_retrieve_invalid_item_id"], errors


async def test_audio_before_the_first_session_update_is_taken(server):
    """Clients start streaming the microphone as soon as the socket opens."""
    url = server.base_url.replace("http", "ws") + "/v1/realtime?model=gpt-realtime"
    speech = base64.b64encode(pcm24k(QUESTION)[:24_000 * 2]).decode()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers={"Authorization": "Bearer sekrit"}) as ws:
            await ws.send_json({"type": "input_audio_buffer.append", "audio": speech})
            await ws.send_json({"type": "session.update", "session": {"type": "realtime"}})
            seen = []
            while "session.updated" not in seen:
                seen.append(json.loads((await asyncio.wait_for(ws.receive(), 20)).data)["type"])
            assert "error" not in seen, seen


async def test_a_cloned_voice_is_chosen_by_a_plain_string(server, models, wire):
    """Pipecat (like other typed clients) takes `audio.output.voice` only as a string: a saved
    reference id is that string, and the session reports it back as sent."""
    sample = io.BytesIO()
    with wave.open(sample, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((speechkit.espeak_wav("Hello from the server.") * 32767).astype("<i2").tobytes())
    if not models.references.exists("pipecat-voice"):
        models.references.add("pipecat-voice", sample.getvalue(), "Hello from the server.", "voice.wav")
    context = LLMContext(messages=[{"role": "user", "content": QUESTION}])
    async with Call(server, context=context, voice="pipecat-voice") as call:
        await call.worker.queue_frame(LLMRunFrame())
        await call.until(lambda: call.responses_done(wire) and call.speaker.stopped.is_set())
    updated = [e for e in wire.received if e["type"] == "session.updated"][-1]["session"]
    assert updated["audio"]["output"]["voice"] == "pipecat-voice"
    assert len(call.speaker.audio) > 24_000  # it spoke (with the cloned voice's prompt)
    assert_wire_clean(wire)
