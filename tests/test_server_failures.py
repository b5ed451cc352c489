"""Failures on a live server: a generation that breaks fails its own job (or /v1/tts request) with a
clear message and harms nothing else; a server still loading its model says so.

The synthesizer is the real tiny engine; the only scripted part is the failure itself, injected
when the text carries a cue word.
"""
from __future__ import annotations

import contextlib
import time

import pytest
import requests

from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

KEY = "failure-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAIL_NOW = "Breakdown"  # fails before the first audio chunk
FAIL_LATER = "Meltdown"  # fails after the first audio chunk
FAILURE = "RuntimeError: the model fell over"


class FailsOnCue:
    """The real engine (SpeechSynthesizer protocol), except for texts holding a cue word."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    def prepare_text(self, request):
        return self.engine.prepare_text(request)

    async def encode_reference(self, audio: bytes, *, use_memory_cache: bool = True, pcm=None):
        return await self.engine.encode_reference(audio, use_memory_cache=use_memory_cache, pcm=pcm)

    def close(self) -> None:
        pass  # the wrapped engine is the session fixture's to close

    async def stream(self, request):
        fail_after = 0 if FAIL_NOW in request.text else 1 if FAIL_LATER in request.text else None
        async with contextlib.aclosing(self.engine.stream(request)) as chunks:  # closing stops the model
            produced = 0
            async for chunk in chunks:
                if produced == fail_after:
                    raise RuntimeError("the model fell over")
                produced += 1
                yield chunk


@pytest.fixture(scope="module")
def server(tts_engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("failures"), mode="tts", api_key=KEY, asr_model="none",
                        llm_enabled=False, max_new_tokens_limit=16, concurrent_jobs=2, cors_origins=[])
    with LiveServer(settings, Services(tts=FailsOnCue(tts_engine))) as live:
        yield live


def wait_final(base: str, job_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/status/{job_id}", headers=AUTH, timeout=10).json()
        if body["status"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {body}")


def engine_idle(engine, within: float = 1.0) -> bool:
    deadline = time.monotonic() + within
    while engine.active_requests and time.monotonic() < deadline:
        time.sleep(0.005)
    return engine.active_requests == 0


def test_a_failing_job_fails_alone(server, tts_engine):
    def run(text: str) -> str:
        response = requests.post(f"{server.url}/run", headers=AUTH,
                                 json={"input": {"text": text, "streaming": True}})
        assert response.status_code == 200
        return response.json()["id"]

    failing, healthy = run(f"{FAIL_LATER} in the middle."), run("A healthy neighbour.")
    failed = wait_final(server.url, failing)
    assert failed["status"] == "FAILED" and failed["error"] == f"internal error: {FAILURE}"
    assert failed["output"] == {"status": "error", "error": failed["error"]} and failed["executionTime"] >= 0
    # What it streamed before failing is still there, and the stream ends with the job's status.
    stream = requests.get(f"{server.url}/stream/{failing}", headers=AUTH).json()
    assert stream["status"] == "FAILED" and len(stream["stream"]) == 1
    assert stream["stream"][0]["output"]["status"] == "streaming"
    assert requests.get(f"{server.url}/stream/{failing}", headers=AUTH).json()["stream"] == []

    assert wait_final(server.url, healthy)["status"] == "COMPLETED"
    assert engine_idle(tts_engine)  # the failed request's model work was stopped, not leaked
    after = requests.post(f"{server.url}/runsync", headers=AUTH,
                          json={"input": {"text": "Still serving.", "streaming": False}}).json()
    assert after["status"] == "COMPLETED" and after["output"]["duration"] > 0
    assert requests.get(f"{server.url}/health").json()["jobs"]["failed"] >= 1


def test_safe_request_reports_a_failed_job(server, capsys):
    """The original guide's safe_request: a job that failed is an HTTP 200 whose output says error."""
    ENDPOINT = f"{server.url}/runsync"
    API_KEY = KEY

    def safe_request(func):
        try:
            response = func()
            if response.status_code == 200:
                result = response.json()
                if result.get("output", {}).get("status") == "error":
                    print(f"API Error: {result['output']['error']}")
                    return None
                return result
            else:
                print(f"HTTP Error {response.status_code}")
                error_details = response.json()
                print(f"Details: {error_details.get('output', {}).get('error')}")
        except Exception as e:
            print(f"Request failed: {str(e)}")
        return None

    assert safe_request(lambda: requests.post(ENDPOINT, json={"input": {"text": f"{FAIL_NOW} at once."}},
                                              headers={"Authorization": f"Bearer {API_KEY}"})) is None
    assert f"API Error: internal error: {FAILURE}" in capsys.readouterr().out


def test_v1_tts_failures_are_500_or_a_cut_stream(server, tts_engine):
    url = f"{server.url}/v1/tts"
    for body in ({"text": f"{FAIL_NOW}."}, {"text": f"{FAIL_LATER}."}, {"text": f"{FAIL_NOW}.", "streaming": True}):
        response = requests.post(url, headers=AUTH, json=body)
        assert response.status_code == 500, body
        assert response.json() == {"statusCode": 500, "error": "Internal Server Error",
                                   "message": f"generation failed: {FAILURE}"}
    # Once audio has gone out the status line is spent: the chunked body is cut short instead of ending cleanly.
    streamed = requests.post(url, headers=AUTH, json={"text": f"{FAIL_LATER}.", "streaming": True}, stream=True)
    assert streamed.status_code == 200
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in streamed.iter_content(chunk_size=None):
            pass
    assert engine_idle(tts_engine)
    fine = requests.post(url, headers=AUTH, json={"text": "Fine again.", "streaming": True})
    assert fine.status_code == 200 and len(fine.content) > 0


def test_a_server_still_loading_says_so(tmp_path):
    settings = Settings(data_dir=tmp_path, mode="tts", api_key=KEY, asr_model="none", llm_enabled=False,
                        cors_origins=[])
    with LiveServer(settings, Services(loading=True)) as live:
        run = requests.post(f"{live.url}/run", headers=AUTH, json={"input": {"text": "Too early."}})
        assert run.status_code == 503
        assert run.json()["error"] == "the TTS model is still loading; retry shortly"
        tts = requests.post(f"{live.url}/v1/tts", headers=AUTH, json={"text": "Too early."})
        assert tts.status_code == 503 and "still loading" in tts.json()["message"]
        assert requests.get(f"{live.url}/health").json()["status"] == "loading"
        assert requests.get(f"{live.url}/ping").status_code == 204  # RunPod's "initializing"
