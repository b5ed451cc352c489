"""The `runpod` package's own client against our server: only its base URL and key point at us."""
from __future__ import annotations

import base64
import time

import pytest
import requests
import runpod

from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

KEY = "runpod-style-key"


@pytest.fixture(scope="module")
def endpoint(tts_engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("rp"), mode="tts", api_key=KEY, asr_model="none",
                        llm_enabled=False, max_new_tokens_limit=0, concurrent_jobs=2, cors_origins=[])
    saved = runpod.api_key, runpod.endpoint_url_base
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        runpod.api_key = KEY
        runpod.endpoint_url_base = f"{live.url}/v2"  # where runpod-python builds every URL from
        try:
            yield runpod.Endpoint("fish-endpoint"), live
        finally:
            runpod.api_key, runpod.endpoint_url_base = saved


def test_run_sync_returns_the_output(endpoint):
    ep, _ = endpoint
    output = ep.run_sync({"input": {"text": "Synchronous.", "max_new_tokens": 10, "streaming": False}}, timeout=60)
    assert output["status"] == "success" and output["sample_rate"] == 44100
    assert len(base64.b64decode(output["audio"])) > 44


def test_run_status_stream_and_output(endpoint):
    ep, _ = endpoint
    job = ep.run({"text": "Streamed through the runpod client.", "max_new_tokens": 40, "streaming": True})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    items = list(job.stream())
    chunks = [i for i in items if i["status"] == "streaming"]
    assert chunks and items[-1]["status"] == "success" and items[-1]["audio_in_chunks"] is True
    output = job.output(timeout=30)
    assert job.status() == "COMPLETED" and output["chunks"] == len(chunks)
    streamed = b"".join(base64.b64decode(c["audio"]) for c in chunks)
    assert len(streamed) // 2 == pytest.approx(output["duration"] * 44100, abs=45)


def test_cancel_and_health_and_purge(endpoint, tts_engine):
    ep, live = endpoint
    job = ep.run({"text": "Cancelled long speech. " * 10, "max_new_tokens": 8000})
    deadline = time.monotonic() + 20
    while job.status() != "IN_PROGRESS":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert ep.health()["jobs"]["inProgress"] == 1
    assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
    assert job.status() == "CANCELLED"
    deadline = time.monotonic() + 0.5
    while tts_engine.active_requests and time.monotonic() < deadline:
        time.sleep(0.005)
    assert tts_engine.active_requests == 0
    assert ep.purge_queue() == {"removed": 0, "status": "completed"}
    health = ep.health()
    assert health["workers"] == {"idle": 2, "running": 0} and health["jobs"]["cancelled"] >= 1


def test_wrong_key_is_refused_by_the_client(endpoint):
    ep, live = endpoint
    other = runpod.Endpoint("fish-endpoint", api_key="not-the-key")
    with pytest.raises(RuntimeError, match="Unauthorized"):
        other.run_sync({"text": "x"})
    # The raw answer has the job API's error shape.
    raw = requests.post(f"{live.url}/v2/fish-endpoint/run", json={"input": {"text": "x"}},
                        headers={"Authorization": "Bearer nope"})
    assert raw.status_code == 401 and raw.json()["output"]["status"] == "error"
