"""OpenAI's audio API on a live server, driven by the real `openai` SDK: /v1/audio/speech in
every format (streamed, SSE, speed), /v1/audio/transcriptions and /translations on espeak-ng
speech in every response format (subtitles parsed back by `srt` and `webvtt-py`), streamed
transcription, /v1/models, and OpenAI-shaped errors for bad input."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import openai
import pytest
import srt
import webvtt

from engine.agent.asr import Transcriber
from engine.audio import decode_audio, encode_audio
from server.references import ReferenceStore
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer
from speechkit import espeak_available, espeak_wav, wer

KEY = "openai-key"
ORIGIN = "http://webui.example"
FRAMES = 12  # the server's max_new_tokens_limit: frames per sentence from the never-stopping tiny model
TEXT = "Hello there. This is a test."  # two sentences
SPOKEN = "Please turn on the kitchen lights."

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng and sox are needed for test speech")


def reference_wav(seconds: float = 1.5) -> bytes:
    t = np.arange(int(seconds * 44100)) / 44100
    return encode_audio((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 44100, "wav")


@pytest.fixture(scope="module")
def asr() -> Transcriber:
    transcriber = Transcriber.load()
    yield transcriber
    transcriber.close()


@pytest.fixture(scope="module")
def server(tts_engine, asr, tmp_path_factory):
    data = tmp_path_factory.mktemp("openai-data")
    store = ReferenceStore(data / "references")
    store.add("alice", reference_wav(), "A low tone.", "alice.wav")
    settings = Settings(data_dir=data, checkpoint="/models/tiny-s1-mini", mode="tts", api_key=KEY,
                        llm_enabled=False, max_new_tokens_limit=FRAMES, max_transcription_bytes=400_000,
                        max_transcription_seconds=20, cors_origins=[ORIGIN])
    with LiveServer(settings, Services(tts=tts_engine, asr=asr, references=store)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hop(tts_engine) -> int:
    return tts_engine.models.codec.hop_length


def speak(client: openai.OpenAI, **kwargs) -> tuple[bytes, list[bytes], str]:
    """(body, the pieces it arrived in, content type) of a streamed /v1/audio/speech."""
    args = {"model": "tts-1", "voice": "alice", "input": TEXT, "extra_body": {"seed": 7}, **kwargs}
    with client.audio.speech.with_streaming_response.create(**args) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        pieces = [p for p in response.iter_bytes() if p]
        return b"".join(pieces), pieces, response.headers["content-type"]


def decoded(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Mono float32 and its rate, decoded by PyAV (raw pcm: s16le at 24 kHz, as OpenAI sends it)."""
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24000
    import av

    with av.open(io.BytesIO(data)) as container:
        rate = container.streams.audio[0].codec_context.sample_rate
    return decode_audio(data, rate), rate


def band_rms(pcm: np.ndarray, rate: int, low_hz: float = 50, high_hz: float = 4000) -> float:
    """RMS of the part of `pcm` between `low_hz` and `high_hz` (Parseval over the rfft bins)."""
    spectrum = np.fft.rfft(pcm)
    freqs = np.fft.rfftfreq(pcm.size, 1 / rate)
    band = (freqs >= low_hz) & (freqs < high_hz)
    return float(np.sqrt(2 * np.sum(np.abs(spectrum[band]) ** 2)) / pcm.size)


def centroid(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm))
    freqs = np.fft.rfftfreq(pcm.size, 1 / rate)
    return float((spectrum * freqs).sum() / spectrum.sum())


# --------------------------------------------------------------------------- speech
@pytest.mark.parametrize("fmt,mime,rate", [("mp3", "audio/mpeg", 44100), ("opus", "audio/ogg", 48000),
                                           ("aac", "audio/aac", 44100), ("flac", "audio/flac", 44100),
                                           ("wav", "audio/wav", 44100), ("pcm", "audio/pcm", 24000)])
def test_speech_streams_every_format(client, hop, fmt, mime, rate):
    reference, _ = decoded(speak(client, response_format="wav")[0], "wav")  # lossless, 16-bit
    body, pieces, ctype = speak(client, response_format=fmt)
    assert ctype == mime
    assert len(pieces) >= 2  # sent as it is encoded, not in one piece at the end
    pcm, got_rate = decoded(body, fmt)
    assert got_rate == rate
    expected = 2 * FRAMES * hop / 44100  # two sentences of FRAMES code frames each
    assert abs(pcm.size / rate - expected) < 0.08, (pcm.size / rate, expected)
    # Level in the speech band: lossy codecs drop the DC offset and the top octave of the tiny
    # random model's output, neither of which is speech.
    level, reference_level = band_rms(pcm, rate), band_rms(reference, 44100)
    assert reference_level > 0.01  # audible, not silence
    assert level / reference_level == pytest.approx(1.0, abs=0.15)  # the same level in every format


def test_same_seed_same_audio_and_the_reference_voice_counts(client):
    alice, _, _ = speak(client, response_format="pcm")
    again, _, _ = speak(client, response_format="pcm", voice={"id": "alice"})  # type: ignore[arg-type]
    default, _, _ = speak(client, response_format="pcm", voice="alloy")  # a preset name: the default voice
    assert alice == again
    assert alice != default  # the saved reference really steers the generation


def test_speed_two_halves_the_duration_at_the_same_pitch(client):
    normal, _, _ = speak(client, response_format="wav")
    fast, _, _ = speak(client, response_format="wav", speed=2.0)
    slow, _, _ = speak(client, response_format="wav", speed=0.5)
    a, rate = decoded(normal, "wav")
    b, _ = decoded(fast, "wav")
    c, _ = decoded(slow, "wav")
    assert b.size / a.size == pytest.approx(0.5, abs=0.04)
    assert c.size / a.size == pytest.approx(2.0, abs=0.08)
    # A resample would double (halve) every frequency; a time stretch keeps the spectrum in place.
    assert centroid(b, rate) / centroid(a, rate) == pytest.approx(1.0, abs=0.2)
    assert centroid(c, rate) / centroid(a, rate) == pytest.approx(1.0, abs=0.2)


def test_speech_sse_carries_the_same_audio_and_usage(client):
    audio, _, _ = speak(client, response_format="pcm")
    with client.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="alice", input=TEXT, response_format="pcm", stream_format="sse",
            extra_body={"seed": 7}) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == audio
    usage = events[-1]["usage"]
    assert usage["output_tokens"] == 2 * FRAMES and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_a_client_that_leaves_stops_the_synthesis(server, client, tts_engine):
    import time

    import requests

    long_text = " ".join(f"Sentence {n} is here." for n in range(100))  # ~20 s of work for the tiny model
    with requests.post(server.url + "/v1/audio/speech", json={"voice": "alice", "input": long_text},
                       headers={"Authorization": f"Bearer {KEY}"}, stream=True) as response:
        assert response.status_code == 200
        next(response.iter_content(chunk_size=None))  # the first bytes, then hang up
    deadline = time.monotonic() + 10
    while tts_engine.active_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tts_engine.active_requests == 0  # a hundred sentences were not generated for nobody
    assert speak(client, response_format="pcm")[0]  # and the server still serves


def test_instructions_are_accepted(client):
    body, _, _ = speak(client, response_format="pcm", instructions="Speak cheerfully.")
    assert body == speak(client, response_format="pcm")[0]  # no style prompt in Fish Speech: same audio


@pytest.mark.parametrize("kwargs,param", [
    ({"input": ""}, "input"),
    ({"input": " ... !"}, "input"),
    ({"input": "a" * 4097}, "input"),
    ({"voice": "nobody-here"}, "voice"),
    ({"voice": "../etc"}, "voice"),
    ({"speed": 4.5}, "speed"),
    ({"speed": 0.1}, "speed"),
    ({"response_format": "ogg"}, "response_format"),
    ({"stream_format": "websocket"}, "stream_format"),
])
def test_bad_speech_requests_are_clear_400s(client, kwargs, param):
    args = {"model": "tts-1", "voice": "alice", "input": TEXT, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(**args)
    assert info.value.status_code == 400
    assert info.value.param == param and info.value.type == "invalid_request_error"
    assert param in info.value.message or param == "voice"


def test_wrong_key_is_a_401_in_openai_shape(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.audio.speech.create(model="tts-1", voice="alice", input=TEXT)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_browser_apps_get_cors_as_on_every_route(server):
    import requests

    preflight = requests.options(server.url + "/v1/audio/speech", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    r = requests.get(server.url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    other = requests.get(server.url + "/v1/models", headers={"Origin": "http://evil.example",
                                                             "Authorization": f"Bearer {KEY}"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_malformed_json_is_a_400(server):
    import requests

    r = requests.post(server.url + "/v1/audio/speech", data=b"{not json",
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# --------------------------------------------------------------------------- transcription
@pytest.fixture(scope="module")
def spoken_wav() -> bytes:
    if not espeak_available():
        pytest.skip("espeak-ng and sox are needed for test speech")
    return encode_audio(espeak_wav(SPOKEN), 16000, "wav")


def test_transcription_json_and_text(client, spoken_wav):
    result = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", spoken_wav))
    assert wer(SPOKEN, result.text) == 0.0
    text = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", spoken_wav),
                                              response_format="text")
    assert wer(SPOKEN, text) == 0.0


def test_transcription_of_compressed_uploads(client):
    if not espeak_available():
        pytest.skip("espeak-ng and sox are needed for test speech")
    pcm = espeak_wav(SPOKEN)
    for fmt in ("mp3", "opus", "flac"):
        data = encode_audio(pcm, 16000, fmt)
        result = client.audio.transcriptions.create(model="any-name", file=(f"speech.{fmt}", data))
        assert wer(SPOKEN, result.text) == 0.0, (fmt, result.text)


def test_transcription_srt_and_vtt_parse_back(client, spoken_wav):
    duration = len(decode_audio(spoken_wav, 16000)) / 16000
    srt_text = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", spoken_wav),
                                                  response_format="srt")
    subs = list(srt.parse(srt_text))
    assert subs and wer(SPOKEN, " ".join(s.content for s in subs)) == 0.0
    assert 0 <= subs[0].start.total_seconds() < subs[-1].end.total_seconds() <= duration + 0.5
    vtt_text = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", spoken_wav),
                                                  response_format="vtt")
    captions = list(webvtt.from_string(vtt_text))
    assert captions and wer(SPOKEN, " ".join(c.text for c in captions)) == 0.0
    assert captions[-1].end_in_seconds <= duration + 0.5


def test_verbose_json_has_segments_and_words(client, spoken_wav):
    result = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", spoken_wav),
                                                response_format="verbose_json", timestamp_granularities=["word"])
    assert result.language == "en" and result.duration == pytest.approx(len(espeak_wav(SPOKEN)) / 16000, abs=0.05)
    assert result.segments and wer(SPOKEN, " ".join(s.text for s in result.segments)) == 0.0
    words = result.words
    assert wer(SPOKEN, " ".join(w.word for w in words)) == 0.0
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(w.end >= w.start for w in words)
    assert words[-1].end <= result.duration + 0.1


def test_streaming_transcription(client, spoken_wav):
    stream = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("speech.wav", spoken_wav),
                                                stream=True)
    events = list(stream)
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert deltas and events[-1].type == "transcript.text.done"
    assert "".join(d.delta for d in deltas) == events[-1].text
    assert wer(SPOKEN, events[-1].text) == 0.0


def test_translation_to_english(client, spoken_wav):
    result = client.audio.translations.create(model="whisper-1", file=("speech.wav", spoken_wav))
    assert wer(SPOKEN, result.text) == 0.0


def test_bad_uploads_are_clear_errors(client, tmp_path):
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", b"this is not audio at all"))
    assert info.value.param == "file"
    with pytest.raises(openai.APIStatusError) as too_big:  # over max_transcription_bytes
        client.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"\0" * 500_000))
    assert too_big.value.status_code == 413 and too_big.value.param == "file"
    long_silence = encode_audio(np.zeros(25 * 8000, np.float32), 8000, "flac")  # 25 s > the 20 s limit, few bytes
    with pytest.raises(openai.APIStatusError) as too_long:
        client.audio.transcriptions.create(model="whisper-1", file=("long.flac", long_silence))
    assert too_long.value.status_code == 413 and "20" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as lang:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", encode_audio(np.zeros(8000, np.float32),
                                                                                        16000, "wav")), language="fr")
    assert lang.value.param == "language" and "English-only" in lang.value.message
    with pytest.raises(openai.BadRequestError) as fmt:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x"), response_format="docx")  # type: ignore[arg-type]
    assert fmt.value.param == "response_format"


# --------------------------------------------------------------------------- models and 503s
def test_models_list_and_retrieve(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"tiny-s1-mini", "whisper-tiny.en"}  # no LLM loaded on this server
    alias = client.models.retrieve("whisper-1")
    assert alias.id == "whisper-1" and alias.model_extra["root"] == "whisper-tiny.en"
    assert client.models.retrieve("tiny-s1-mini").owned_by == "fishvoice"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-5")
    assert info.value.code == "model_not_found"


def test_voices_lists_the_saved_references(server, client):
    voices = client.get("/audio/voices", cast_to=object)
    assert voices == {"voices": [{"id": "alice", "name": "alice"}]}


def test_without_models_the_routes_answer_503(tmp_path):
    settings = Settings(data_dir=tmp_path, asr_model="none", llm_enabled=False)
    services = Services(errors={"tts": "no checkpoint here", "asr": "disabled (ASR_MODEL=none)"})
    with LiveServer(settings, services) as live:
        bare = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as tts:
            bare.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
        assert tts.value.status_code == 503 and "no checkpoint here" in tts.value.message
        with pytest.raises(openai.InternalServerError) as asr:
            bare.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"))
        assert asr.value.status_code == 503 and "ASR_MODEL=none" in asr.value.message
        assert list(bare.models.list()) == []
