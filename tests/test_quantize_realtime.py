"""A realtime call served by the int8-quantized engine (issue #21): the aiohttp app on 127.0.0.1
with the real VAD, ASR and LLM, an aiortc client that asks for speech over the data channel and
receives it on its audio track."""
from __future__ import annotations

import asyncio
import time
import types

import pytest

from engine.fish.quantize import Int8Linear
from rtc_client import LocalServer, RealtimeClient, force_loopback_ice

FRAMES = 24  # ~1.1 s of audio from the random tiny checkpoint (it never stops on its own)


@pytest.fixture(scope="module")
def quantized_models(tiny_checkpoint, tmp_path_factory):
    from engine.agent.asr import Transcriber
    from engine.agent.llm.embedded import EmbeddedLLM
    from engine.agent.vad import SileroVAD
    from engine.speech.tts import TTSEngine
    from server.references import ReferenceStore

    tts = TTSEngine.load(tiny_checkpoint, device="cpu", quantize="int8")
    assert isinstance(tts.models.model.layers[0].attention.wqkv, Int8Linear)
    llm = EmbeddedLLM.load()
    yield types.SimpleNamespace(asr=Transcriber.load(), vad=SileroVAD.load(), smart_turn=None, llm=llm, tts=tts,
                                references=ReferenceStore(tmp_path_factory.mktemp("references")))
    llm.close()
    tts.close()


@pytest.fixture(scope="module", autouse=True)
def loopback_ice():
    undo = force_loopback_ice()
    yield
    undo()


async def test_quantized_engine_speaks_in_a_realtime_call(quantized_models):
    server = await LocalServer(quantized_models, rtc_liveness_timeout=2.0).start()
    client = RealtimeClient(server.base_url)
    try:
        await client.connect(query={"mode": "tts"})
        await client.wait_for("session.created")
        t_sent = time.monotonic()
        client.send({"type": "tts.request", "text": "Quantized and on the line.",
                     "sampling": {"max_new_tokens": FRAMES, "seed": 1}, "event_id": "evt_q"})
        created = await client.wait_for("response.created")
        rid = created["response_id"]
        done = await client.wait_for("response.done", lambda e: e["response_id"] == rid, timeout=60)
        assert done["response"]["status"] == "completed"
        assert done["audio_seconds"] == pytest.approx(FRAMES / 21.5, rel=0.3)
        await client.wait_for("output_audio_buffer.stopped", lambda e: e["response_id"] == rid, timeout=20)
        await asyncio.sleep(0.3)
        assert client.sink.first_audible(after=t_sent) is not None, "no audio reached the client"
        assert abs(client.sink.audible_seconds(after=t_sent) - done["audio_seconds"]) < 0.3
    finally:
        await client.hang_up()
        await server.stop()
