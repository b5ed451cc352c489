"""The RunPod worker: runpod's own local test mode (--test_input) in a subprocess, and the
generator handler through runpod's own generator runner (what a RunPod worker executes)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server import worker
from server.services import Services
from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def run_worker(args: list[str], checkpoint: Path, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHECKPOINT": str(checkpoint), "MODE": "tts", "ASR_MODEL": "none",
           "LLM_ENABLED": "false", "DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "DEVICE": "cpu"}
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_local_test_input_runs_one_job(tiny_checkpoint, tmp_path):
    job = {"input": {"text": "Hello from the worker.", "max_new_tokens": 8, "streaming": False, "seed": 1}}
    done = run_worker(["-m", "server.worker", "--test_input", json.dumps(job)], tiny_checkpoint, tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "Job local_test completed successfully." in log
    assert "'status': 'success'" in log and "'format': 'wav'" in log


def test_local_test_input_failure_exits_1(tiny_checkpoint, tmp_path):
    job = {"input": {"tts": True, "temperature": 9}}
    done = run_worker(["-m", "server", "worker", "--test_input", json.dumps(job)], tiny_checkpoint, tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert "temperature: Input should be less than or equal to 2" in log


@pytest.fixture()
def loaded_worker(tts_engine, tmp_path):
    settings = Settings(data_dir=tmp_path, mode="tts", asr_model="none", llm_enabled=False, max_new_tokens_limit=16)
    worker.setup(settings, Services(tts=tts_engine))
    yield
    worker._state.clear()


async def aggregate(job: dict) -> list:
    """What runpod's worker makes of a generator handler with return_aggregate_stream."""
    from runpod.serverless.modules.rp_job import run_job_generator

    return [part["output"] async for part in run_job_generator(worker.handler, job)]


async def test_streaming_job_through_runpods_generator_runner(loaded_worker):
    items = await aggregate({"id": "job-1", "input": {"text": "Stream it.", "streaming": True}})
    chunks, last = items[:-1], items[-1]
    assert chunks and all(c["status"] == "streaming" and len(json.dumps(c)) < 1_000_000 for c in chunks)
    assert last["status"] == "success" and "audio" not in last and last["chunks"] == len(chunks)
    pcm_bytes = sum(len(base64.b64decode(c["audio"])) for c in chunks)
    assert pcm_bytes // 2 == pytest.approx(last["duration"] * 44100, abs=45)


async def test_whole_job_and_conversation_through_the_worker(loaded_worker):
    first = await aggregate({"id": "j1", "input": {"text": "One.", "streaming": False, "conversation_id": "c"}})
    second = await aggregate({"id": "j2", "input": {"text": "Two.", "streaming": False, "conversation_id": "c"}})
    assert len(first) == 1 and first[0]["audio"] and first[0]["format"] == "wav"
    assert [m["content"] for m in second[0]["history"]] == ["One.", "Two."]


async def test_errors_fail_the_job(loaded_worker):
    items = await aggregate({"id": "bad", "input": {"text": ""}})
    assert items == [{"status": "error", "error": "text is required in TTS mode (the words to speak)"}]
    assert (await worker.collect({"id": "bad", "input": {"text": ""}}))["error"].startswith("text is required")


async def test_cancelling_the_handler_stops_the_model(loaded_worker, tts_engine):
    async def consume():
        async for _ in worker.handler({"id": "long", "input": {"text": "Long. " * 40, "max_new_tokens": 8000}}):
            pass

    worker._state["settings"].max_new_tokens_limit = 0
    task = asyncio.create_task(consume())
    while tts_engine.active_requests == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # re-raised, so RunPod reports the job as cancelled
        await task
    for _ in range(50):
        if tts_engine.active_requests == 0:
            break
        await asyncio.sleep(0.01)
    assert tts_engine.active_requests == 0
