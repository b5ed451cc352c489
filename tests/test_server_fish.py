"""Upstream Fish Speech's HTTP API on a live server: /v1/tts (JSON and msgpack, streamed raw PCM and
whole files), named references (add / list / update / delete, path-safe ids), /v1/health."""
from __future__ import annotations

import base64
import io
import time
import wave

import msgpack
import numpy as np
import pytest
import requests

from engine.audio import decode_audio, encode_audio
from engine.speech.tts import ReferenceCache
from server.references import ReferenceStore
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

KEY = "fish-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "Accept": "application/json"}


def reference_wav(seed: int = 1, seconds: float = 1.2) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 44100)) / 44100
    pcm = 0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t) + 0.02 * rng.standard_normal(t.size)
    return encode_audio(pcm.astype(np.float32), 44100, "wav")


@pytest.fixture(scope="module")
def server(tts_engine, tmp_path_factory):
    data = tmp_path_factory.mktemp("fish-data")
    settings = Settings(data_dir=data, checkpoint="tiny", mode="tts", api_key=KEY, asr_model="none",
                        llm_enabled=False, max_new_tokens_limit=12, max_reference_bytes=200 * 1024, cors_origins=[])
    services = Services(tts=tts_engine, references=ReferenceStore(data / "references"))
    with LiveServer(settings, services) as live:
        yield live


def wav_pcm(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def msgpack_post(url: str, body: dict, **kwargs) -> requests.Response:
    # What upstream's tools/api_client.py sends: a msgpack ServeTTSRequest, ?format=msgpack.
    return requests.post(url, params={"format": "msgpack"}, data=msgpack.packb(body),
                         headers={**AUTH, "content-type": "application/msgpack"}, **kwargs)


def upstream_request(text: str, **fields) -> dict:
    body = {"text": text, "references": [], "reference_id": None, "format": "wav", "max_new_tokens": 1024,
            "chunk_length": 300, "top_p": 0.8, "repetition_penalty": 1.1, "temperature": 0.8,
            "streaming": False, "use_memory_cache": "off", "seed": None, "latency": "normal"}
    return {**body, **fields}


def test_streamed_pcm_equals_the_whole_file(server):
    ref = reference_wav(seed=2)
    body = upstream_request("Stream me, please.", seed=5,
                            references=[{"audio": ref, "text": "A tone."}])
    whole = msgpack_post(f"{server.url}/v1/tts", body)
    assert whole.status_code == 200 and whole.headers["Content-Type"] == "audio/wav"
    assert whole.headers["Content-Disposition"] == "attachment; filename=audio.wav"
    streamed = msgpack_post(f"{server.url}/v1/tts", {**body, "streaming": True}, stream=True)
    assert streamed.status_code == 200 and streamed.headers["Transfer-Encoding"] == "chunked"
    assert streamed.headers["X-Sample-Rate"] == "44100"
    pieces = [c for c in streamed.iter_content(chunk_size=None) if c]
    assert len(pieces) >= 2  # sent as produced, not in one piece at the end
    raw = b"".join(pieces)
    assert not raw.startswith(b"RIFF")  # raw s16le PCM, as upstream's client plays it
    np.testing.assert_array_equal(np.frombuffer(raw, "<i2"), wav_pcm(whole.content))


def test_json_body_with_base64_reference(server, tts_engine):
    ref = reference_wav(seed=3)
    response = requests.post(f"{server.url}/v1/tts", headers=AUTH, json={
        "text": "JSON body.", "format": "mp3", "use_memory_cache": "on",
        "references": [{"audio": base64.b64encode(ref).decode(), "text": "A tone."}]})
    assert response.status_code == 200 and response.headers["Content-Type"] == "audio/mpeg"
    assert len(decode_audio(response.content, 44100)) > 0.2 * 44100
    assert tts_engine.references.get(ReferenceCache.key(ref)) is not None


def test_job_shaped_body_streams_pcm(server):
    response = requests.post(f"{server.url}/v1/tts", headers=AUTH, stream=True,
                             json={"input": {"message": "From the guide.", "streaming": True}})
    assert response.status_code == 200
    pcm = np.frombuffer(response.content, "<i2")
    assert len(pcm) > 0.2 * 44100 and np.abs(pcm).max() > 0


@pytest.mark.parametrize("kwargs, status, message", [
    ({"data": b"text=hi", "headers": {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}}, 415,
     "unsupported Content-Type"),
    ({"data": b"\xc1\xc1", "headers": {**AUTH, "Content-Type": "application/msgpack"}}, 400, "not valid msgpack"),
    ({"json": {"text": "hi", "streaming": True, "format": "mp3"}}, 400, "streaming sends raw PCM"),
    ({"json": {"text": "hi", "temperature": 1.5}}, 400, "temperature: Input should be less than or equal to 1"),
    ({"json": {"chunk_length": 200}}, 400, "text: Field required"),
    ({"json": {"text": ""}}, 400, "text is empty"),
    ({"json": {"text": "...", "streaming": True}}, 400, "text is empty"),
    ({"json": {"text": "hi", "reference_id": "missing-voice"}}, 404, "reference_id 'missing-voice' not found"),
    ({"json": {"text": "hi", "reference_id": "../etc"}}, 400, "may only contain letters"),
    ({"json": {"text": "hi", "references": [{"audio": base64.b64encode(b"x" * 300).decode(), "text": "t"}]}},
     400, "references[0].audio: cannot decode audio"),
    ({"json": {"text": "hi", "references": [{"audio": base64.b64encode(b"x" * 300_000).decode(), "text": "t"}]}},
     413, "references[0].audio is 300000 bytes; the limit is 204800"),
])
def test_tts_errors(server, kwargs, status, message):
    kwargs.setdefault("headers", AUTH)
    response = requests.post(f"{server.url}/v1/tts", **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["statusCode"] == status and message in body["message"]


def test_references_lifecycle(server, tts_engine):
    url = f"{server.url}/v1/references"
    ref = reference_wav(seed=4)
    added = requests.post(f"{url}/add", headers=JSON, files={"audio": ("voice.wav", ref, "audio/wav")},
                          data={"id": "my voice_1", "text": "A tone for my voice."})
    assert added.status_code == 200 and added.json() == {
        "success": True, "message": "reference 'my voice_1' added", "reference_id": "my voice_1"}
    dup = requests.post(f"{url}/add", headers=JSON, files={"audio": ("v.wav", ref)}, data={"id": "my voice_1",
                                                                                          "text": "x"})
    assert dup.status_code == 409 and "already exists" in dup.json()["message"]
    # Default answers are msgpack, as upstream; ?format=json or Accept: application/json gives JSON.
    listed = requests.get(f"{url}/list", headers=AUTH)
    assert listed.headers["Content-Type"] == "application/msgpack"
    assert msgpack.unpackb(listed.content)["reference_ids"] == ["my voice_1"]

    # The named voice drives /v1/tts and the job API.
    speech = requests.post(f"{server.url}/v1/tts", headers=AUTH, json={"text": "Named.", "reference_id": "my voice_1"})
    assert speech.status_code == 200 and len(wav_pcm(speech.content)) > 0
    assert tts_engine.references.get(ReferenceCache.key(ref)) is not None
    job = requests.post(f"{server.url}/runsync", headers=AUTH, json={"input": {
        "text": "Named too.", "reference_id": "my voice_1", "streaming": False}}).json()
    assert job["status"] == "COMPLETED"

    renamed = requests.post(f"{url}/update?format=json", headers=AUTH,
                            json={"old_reference_id": "my voice_1", "new_reference_id": "renamed"})
    assert renamed.status_code == 200 and renamed.json()["new_reference_id"] == "renamed"
    assert requests.get(f"{url}/list?format=json", headers=AUTH).json()["reference_ids"] == ["renamed"]
    missing = requests.post(f"{url}/update", headers=JSON, json={"old_reference_id": "nope", "new_reference_id": "x"})
    assert missing.status_code == 404
    deleted = requests.delete(f"{url}/delete", headers=JSON, params={"reference_id": "renamed"})
    assert deleted.status_code == 200 and deleted.json()["success"] is True
    gone = requests.delete(f"{url}/delete", headers=JSON, json={"reference_id": "renamed"})
    assert gone.status_code == 404 and "not found" in gone.json()["message"]
    assert requests.get(f"{url}/list?format=json", headers=AUTH).json()["reference_ids"] == []


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "..", ".hidden", "x" * 256, "", "   ", "semi;colon"])
def test_reference_ids_cannot_reach_outside(server, bad_id, tmp_path):
    url = f"{server.url}/v1/references"
    added = requests.post(f"{url}/add", headers=JSON, files={"audio": ("v.wav", reference_wav())},
                          data={"id": bad_id, "text": "t"})
    assert added.status_code == 400 and added.json()["success"] is False
    assert requests.delete(f"{url}/delete", headers=JSON, json={"reference_id": bad_id}).status_code == 400
    renamed = requests.post(f"{url}/update", headers=JSON, json={"old_reference_id": "a", "new_reference_id": bad_id})
    assert renamed.status_code == 400
    root = server.settings.references_dir.resolve()
    assert not any(p for p in root.parent.rglob("*") if p.name in ("escape", "b") and p.is_dir())


def test_reference_add_rejects_bad_audio(server):
    url = f"{server.url}/v1/references/add"
    not_audio = requests.post(url, headers=JSON, files={"audio": ("v.wav", b"plain text, no audio" * 20)},
                              data={"id": "bad", "text": "t"})
    assert not_audio.status_code == 400 and "cannot decode audio" in not_audio.json()["message"]
    no_text = requests.post(url, headers=JSON, files={"audio": ("v.wav", reference_wav())}, data={"id": "nolab"})
    assert no_text.status_code == 400 and "text" in no_text.json()["message"]
    too_big = requests.post(url, headers=JSON, files={"audio": ("v.wav", b"\0" * 300_000)},
                            data={"id": "big", "text": "t"})
    assert too_big.status_code == 413
    assert requests.get(f"{server.url}/v1/references/list?format=json", headers=AUTH).json()["reference_ids"] == []


def test_v1_health(server):
    for method in ("get", "post"):
        body = getattr(requests, method)(f"{server.url}/v1/health").json()
        assert body["status"] == "ok" and body["model"]["loaded"] is True


def test_cors_preflight_and_headers(tts_engine, tmp_path):
    settings = Settings(data_dir=tmp_path, api_key=KEY, cors_origins="https://app.example,https://b.example",
                        asr_model="none", llm_enabled=False, mode="tts", max_new_tokens_limit=8)
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        pre = requests.options(f"{live.url}/run", headers={"Origin": "https://app.example",
                                                           "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
        denied = requests.options(f"{live.url}/run", headers={"Origin": "https://evil.example",
                                                              "Access-Control-Request-Method": "POST"})
        assert denied.status_code == 403
        streamed = requests.post(f"{live.url}/v1/tts", json={"text": "Hi.", "streaming": True},
                                 headers={**AUTH, "Origin": "https://b.example"})
        assert streamed.status_code == 200 and streamed.headers["Access-Control-Allow-Origin"] == "https://b.example"


def test_client_leaving_a_stream_stops_the_model(tts_engine, tmp_path):
    settings = Settings(data_dir=tmp_path, api_key=None, asr_model="none", llm_enabled=False, mode="tts",
                        max_new_tokens_limit=0, cors_origins=[])
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        response = requests.post(f"{live.url}/v1/tts", stream=True,
                                 json={"text": "A long, long speech. " * 10, "streaming": True, "max_new_tokens": 8000})
        assert next(response.iter_content(chunk_size=None))
        assert tts_engine.active_requests == 1
        response.close()
        deadline = time.monotonic() + 2.0
        while tts_engine.active_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tts_engine.active_requests == 0
