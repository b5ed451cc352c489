"""semantic_vad: the Smart Turn v3 model (pipecat-ai's bundled ONNX file) on real espeak-ng speech,
its input features against pipecat's own, the end-of-turn layer over real silero, the session
options, and a spoken turn over /v1/realtime with the openai SDK against the real models."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import speechkit
from engine.agent.smart_turn import (MODEL_SAMPLES, SemanticEndOfTurn, SemanticTurnDetection, SmartTurn,
                                     smart_turn_onnx_path)
from engine.agent.vad import INPUT_SAMPLE_RATE, SileroVAD, SpeechStarted, SpeechStopped, TurnDetection, TurnDetector
from signaling.options import OptionsError, describe_turn_detection, from_query, from_session

needs_espeak = pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed")

COMPLETE = "What is the capital of France?"
# With espeak's flat prosody the model cannot tell the bare "I would like to order a" from a complete
# sentence (it scores 0.5-0.85 across voices and rates); a trailing filler or a clause cut after its
# modal verb it scores as unfinished (< 0.3) in every voice tried.
UNFINISHED = ["I would like to order a, um", "I was thinking that maybe we could"]


@pytest.fixture(scope="module")
def smart_turn() -> SmartTurn:
    return SmartTurn.load()


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    return SileroVAD.load()


def spoken(text: str, lead: float = 0.3, tail: float = 0.2) -> np.ndarray:
    pcm, _ = speechkit.speech_with_gaps([lead, text, tail])
    return pcm


# ---------------------------------------------------------------------------- the model's input
def pipecat_input(audio: np.ndarray) -> np.ndarray:
    """What pipecat feeds the model: its vendored Whisper features of the last 8 s, zero-padded in front."""
    from pipecat.audio.turn.smart_turn._whisper_features import compute_whisper_log_mel_features

    audio = audio[-MODEL_SAMPLES:]
    return compute_whisper_log_mel_features(np.pad(audio, (MODEL_SAMPLES - len(audio), 0)), do_normalize=True)


@needs_espeak
@pytest.mark.parametrize("seconds", [0.0, 1.5, 8.0, 11.0])  # empty, short (padded), exact, long (truncated)
def test_features_match_pipecats(smart_turn, seconds):
    words = " ".join(["What is the capital of France, and how far is it from Berlin?"] * 3)
    audio = speechkit.espeak_wav(words)[:int(seconds * INPUT_SAMPLE_RATE)]
    assert seconds == 0 or len(audio) == int(seconds * INPUT_SAMPLE_RATE)
    ours, theirs = smart_turn.features(audio), pipecat_input(audio)
    assert ours.shape == theirs.shape == (80, 800) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@needs_espeak
def test_probability_matches_pipecats_analyzer(smart_turn):
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3

    analyzer = LocalSmartTurnAnalyzerV3(sample_rate=INPUT_SAMPLE_RATE)
    for text in [COMPLETE, *UNFINISHED]:
        audio = spoken(text)
        theirs = analyzer._predict_endpoint(audio)["probability"]
        assert smart_turn.probability(audio) == pytest.approx(theirs, abs=1e-4), text


def test_the_model_loads_without_importing_pipecat():
    code = ("import sys; from engine.agent.smart_turn import SmartTurn; SmartTurn.load(); "
            "print('pipecat' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=".")
    assert out.stdout.split() == ["False", "False"], out.stderr
    assert smart_turn_onnx_path().name == "smart-turn-v3.2-cpu.onnx"


@needs_espeak
def test_a_complete_question_scores_above_unfinished_speech(smart_turn):
    complete = smart_turn.probability(spoken(COMPLETE))
    unfinished = [smart_turn.probability(spoken(text)) for text in UNFINISHED]
    assert complete > 0.5 > max(unfinished), (complete, unfinished)
    assert complete - max(unfinished) > 0.3


# ---------------------------------------------------------------------------- end of turn over silero
async def push_all(end_of_turn: SemanticEndOfTurn, pcm: np.ndarray, piece: int = 320) -> list[tuple[int, object]]:
    """(samples pushed when it came out, event) for every event, in 20 ms pushes."""
    out = []
    for start in range(0, len(pcm), piece):
        for event in await end_of_turn.push(pcm[start:start + piece]):
            out.append((start + piece, event))
    return out


def semantic(vad, smart_turn, params: SemanticTurnDetection) -> SemanticEndOfTurn:
    return SemanticEndOfTurn(TurnDetector(vad, params.silence_params()), smart_turn, params)


@needs_espeak
async def test_a_complete_question_ends_its_turn_before_server_vad_would(vad, smart_turn):
    pcm, truth = speechkit.speech_with_gaps([0.3, COMPLETE, 3.0])
    speech_end = int(truth[0][1] * INPUT_SAMPLE_RATE)
    events = await push_all(semantic(vad, smart_turn, SemanticTurnDetection(eagerness="low")), pcm)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped]
    at, stopped = events[1]
    waited_ms = (at - speech_end) * 1000 / INPUT_SAMPLE_RATE
    assert 100 < waited_ms < 450, waited_ms  # server_vad's default waits 500 ms of silence
    assert abs(stopped.audio_end_ms - truth[0][1] * 1000) < 200
    assert len(stopped.audio) >= speech_end - int(0.3 * INPUT_SAMPLE_RATE)  # the whole question is in the turn


@needs_espeak
@pytest.mark.parametrize("eagerness, max_wait_ms", [("high", 1000), ("auto", 2000)])
async def test_unfinished_speech_waits_for_the_eagerness_max_wait(vad, smart_turn, eagerness, max_wait_ms):
    pcm, truth = speechkit.speech_with_gaps([0.3, UNFINISHED[0], max_wait_ms / 1000 + 1.0])
    speech_end = int(truth[0][1] * INPUT_SAMPLE_RATE)
    end_of_turn = semantic(vad, smart_turn, SemanticTurnDetection(eagerness=eagerness))
    events = await push_all(end_of_turn, pcm)
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechStopped]
    waited_ms = (events[1][0] - speech_end) * 1000 / INPUT_SAMPLE_RATE
    # Silence counts from the end of the sound, to a frame (32 ms) either way of espeak's last sample.
    assert max_wait_ms - 150 <= waited_ms < max_wait_ms + 400, waited_ms
    assert end_of_turn.last_probability is not None and end_of_turn.last_probability < 0.5


@needs_espeak
async def test_a_reset_while_the_model_runs_ends_no_turn(vad, smart_turn):
    pcm = spoken(COMPLETE, tail=1.0)
    detector = TurnDetector(vad, SemanticTurnDetection().silence_params())
    end_of_turn = SemanticEndOfTurn(detector, smart_turn, SemanticTurnDetection())
    asked = []
    real = smart_turn.probability

    class ResetWhileAsking:  # the real model, with a buffer clear landing while it runs
        def probability(self, audio):
            asked.append(len(audio))
            detector.reset()
            return real(audio)

    end_of_turn._model = ResetWhileAsking()  # type: ignore[assignment]
    events = await push_all(end_of_turn, pcm)
    assert asked and [type(e) for _, e in events] == [SpeechStarted]


# ---------------------------------------------------------------------------- session options
def test_semantic_vad_options_parse_and_echo_in_the_ga_shape():
    opts = from_session({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high",
                                                                "interrupt_response": False}}}})
    assert opts.turn_detection == SemanticTurnDetection(eagerness="high", interrupt_response=False)
    assert describe_turn_detection(opts.turn_detection) == {
        "type": "semantic_vad", "eagerness": "high", "create_response": True, "interrupt_response": False}
    assert describe_turn_detection(TurnDetection())["type"] == "server_vad"
    # Without a type an update keeps the current one; a new type starts from its own defaults.
    kept = from_session({"turn_detection": {"eagerness": "low"}}, SemanticTurnDetection(create_response=False))
    assert kept.turn_detection == SemanticTurnDetection(eagerness="low", create_response=False)
    back = from_session({"turn_detection": {"type": "server_vad"}}, SemanticTurnDetection(eagerness="low"))
    assert back.turn_detection == TurnDetection()
    assert from_query({"turn_detection": "semantic_vad", "eagerness": "high"}).turn_detection \
        == SemanticTurnDetection(eagerness="high")
    assert SemanticTurnDetection(eagerness="low").silence_params().silence_duration_ms == 4000


@pytest.mark.parametrize("session, param", [
    ({"turn_detection": {"type": "semantic_vad", "eagerness": "eager"}}, "turn_detection.eagerness"),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": 3}}}},
     "audio.input.turn_detection.eagerness"),
    ({"turn_detection": {"type": "semantic_vad", "create_response": "maybe"}}, "create_response"),
])
def test_bad_semantic_vad_options_name_the_param(session, param):
    with pytest.raises(OptionsError) as info:
        from_session(session)
    assert info.value.param == param
    with pytest.raises(ValueError, match="eagerness"):
        SemanticTurnDetection(eagerness="eager")  # type: ignore[arg-type]


async def test_semantic_vad_without_the_model_is_refused_before_anything_changes(vad):
    import types

    from engine.agent.conversation import ConversationSession
    from signaling.configure import apply_options

    conv = ConversationSession(tts=None, asr=None, llm=None, vad_model=vad, mode="tts",  # type: ignore[arg-type]
                               turn_detection=TurnDetection(silence_duration_ms=700))
    with pytest.raises(ValueError, match="Smart Turn"):
        conv.update(instructions="changed", turn_detection=SemanticTurnDetection())
    assert conv.turn_detection == TurnDetection(silence_duration_ms=700) and conv.instructions != "changed"
    services = types.SimpleNamespace(smart_turn=None, loading=False, references=None)
    options = from_session({"instructions": "changed", "turn_detection": {"type": "semantic_vad"}})
    with pytest.raises(OptionsError) as info:
        await apply_options(conv, options, services)  # type: ignore[arg-type]
    assert info.value.param == "turn_detection" and "not loaded" in str(info.value)
    assert conv.instructions != "changed"
    await conv.close()


@needs_espeak
async def test_switching_to_semantic_vad_mid_turn_keeps_the_turn(models):
    from engine.agent.conversation import ConversationSession

    conv = ConversationSession(tts=None, asr=models.asr, llm=None, vad_model=models.vad,
                               smart_turn=models.smart_turn, mode="tts")
    pcm = spoken(COMPLETE, tail=0.0)
    await conv.push_audio(pcm[:len(pcm) // 2])
    assert conv._turns.user_speaking
    conv.update(turn_detection=SemanticTurnDetection(eagerness="high"))
    assert conv._turns.user_speaking and conv.turn_detection == SemanticTurnDetection(eagerness="high")
    conv.update(turn_detection=TurnDetection())
    assert conv._turns.user_speaking
    await conv.close()


def test_the_turn_detection_setting_picks_the_sessions_default():
    import pydantic

    from server.app import realtime_config
    from server.settings import Settings

    assert realtime_config(Settings(turn_detection="semantic_vad")).turn_detection == SemanticTurnDetection()
    assert realtime_config(Settings(turn_detection="server_vad")).turn_detection is None  # server_vad's defaults
    with pytest.raises(pydantic.ValidationError, match="turn_detection"):
        Settings(turn_detection="loudness_vad")


# ---------------------------------------------------------------------------- over /v1/realtime
openai = pytest.importorskip("openai")
from test_realtime_ws import append_audio, events_until  # noqa: E402 - the SDK client helpers


@pytest.fixture
async def server(models):
    from rtc_client import LocalServer

    srv = await LocalServer(models, max_sessions=2, api_key="sekrit").start()
    yield srv
    await srv.stop()


@needs_espeak
async def test_a_spoken_question_ends_after_a_short_pause_and_is_answered(server):
    async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="sekrit").realtime.connect(
            model="gpt-realtime") as conn:
        await events_until(conn, "session.created", 20)
        await conn.session.update(session={
            "type": "realtime", "temperature": 0.0, "max_output_tokens": 30,
            "sampling": {"max_new_tokens": 8, "seed": 1},  # the tiny random TTS speaks noise: keep it short
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": {"type": "semantic_vad", "eagerness": "low"}},
                      "output": {"format": {"type": "audio/pcm", "rate": 24000}}}})
        updated = (await events_until(conn, "session.updated", 20))[-1]
        echoed = updated.session.audio.input.turn_detection
        assert (echoed.type, echoed.eagerness, echoed.create_response) == ("semantic_vad", "low", True)
        # The question, then only 0.45 s of silence: less than server_vad's 500 ms, and far less than
        # the 4 s that low eagerness waits without Smart Turn's "complete".
        pcm, truth = speechkit.speech_with_gaps([0.3, COMPLETE, 0.45])
        await append_audio(conn, speechkit.pcm24k_bytes(pcm))
        events = await events_until(conn, "response.done", 90)
        types_seen = [e.type for e in events]
        assert types_seen.index("input_audio_buffer.speech_stopped") < types_seen.index("response.created")
        stopped = next(e for e in events if e.type == "input_audio_buffer.speech_stopped")
        assert abs(stopped.audio_end_ms - (truth[0][1] * 1000)) < 250
        transcript = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed")
        assert speechkit.wer(COMPLETE, transcript.transcript) <= 0.3, transcript.transcript
        reply = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert "paris" in reply.lower(), reply


async def test_a_bad_eagerness_is_an_error_event_and_the_session_keeps_its_config(server):
    async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="sekrit").realtime.connect(
            model="gpt-realtime") as conn:
        await events_until(conn, "session.created", 20)
        await conn.session.update(session={"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "semantic_vad", "eagerness": "high"}}}})
        await events_until(conn, "session.updated", 20)
        await conn.session.update(session={"type": "realtime", "instructions": "Be terse.", "audio": {"input": {
            "turn_detection": {"type": "semantic_vad", "eagerness": "whenever"}}}})
        error = (await events_until(conn, "error", 20))[-1]
        assert error.error.param == "audio.input.turn_detection.eagerness", error
        assert "whenever" in error.error.message
        await conn.session.update(session={"type": "realtime"})  # an empty update reports the session as it is
        session = (await events_until(conn, "session.updated", 20))[-1].session
        assert session.audio.input.turn_detection.type == "semantic_vad"
        assert session.audio.input.turn_detection.eagerness == "high"
        assert session.instructions != "Be terse."


async def test_semantic_vad_can_be_the_servers_default(models):
    from rtc_client import LocalServer

    srv = await LocalServer(models, max_sessions=1, api_key="sekrit",
                            turn_detection=SemanticTurnDetection()).start()
    try:
        async with openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="sekrit").realtime.connect(
                model="gpt-realtime") as conn:
            created = (await events_until(conn, "session.created", 20))[-1]
            turn = created.session.audio.input.turn_detection
            assert (turn.type, turn.eagerness) == ("semantic_vad", "auto")
    finally:
        await srv.stop()
