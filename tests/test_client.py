"""The command-line test client (`python -m server.client`) against a live server, and --local."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.audio import decode_audio, encode_audio
from server import client
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

KEY = "client-key"


@pytest.fixture(scope="module")
def server(tts_engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("client"), mode="tts", api_key=KEY, asr_model="none",
                        llm_enabled=False, max_new_tokens_limit=12, cors_origins=[])
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        yield live


def test_streaming_tts_with_a_reference(server, tmp_path, capsys):
    ref = tmp_path / "ref.wav"
    t = np.arange(44100) / 44100
    ref.write_bytes(encode_audio((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 44100, "wav"))
    out = tmp_path / "out.wav"
    code = client.main(["--url", server.url, "--api-key", KEY, "--tts", "--message", "Hello from the client.",
                        "--system-audio", str(ref), "--reference-text", "A steady tone.", "--streaming",
                        "--output", str(out), "--conversation-id", "cli-1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "first audio chunk after" in printed and f"audio: {out}" in printed
    audio = decode_audio(out.read_bytes(), 44100)
    summary = json.loads((tmp_path / "out.wav.json").read_text())
    assert summary["conversation_id"] == "cli-1" and len(audio) == pytest.approx(summary["duration"] * 44100, abs=45)


def test_runpod_style_endpoint_path_and_format(server, tmp_path):
    out = tmp_path / "speech.mp3"
    code = client.main(["--url", server.url, "--endpoint", "my-endpoint", "--api-key", KEY, "--tts",
                        "--message", "Polling for the result.", "--format", "mp3", "--output", str(out)])
    assert code == 0 and len(decode_audio(out.read_bytes(), 44100)) > 0.2 * 44100


def test_errors_exit_1(server, tmp_path, capsys):
    assert client.main(["--url", server.url, "--api-key", "wrong", "--tts", "--output", str(tmp_path / "x")]) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert client.main(["--url", server.url, "--api-key", KEY, "--tts", "--temperature", "9"]) == 1
    assert "temperature" in capsys.readouterr().err


def test_local_runs_the_handler_in_process(tiny_checkpoint, tmp_path, monkeypatch):
    for name, value in {"MODE": "tts", "ASR_MODEL": "none", "LLM_ENABLED": "false", "DATA_DIR": str(tmp_path),
                        "MAX_NEW_TOKENS_LIMIT": "8", "DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "local.flac"
    code = client.main(["--local", "--checkpoint", str(tiny_checkpoint), "--tts", "--message", "Local run.",
                        "--format", "flac", "--output", str(out)])
    assert code == 0 and len(decode_audio(out.read_bytes(), 44100)) > 0


def test_final_result_accepts_runpod_aggregate_lists():
    chunk = {"status": "streaming", "index": 0, "audio": "AAAA", "sample_rate": 44100}
    final = {"status": "success", "audio_in_chunks": True}
    assert client.final_result([chunk, final]) == (final, [chunk])
    data, fmt = client.audio_bytes(final, [chunk])
    assert fmt == "wav" and data.startswith(b"RIFF") and len(data) == 44 + 3
