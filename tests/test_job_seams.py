"""The job path's seams: a job's input is validated and its audio decoded once, whether it comes
through the job API (checked when accepted, run later from the queue), the RunPod worker's
handler, or agent mode with spoken input; and the queue hands the runner what was prepared."""
from __future__ import annotations

import asyncio
import base64
import sys

import numpy as np
import pytest
import requests

from engine.audio import encode_audio
from server.conversations import ConversationStore
from server.http import CONVERSATIONS
from server.jobs import JobManager, JobStore
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

KEY = "seams-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def voice_wav(seed: int, seconds: float = 1.0) -> bytes:
    """A reference clip no other test used (so no cache can answer for it)."""
    rate = 44100
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    pcm = 0.2 * np.sin(2 * np.pi * (120 + 40 * rng.random()) * t) + 0.01 * rng.standard_normal(t.size)
    return encode_audio(pcm.astype(np.float32), rate, "wav")


class Counter:
    """Counts calls of `engine.audio.decode_audio` on given bytes (in every module that imported
    it) and of `parse_job_input`."""

    def __init__(self, monkeypatch) -> None:
        import engine.audio
        import server.jobs.input as job_input

        real_decode, real_parse = engine.audio.decode_audio, job_input.parse_job_input
        self.decoded: list[bytes] = []
        self.parsed = 0

        def decode_audio(data, *args, **kwargs):
            self.decoded.append(bytes(data))
            return real_decode(data, *args, **kwargs)

        def parse_job_input(*args, **kwargs):
            self.parsed += 1
            return real_parse(*args, **kwargs)

        for module in list(sys.modules.values()):
            if getattr(module, "decode_audio", None) is real_decode:
                monkeypatch.setattr(module, "decode_audio", decode_audio)
        monkeypatch.setattr(job_input, "parse_job_input", parse_job_input)

    def decodes_of(self, data: bytes) -> int:
        return sum(d == data for d in self.decoded)


def test_job_api_decodes_system_audio_once_and_parses_once(tts_engine, tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path, mode="tts", api_key=KEY, asr_model="none", llm_enabled=False,
                        max_new_tokens_limit=6, cors_origins=[])
    voice = voice_wav(seed=101)
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        count = Counter(monkeypatch)
        body = requests.post(f"{live.url}/runsync", headers=AUTH, json={"input": {
            "text": "Once is enough.", "system_audio": base64.b64encode(voice).decode(),
            "reference_text": "A test voice.", "conversation_id": "seams-1", "streaming": False}}).json()
        assert body["status"] == "COMPLETED", body
        assert count.decodes_of(voice) == 1  # checked at /runsync, encoded in the job: one decode
        assert count.parsed == 1
        # The decoded reference really was the voice: later turns speak with the codes it gave.
        conv = live.app[CONVERSATIONS].load_sync("seams-1")
        assert conv.voice_text == "A test voice." and conv.voice_codes.shape[0] == tts_engine.num_codebooks


async def test_worker_handler_decodes_once(tts_engine, tmp_path, monkeypatch):
    from server.jobs.handler import handle_job

    settings = Settings(data_dir=tmp_path, mode="tts", asr_model="none", llm_enabled=False, max_new_tokens_limit=6)
    conversations = ConversationStore(tmp_path / "conversations.sqlite3", settings.conversation_ttl)
    voice = voice_wav(seed=102)
    count = Counter(monkeypatch)
    items = [item async for item in handle_job(
        {"text": "Worker side.", "system_audio": base64.b64encode(voice).decode(), "reference_text": "Voice.",
         "streaming": False}, Services(tts=tts_engine), settings, conversations)]
    conversations.close()
    assert [i["status"] for i in items] == ["success"]
    assert count.decodes_of(voice) == 1 and count.parsed == 1


async def test_worker_handler_refuses_undecodable_audio_naming_the_field(tts_engine, tmp_path):
    from server.jobs.handler import handle_job

    settings = Settings(data_dir=tmp_path, mode="tts", asr_model="none", llm_enabled=False)
    conversations = ConversationStore(tmp_path / "conversations.sqlite3", settings.conversation_ttl)
    items = [item async for item in handle_job(
        {"text": "Hi.", "system_audio": base64.b64encode(b"not audio at all").decode(), "reference_text": "x"},
        Services(tts=tts_engine), settings, conversations)]
    conversations.close()
    assert len(items) == 1 and items[0]["status"] == "error"
    assert items[0]["error"].startswith("system_audio: cannot decode audio")


def test_agent_mode_decodes_user_and_system_audio_once(tts_engine, tmp_path, monkeypatch):
    """Spoken input and a reference without its transcript: ASR hears both, from one decode each."""
    pytest.importorskip("llama_cpp")
    import speechkit

    from engine.agent.asr import Transcriber
    from engine.agent.llm import create_llm

    if not speechkit.espeak_available():
        pytest.skip("espeak-ng and sox make the test speech")
    llm, asr = create_llm(n_threads=1), Transcriber.load()
    try:
        settings = Settings(data_dir=tmp_path, mode="agent", api_key=KEY, llm_max_tokens=12, max_new_tokens_limit=6,
                            cors_origins=[])
        question = encode_audio(speechkit.espeak_wav("What is the capital of France?"), 16000, "wav")
        voice = encode_audio(speechkit.espeak_wav("Hello from the server."), 16000, "wav")
        with LiveServer(settings, Services(tts=tts_engine, llm=llm, asr=asr)) as live:
            count = Counter(monkeypatch)
            body = requests.post(f"{live.url}/runsync", headers=AUTH, json={"input": {
                "user_audio": base64.b64encode(question).decode(), "system_audio": base64.b64encode(voice).decode(),
                "conversation_id": "seams-agent", "streaming": False}}).json()
            assert body["status"] == "COMPLETED", body
            assert speechkit.wer("What is the capital of France?", body["output"]["transcript"]) <= 0.25
            stored = live.app[CONVERSATIONS].load_sync("seams-agent")
            assert speechkit.wer("Hello from the server.", stored.voice_text) <= 0.25
            assert count.decodes_of(question) == 1 and count.decodes_of(voice) == 1
            assert count.parsed == 1
    finally:
        asyncio.run(llm.aclose())
        asr.close()


async def test_the_queue_hands_the_runner_what_was_prepared_within_its_budget(tmp_path):
    received: list[tuple[dict, object]] = []
    release = asyncio.Event()

    async def runner(job_input, prepared):
        received.append((job_input, prepared))
        if job_input.get("hold"):
            await release.wait()
        yield {"status": "success"}

    jobs = JobManager(JobStore(tmp_path / "jobs.sqlite3"), runner, queue_size=8, concurrency=1,
                      execution_timeout=30, result_ttl=60, prepared_budget=100)
    await jobs.start()
    try:
        first = await jobs.submit({"hold": True}, streaming=False, prepared="held", prepared_bytes=10)
        while not received:  # the one worker is busy with it; the rest wait in the queue
            await asyncio.sleep(0.01)
        kept = await jobs.submit({"n": 1}, streaming=False, prepared="kept", prepared_bytes=60)
        dropped = await jobs.submit({"n": 2}, streaming=False, prepared="too big", prepared_bytes=60)
        cancelled = await jobs.submit({"n": 3}, streaming=False, prepared="cancelled", prepared_bytes=30)
        assert (await jobs.cancel(cancelled))["status"] == "CANCELLED"
        release.set()
        for job_id in (first, kept, dropped):
            await jobs.wait(job_id, 10)
        after = await jobs.submit({"n": 4}, streaming=False, prepared="room again", prepared_bytes=100)
        await jobs.wait(after, 10)
    finally:
        await jobs.stop()
        jobs.store.close()
    # Over the budget the runner starts from the stored input; a cancelled job's input is let go.
    assert received == [({"hold": True}, "held"), ({"n": 1}, "kept"), ({"n": 2}, None),
                        ({"n": 4}, "room again")]
