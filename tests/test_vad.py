"""silero-vad (ONNX, no torch) turn detection on real espeak-ng speech with known gaps."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from engine.agent.conversation import TurnDetection
from engine.agent.vad import FRAME_SAMPLES, SileroVAD, SpeechStarted, SpeechStopped, TurnDetector
import speechkit

pytestmark = pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed")

TOLERANCE_S = 0.150


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    return SileroVAD.load()


@pytest.fixture(scope="module")
def two_sentences():
    return speechkit.speech_with_gaps(
        [1.0, "Please turn on the kitchen lights.", 2.0, "What time is it in Tokyo right now?", 1.0])


def run_turns(vad: SileroVAD, pcm: np.ndarray, params: TurnDetection = TurnDetection(), piece: int = 320):
    detector = TurnDetector(vad, params)
    events = []
    for chunk in speechkit.frames(pcm, piece):
        events += detector.push(chunk)
    return events


def segments(events) -> list[tuple[float, float]]:
    starts = [e.audio_start_ms for e in events if isinstance(e, SpeechStarted)]
    stops = [e.audio_end_ms for e in events if isinstance(e, SpeechStopped)]
    assert len(starts) == len(stops), events
    return [(a / 1000, b / 1000) for a, b in zip(starts, stops)]


def test_turn_boundaries_match_truth_within_150ms(vad, two_sentences):
    pcm, truth = two_sentences
    found = segments(run_turns(vad, pcm))
    assert len(found) == len(truth), (found, truth)
    for (start, end), (true_start, true_end) in zip(found, truth):
        assert abs(start - true_start) <= TOLERANCE_S, (found, truth)
        assert abs(end - true_end) <= TOLERANCE_S, (found, truth)


def test_events_alternate_and_stop_after_the_silence_duration(vad, two_sentences):
    pcm, truth = two_sentences
    detector = TurnDetector(vad)
    kinds, stop_positions = [], []
    for chunk in speechkit.frames(pcm, 320):
        for event in detector.push(chunk):
            kinds.append(type(event))
            if isinstance(event, SpeechStopped):
                stop_positions.append(detector.position_ms / 1000)
    assert kinds == [SpeechStarted, SpeechStopped, SpeechStarted, SpeechStopped]
    # A turn ends ~silence_duration_ms after the speech does, not earlier and not much later.
    for decided, (_, true_end) in zip(stop_positions, truth):
        assert 0.5 - TOLERANCE_S <= decided - true_end <= 0.5 + TOLERANCE_S + 0.064


def stop_after_words(vad: SileroVAD, pcm: np.ndarray, words_end: float) -> tuple[float, float]:
    """(when the turn was declared over, where its speech was said to end), both from `words_end`."""
    detector = TurnDetector(vad)
    for chunk in speechkit.frames(pcm, 320):
        for event in detector.push(chunk):
            if isinstance(event, SpeechStopped):
                return detector.position_ms / 1000 - words_end, event.audio_end_ms / 1000 - words_end
    raise AssertionError("the turn never ended")


def test_silence_is_counted_from_the_end_of_the_sound(vad):
    # Silero keeps calling the first 2-3 frames of silence after the words speech; without counting
    # them as pause, a 500 ms silence_duration_ms ended turns ~590 ms after the words.
    pcm, truth = speechkit.speech_with_gaps([0.5, "What is the capital of France?", 1.0])
    decided, speech_end = stop_after_words(vad, pcm, truth[0][1])
    assert 0.5 - 0.04 <= decided <= 0.5 + 0.04, decided
    assert abs(speech_end) <= 0.04, speech_end
    # Hiss 30 dB under the speech is not silence: only silero's own verdict ends the turn then.
    hiss = np.random.default_rng(0).standard_normal(len(pcm)).astype(np.float32) * 0.01
    decided_in_hiss, _ = stop_after_words(vad, pcm + hiss, truth[0][1])
    assert decided_in_hiss >= decided + 0.064, (decided_in_hiss, decided)


def test_turn_audio_carries_prefix_padding_and_the_speech(vad, two_sentences):
    pcm, truth = two_sentences
    stops = [e for e in run_turns(vad, pcm) if isinstance(e, SpeechStopped)]
    first = stops[0]
    assert first.audio.dtype == np.float32
    begins = first.audio_start_ms / 1000
    assert truth[0][0] - 0.3 - 0.1 <= begins <= truth[0][0] - 0.3 + 0.05  # 300 ms of pre-roll
    # The returned audio is exactly the stream's samples from its start onwards.
    offset = int(round(begins * speechkit.SAMPLE_RATE))
    np.testing.assert_array_equal(first.audio, pcm[offset: offset + len(first.audio)])
    assert begins + len(first.audio) / speechkit.SAMPLE_RATE >= truth[0][1]


def test_chunking_of_the_input_does_not_change_the_result(vad, two_sentences):
    pcm, _ = two_sentences
    by_frame = segments(run_turns(vad, pcm, piece=FRAME_SAMPLES))
    by_odd_pieces = segments(run_turns(vad, pcm, piece=777))
    by_one_push = segments(run_turns(vad, pcm, piece=len(pcm)))
    assert by_frame == by_odd_pieces == by_one_push


def test_silence_duration_decides_whether_a_short_pause_splits_the_turn(vad):
    pcm, truth = speechkit.speech_with_gaps([0.5, "Hello from the server.", 0.35, "Please turn on the kitchen lights.", 1.0])
    merged = segments(run_turns(vad, pcm, TurnDetection(silence_duration_ms=500)))
    split = segments(run_turns(vad, pcm, TurnDetection(silence_duration_ms=150)))
    assert len(merged) == 1 and abs(merged[0][1] - truth[1][1]) <= TOLERANCE_S
    assert len(split) == 2 and abs(split[0][1] - truth[0][1]) <= TOLERANCE_S


def test_threshold_is_honoured(vad, two_sentences):
    pcm, _ = two_sentences
    quiet = pcm * 0.05  # still speech, but fainter: a strict threshold must see less of it
    lenient = run_turns(vad, quiet, TurnDetection(threshold=0.3))
    strict = run_turns(vad, quiet, TurnDetection(threshold=0.99))
    assert len(segments(lenient)) >= 1
    assert sum(b - a for a, b in segments(strict)) < sum(b - a for a, b in segments(lenient))


def test_silence_and_noise_give_no_turns(vad):
    rng = np.random.default_rng(0)
    silence = np.zeros(3 * speechkit.SAMPLE_RATE, np.float32)
    hiss = (rng.standard_normal(3 * speechkit.SAMPLE_RATE) * 0.003).astype(np.float32)
    assert run_turns(vad, silence) == []
    assert run_turns(vad, hiss) == []


def test_flush_ends_a_turn_in_progress(vad):
    pcm, truth = speechkit.speech_with_gaps([0.5, "Please turn on the kitchen lights."])
    detector = TurnDetector(vad)
    events = detector.push(pcm)
    assert [type(e) for e in events] == [SpeechStarted]
    stopped = detector.flush()
    assert isinstance(stopped, SpeechStopped)
    assert abs(stopped.audio_end_ms / 1000 - truth[0][1]) <= TOLERANCE_S
    assert detector.flush() is None


def test_bad_input_is_rejected_clearly(vad):
    detector = TurnDetector(vad)
    with pytest.raises(ValueError, match="mono"):
        detector.push(np.zeros((2, 512), np.float32))
    with pytest.raises(ValueError, match="float32"):
        detector.push(np.zeros(512, np.int32))
    with pytest.raises(ValueError, match="threshold"):
        TurnDetector(vad, TurnDetection(threshold=1.5))
    with pytest.raises(ValueError, match="512"):
        vad.stream().probability(np.zeros(100, np.float32))


def test_int16_input_is_scaled_like_float(vad, two_sentences):
    pcm, _ = two_sentences
    as_int16 = np.clip(pcm * 32768, -32768, 32767).astype(np.int16)
    assert segments(run_turns(vad, as_int16)) == segments(run_turns(vad, pcm))


def test_vad_path_never_imports_torch():
    code = ("import sys; from engine.agent.vad import SileroVAD; SileroVAD.load(); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
