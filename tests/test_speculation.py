"""Speculative replies: a turn's reply started from the pause pass's transcript before the turn ends,
adopted when the turn ends as predicted and dropped (unseen) when it does not; and the LLM
evaluating the conversation so far while the user speaks (the prefill at speech start).

The end-to-end tests use the real models (silero VAD, whisper tiny.en, SmolLM2 on llama.cpp, the
TTS engine on a tiny random checkpoint) and push espeak-ng speech at real time, as a microphone
does: passes only run while audio comes at about real time.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

import speechkit
from engine.agent.conversation import AudioOut, ConversationSession, TurnDetection
from engine.agent.conversation.speculation import ReplyPlan, Speculation
from engine.agent.llm import ChatOptions
from engine.agent.reply_stream import ReplyError, TextDelta
from engine.agent.tools import AUTO
from engine.speech.types import Reference, SamplingOptions, TTSRequest
from test_conversation import asr, collect_until, events, is_event, llm, vad  # noqa: F401 - fixtures
from test_conversation import pytestmark as needs_models  # espeak-ng, llama.cpp and SmolLM2
QUESTION = "What is the capital of France?"
GREEDY = ChatOptions(max_tokens=40, temperature=0.0)
TTS_FRAMES = SamplingOptions(max_new_tokens=12, seed=0)  # random tiny weights never stop on their own
# A long silence window: the pause pass surely lands (and the reply is surely speculated) before the turn ends.
PATIENT_VAD = TurnDetection(silence_duration_ms=1500)


# ---------------------------------------------------------------- the buffer itself
def _plan(**changes) -> ReplyPlan:
    base = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=40, temperature=0.0, tools=(),
                choice=AUTO, speak=True, request=TTSRequest(text=""))
    return ReplyPlan(**{**base, **changes})


def test_plans_are_the_same_only_with_the_same_messages_settings_and_voice_objects():
    voice = (Reference(text="ref", codes=np.zeros((2, 3), np.int64)),)
    a = _plan(request=TTSRequest(text="", references=voice))
    assert a.same_as(_plan(request=TTSRequest(text="", references=voice)))
    assert not a.same_as(_plan(request=TTSRequest(text="", references=(dataclasses.replace(voice[0]),))))
    assert not a.same_as(_plan(request=TTSRequest(text="", references=voice, sampling=SamplingOptions(seed=1))))
    assert not a.same_as(_plan(messages=[{"role": "user", "content": "hi!"}], request=a.request))
    assert not a.same_as(_plan(temperature=0.5, request=a.request))
    assert not a.same_as(_plan(speak=False, request=a.request))


async def _deltas(texts: list[str], gate: asyncio.Event, fail: bool = False):
    for i, text in enumerate(texts):
        if i == 1:
            await gate.wait()  # the rest comes after adoption
        yield TextDelta(text)
    if fail:
        raise ReplyError("llm", "broke mid-stream")


def _spawn(tasks: list):
    def spawn(coro):
        task = asyncio.ensure_future(coro)
        tasks.append(task)
        return task
    return spawn


async def test_a_replay_hands_on_what_was_made_restamped_then_the_rest_live():
    gate, tasks = asyncio.Event(), []
    speculation = Speculation(_plan(), _deltas(["The", " capital", " is Paris."], gate), _spawn(tasks))
    await asyncio.sleep(0.05)
    assert speculation.made == 1  # made ahead, held back
    adopted = time.monotonic()
    got = []
    async for item in speculation.replay():
        got.append(item)
        if len(got) == 1:
            gate.set()
    assert [i.text for i in got] == ["The", " capital", " is Paris."]
    assert got[0].t >= adopted  # stamped when the client can have it, not when it was made
    await asyncio.gather(*tasks)


async def test_closing_a_replay_even_unread_stops_the_generation():
    gate, tasks = asyncio.Event(), []
    speculation = Speculation(_plan(), _deltas(["a", "b"], gate), _spawn(tasks))
    await asyncio.sleep(0.01)
    await speculation.replay().aclose()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert tasks[0].cancelled()


async def test_a_failure_while_speculating_reaches_the_adopting_response():
    gate, tasks = asyncio.Event(), []
    gate.set()
    speculation = Speculation(_plan(), _deltas(["a", "b"], gate, fail=True), _spawn(tasks))
    await asyncio.sleep(0.01)
    got = []
    with pytest.raises(ReplyError, match="broke mid-stream"):
        async for item in speculation.replay():
            got.append(item.text)
    assert got == ["a", "b"]


# ---------------------------------------------------------------- with the real models
async def speak_live(session: ConversationSession, pcm: np.ndarray, during=None) -> None:
    """Push 20 ms pieces on the wall clock; `during(session)` runs after each push (may be async)."""
    t0 = time.monotonic()
    for i, chunk in enumerate(speechkit.frames(pcm, 320)):
        delay = t0 + i * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await session.push_audio(chunk)
        if during is not None:
            await during(session)


async def answered(session: ConversationSession, pcm: np.ndarray, during=None, *, before_reply=None,
                   timeout: float = 40.0) -> list:
    """Speak `pcm` live and collect the outputs until the reply's response.done; `before_reply()`
    (async) runs once the speech has been pushed, before waiting for the reply."""
    collector = asyncio.create_task(collect_until(session, is_event("response.done"), timeout=timeout))
    await speak_live(session, pcm, during=during)
    if before_reply is not None:
        await before_reply()
    return await collector


def once_speculating(act):
    """A `during` callback that runs `act(session)` once, as soon as a speculation has started, and
    the list its result goes into (empty if it never ran)."""
    results: list = []

    async def during(s: ConversationSession) -> None:
        if s.speculations["started"] and not results:
            results.append(act(s))
    return during, results


def session_with(asr, vad, llm, tts=None, **kwargs) -> ConversationSession:
    return ConversationSession(tts=tts, asr=asr, llm=llm, vad_model=vad, chat=GREEDY, sampling=TTS_FRAMES,
                               turn_detection=PATIENT_VAD, **kwargs)


def skip_without_models() -> None:
    for mark in needs_models:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])


@pytest.mark.parametrize("spoken", [False, True], ids=["text-only", "spoken"])
async def test_a_reply_is_started_in_the_pause_and_adopted_when_the_turn_ends(asr, vad, llm, tts_engine, spoken):
    skip_without_models()
    session = session_with(asr, vad, llm, tts_engine if spoken else None)
    pcm, _ = speechkit.speech_with_gaps([0.3, QUESTION, 2.0])
    try:
        items = await answered(session, pcm)
        assert session.speculations == {"started": 1, "adopted": 1, "dropped": 0}
        assert [e.type for e in events(items)].count("response.created") == 1
        transcript = events(items, "conversation.item.input_audio_transcription.completed")[0].data["transcript"]
        assert speechkit.wer(QUESTION, transcript) <= 0.3
        said = "".join(e.data["delta"] for e in events(items, "response.output_audio_transcript.delta"))
        assert "Paris" in said
        done = events(items, "response.done")[0]
        assert done.data["response"]["status"] == "completed"
        # The answer was written during the silence: its first words came out with the transcript.
        latency = done.data["latency_ms"]
        assert latency["first_token"] - latency["transcript"] < 5
        audio = [i for i in items if isinstance(i, AudioOut)]
        assert bool(audio) == spoken
        if spoken:
            assert latency["first_audio"] - latency["transcript"] < 5
            assert sum(len(a.pcm) for a in audio) > 0
        assert session.history == [{"role": "user", "content": transcript},
                                   {"role": "assistant", "content": said.strip()}]
    finally:
        await session.close()


async def test_speaking_on_drops_the_speculation_and_the_whole_turn_is_answered(asr, vad, llm):
    skip_without_models()
    session = session_with(asr, vad, llm)
    # The pause inside the turn is long enough for a pause pass to land (1 s), short of the 1.5 s turn end.
    pcm, _ = speechkit.speech_with_gaps([0.3, "What is the capital", 1.0, "of France?", 2.0])
    try:
        items = await answered(session, pcm)
        assert session.speculations == {"started": 2, "adopted": 1, "dropped": 1}
        assert [e.type for e in events(items)].count("response.created") == 1
        assert [e.type for e in events(items)].count("input_audio_buffer.speech_stopped") == 1
        transcript = events(items, "conversation.item.input_audio_transcription.completed")[0].data["transcript"]
        assert "France" in transcript
        assert session.history[0] == {"role": "user", "content": transcript}
    finally:
        await session.close()


async def test_a_conversation_changed_during_the_pause_drops_the_speculation(asr, vad, llm):
    skip_without_models()
    session = session_with(asr, vad, llm)
    pcm, _ = speechkit.speech_with_gaps([0.3, QUESTION, 2.0])
    add_a_note_once_speculating, noted = once_speculating(lambda s: s.add_message("system", "The user is in a hurry."))
    try:
        items = await answered(session, pcm, during=add_a_note_once_speculating)
        assert noted, "no speculation started during the pause"
        assert session.speculations == {"started": 1, "adopted": 0, "dropped": 1}
        done = events(items, "response.done")[0]
        assert done.data["response"]["status"] == "completed"
        # Answered afresh, with the note in the history it was asked with.
        assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    finally:
        await session.close()


async def test_no_speculation_in_manual_turns_or_tts_mode(asr, vad, llm, tts_engine):
    skip_without_models()
    pcm, _ = speechkit.speech_with_gaps([0.3, QUESTION, 2.0])
    for kwargs in ({"turn_detection": None}, {"mode": "tts", "turn_detection": PATIENT_VAD}):
        session = ConversationSession(tts=tts_engine, asr=asr, llm=llm, vad_model=vad, chat=GREEDY,
                                      sampling=TTS_FRAMES, **kwargs)
        try:
            await speak_live(session, pcm)
            assert session.speculations["started"] == 0
        finally:
            await session.close()


async def test_a_busy_shared_llm_gets_no_speculation_queued_in_front_of_another_reply(asr, vad, llm):
    skip_without_models()
    session = session_with(asr, vad, llm)
    pcm, _ = speechkit.speech_with_gaps([0.3, QUESTION, 2.0])
    # Another call's reply, generating through the whole turn.
    other = llm.stream_chat([{"role": "user", "content": "Count from one to two hundred."}], max_tokens=400,
                            temperature=0.0)
    first = await other.__anext__()
    assert first and llm.busy
    try:
        async def release_the_model() -> None:
            assert session.speculations["started"] == 0
            await other.aclose()  # this call's reply gets the model now

        items = await answered(session, pcm, before_reply=release_the_model, timeout=60)
        assert events(items, "response.done")[0].data["response"]["status"] == "completed"
    finally:
        await other.aclose()
        await session.close()
    assert not llm.busy


async def test_speculation_can_be_switched_off_by_the_server_setting(asr, vad, llm, monkeypatch, tmp_path):
    skip_without_models()
    from server.app import realtime_config
    from server.settings import Settings
    from signaling.configure import build_conversation
    from signaling.options import SessionOptions

    assert realtime_config(Settings(data_dir=tmp_path)).speculative_replies is True
    monkeypatch.setenv("SPECULATIVE_REPLIES", "false")
    config = realtime_config(Settings(data_dir=tmp_path))
    assert config.speculative_replies is False
    models = dataclasses.make_dataclass("Models", ["tts", "asr", "vad", "llm", "smart_turn", "loading"])(
        None, asr, vad, llm, None, False)
    session = await build_conversation(models, dataclasses.replace(config, turn_detection=PATIENT_VAD),
                                       SessionOptions())
    pcm, _ = speechkit.speech_with_gaps([0.3, QUESTION, 2.0])
    try:
        await answered(session, pcm)
        assert session.speculate is False and session.speculations["started"] == 0
    finally:
        await session.close()


@pytest.mark.parametrize("drop", ["clear_audio", "manual_turns"])
async def test_dropping_the_open_turn_drops_its_speculation(asr, vad, llm, drop):
    skip_without_models()
    session = session_with(asr, vad, llm)
    pcm, _ = speechkit.speech_with_gaps([0.3, QUESTION, 2.0])

    def drop_the_turn(s: ConversationSession) -> None:
        if drop == "clear_audio":
            s.clear_audio()  # input_audio_buffer.clear
        else:
            s.update(turn_detection=None)  # session.update to manual turns

    drop_the_turn_once_speculating, dropped = once_speculating(drop_the_turn)

    seen: list = []

    async def read() -> None:
        async for item in session.outputs():
            seen.append(item)

    reader = asyncio.create_task(read())
    try:
        await speak_live(session, pcm, during=drop_the_turn_once_speculating)
        await asyncio.sleep(1.0)
        assert dropped, "no speculation started during the pause"
        assert session.speculations == {"started": 1, "adopted": 0, "dropped": 1}
        kinds = [type(i).__name__ for i in seen]
        assert "ResponseCreated" not in kinds and "AudioOut" not in kinds and "ResponseTextDelta" not in kinds
        assert session.history == []
    finally:
        await session.close()
        await reader


# ---------------------------------------------------------------- the conversation, evaluated while the user speaks
async def test_the_llm_evaluates_the_conversation_so_far_while_the_user_speaks(asr, vad, llm):
    skip_without_models()
    from test_llm import CHAT_SO_FAR, EvalSpy

    system, *earlier = CHAT_SO_FAR
    session = session_with(asr, vad, llm, instructions=system["content"], history=earlier)
    pcm, _ = speechkit.speech_with_gaps([0.3, QUESTION, 2.0])
    speech_end = np.flatnonzero(np.abs(pcm) > 0.01)[-1]
    pieces = 0
    first_evaluation_at: list[int] = []  # how many samples had been pushed when it was seen

    async def note_the_first_evaluation(_: ConversationSession) -> None:
        nonlocal pieces
        pieces += 1
        if spy.prompts() and not first_evaluation_at:
            first_evaluation_at.append(pieces * 320)

    with EvalSpy(llm) as spy:
        try:
            items = await answered(session, pcm, during=note_the_first_evaluation)
        finally:
            await session.close()
    prefill, reply = spy.prompts()  # nothing else was evaluated in bulk: the reply (speculated) only its turn
    assert prefill > 40 and reply <= 20
    assert first_evaluation_at[0] < speech_end  # evaluated while the question was being spoken
    said = "".join(e.data["delta"] for e in events(items, "response.output_audio_transcript.delta"))
    assert "Paris" in said
