"""Incremental ASR: real whisper tiny.en and silero on espeak-ng speech pushed in real time; the
deltas sent while the user speaks are never taken back and add up to the final transcript."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import speechkit
from engine.agent.incremental_asr import IncrementalTranscriber, agreed_prefix

pytestmark = pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed")

# Two sentences with a short pause (shorter than the VAD's 500 ms): one turn, long enough for
# several passes while it is spoken.
# Passes every interval however long one takes (the machine's load must not change what is tested).
UNHURRIED = 10**6
TURN = ("Please turn on the kitchen lights.", 0.3, "What is the weather going to be like tomorrow in Paris?")


def test_agreed_prefix_keeps_the_words_both_passes_begin_with():
    assert agreed_prefix("What is the cap.", "What is the capital of France?") == "What is the"
    # punctuation after the last agreed word waits: the final pass may end the sentence there instead
    assert agreed_prefix("what is the capital", "What is the capital, of France") == "What is the capital"
    assert agreed_prefix("Turn on the lights,", "Turn on the lights, please") == "Turn on the lights"
    assert agreed_prefix("Turn on the lights, please", "Turn on the lights, please.") == "Turn on the lights, please"
    assert agreed_prefix("", "Hello there") == ""
    assert agreed_prefix("Hello there", "Goodbye") == ""
    assert agreed_prefix("Hello there friend", "Hello there") == "Hello there"


@pytest.fixture(scope="module")
def asr_and_vad():
    from engine.agent.asr import Transcriber
    from engine.agent.vad import SileroVAD

    asr = Transcriber.load()
    yield asr, SileroVAD.load()
    asr.close()


async def speak_live(asr, vad, parts, **options):
    """Push `parts` in 20 ms pieces every 20 ms through the real TurnDetector and an
    IncrementalTranscriber, each pass finishing before the next push (as on an idle CPU, so the
    test does not depend on the machine's load); returns (deltas with their push index, final,
    the turn's stop index, the transcriber)."""
    from engine.agent.vad import SpeechStarted, TurnDetector

    pcm, _ = speechkit.speech_with_gaps([0.3, *parts, 1.0])
    detector = TurnDetector(vad)
    deltas: list[tuple[int, str]] = []
    live = final = stopped_at = None
    pushed = 0
    t0 = time.monotonic()
    for n, piece in enumerate(speechkit.frames(pcm, 320)):
        await asyncio.sleep(max(0.0, t0 + n * 0.02 - time.monotonic()))
        pushed = n
        for event in detector.push(piece):
            if isinstance(event, SpeechStarted):
                live = IncrementalTranscriber(asr, on_delta=lambda d: deltas.append((pushed, d)),
                                              **{"budget_ms": UNHURRIED, **options})
            else:
                stopped_at = n
                final = await live.finish(event.audio, event.audio_end_ms - event.audio_start_ms)
                return deltas, final, stopped_at, live
        if live is not None and detector.in_speech:
            live.update(detector)
            await live.idle()
    raise AssertionError("the turn never ended")


async def test_deltas_arrive_while_speaking_and_add_up_to_the_final_transcript(asr_and_vad):
    asr, vad = asr_and_vad
    deltas, final, stopped_at, live = await speak_live(asr, vad, TURN)
    reference = " ".join(p for p in TURN if isinstance(p, str))
    assert speechkit.wer(reference, final) <= 0.2, final
    assert live.passes >= 2, live.passes
    assert deltas and deltas[0][0] < stopped_at, deltas  # the first words went out before the turn ended
    assert "".join(d for _, d in deltas) == final, (deltas, final)


async def test_final_transcript_matches_a_whole_turn_pass(asr_and_vad):
    """A pass reused at the end of the turn heard all of it: same words as transcribing the turn."""
    asr, vad = asr_and_vad
    from engine.agent.vad import SpeechStopped, TurnDetector

    text = "What is the capital of France?"
    _deltas, final, _stopped, live = await speak_live(asr, vad, [text])
    pcm, _ = speechkit.speech_with_gaps([0.3, text, 1.0])
    detector = TurnDetector(vad)
    turn = next(e for e in detector.push(pcm) if isinstance(e, SpeechStopped))
    whole = await asr.transcribe(turn.audio)
    assert speechkit.normalize(final) == speechkit.normalize(whole), (final, whole, live.reused)


async def test_a_turn_too_short_for_a_pass_is_transcribed_whole(asr_and_vad):
    asr, _vad = asr_and_vad
    live = IncrementalTranscriber(asr)
    pcm = speechkit.espeak_wav("Hello from the server.")
    final = await live.finish(pcm, len(pcm) * 1000 // 16_000)
    assert live.passes == 0 and not live.reused
    assert speechkit.wer("Hello from the server.", final) <= 0.25, final


async def test_a_cancelled_turn_sends_no_more_deltas(asr_and_vad):
    asr, vad = asr_and_vad
    from engine.agent.vad import TurnDetector

    pcm, _ = speechkit.speech_with_gaps([0.3, *TURN])
    detector = TurnDetector(vad)
    deltas: list[str] = []
    live = IncrementalTranscriber(asr, on_delta=deltas.append, budget_ms=UNHURRIED)
    pieces = speechkit.frames(pcm, 320)
    for piece in pieces:  # until the first words are sent (real-time pushes, as from a microphone)
        await asyncio.sleep(0.02)
        detector.push(piece)
        if not detector.in_speech:
            continue
        live.update(detector)
        await live.idle()
        if deltas:
            break
    sent, passes = list(deltas), live.passes
    for piece in pieces:  # until the next pass is in flight; then the turn is dropped
        await asyncio.sleep(0.02)
        detector.push(piece)
        live.update(detector)
        if live.passes != passes or live._task is not None:
            break
    live.cancel()
    await live.idle()  # the pass in flight finishes; its words are not sent
    assert live.passes == passes + 1 and deltas == sent, (live.passes, passes, deltas)


def test_turn_detector_exposes_the_open_turn(asr_and_vad):
    _asr, vad = asr_and_vad
    from engine.agent.vad import SpeechStopped, TurnDetector

    pcm, _ = speechkit.speech_with_gaps([0.3, "Hello from the server.", 1.0])
    detector = TurnDetector(vad)
    seen = None
    for piece in speechkit.frames(pcm, 320):
        events = detector.push(piece)
        stop = next((e for e in events if isinstance(e, SpeechStopped)), None)
        if stop is not None:  # what the open turn held is the start of what the turn carries
            assert np.array_equal(stop.audio[:len(seen)], seen)
            assert detector.turn_ms == 0 and detector.pause_ms == 0 and detector.turn_audio().size == 0
            return
        if detector.in_speech:
            seen = detector.turn_audio()
            assert detector.turn_ms == len(seen) * 1000 // 16_000
    raise AssertionError("the turn never ended")
