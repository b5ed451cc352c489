"""The start-up contract: `python -m server serve` with flags and environment equivalents, ready
when /health answers, and still serving (with clear 503s) when the model cannot be loaded."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from server.__main__ import settings_from_args, settings_parser

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
        try:
            return requests.get(f"{url}/health", timeout=2).json()
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError("the server never answered /health")


def test_serves_without_the_model_and_says_why(tmp_path):
    port = free_port()
    # The Makefile's default checkpoint (the gated s1-mini repo) on a machine that cannot fetch it.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PORT": str(port), "API_KEY": "k",
           "MODE": "agent", "ASR_MODEL": "none", "LLM_ENABLED": "false", "DATA_DIR": str(tmp_path / "data")}
    env.pop("CHECKPOINT", None)
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--mode", "tts"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_health(url, proc)  # no key needed
        assert health["status"] == "unavailable" and health["mode"] == "tts"  # the flag beat MODE=agent
        assert health["model"]["checkpoint"] == "s1-mini" and health["model"]["loaded"] is False
        reason = health["model"]["error"]
        assert "fishaudio/openaudio-s1-mini" in reason and "--checkpoint" in reason
        run = requests.post(f"{url}/run", json={"input": {"text": "Hello"}}, headers={"Authorization": "Bearer k"})
        assert run.status_code == 503 and run.json()["error"] == f"the TTS model is not loaded: {reason}"
        assert requests.post(f"{url}/run", json={"input": {"text": "Hello"}}).status_code == 401
        tts = requests.post(f"{url}/v1/tts", json={"text": "Hello"}, headers={"Authorization": "Bearer k"})
        assert tts.status_code == 503 and reason in tts.json()["message"]
        assert requests.get(f"{url}/ping").status_code == 503
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    assert f"serving on http://127.0.0.1:{port} (mode tts, checkpoint s1-mini)" in proc.stdout.read()


def test_flags_override_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PORT", "9001")
    monkeypatch.setenv("MODE", "tts")
    monkeypatch.setenv("CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("QUEUE_SIZE", "7")
    args = settings_parser().parse_args(["--port", "9100", "--checkpoint", str(tmp_path), "--api-key", "s3cret",
                                         "--llm-enabled", "false", "--ice-servers", "stun:stun.example:3478"])
    settings = settings_from_args(args)
    assert (settings.port, settings.mode, settings.queue_size) == (9100, "tts", 7)
    assert settings.checkpoint == str(tmp_path) and settings.api_key == "s3cret" and settings.llm_enabled is False
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.ice_servers == ["stun:stun.example:3478"]
    assert settings.result_ttl >= 1800  # results are kept at least 30 minutes


def test_decode_slots_setting_reaches_the_engine(monkeypatch, tiny_checkpoint):
    from server.services import _load_tts

    monkeypatch.setenv("DECODE_SLOTS", "2")
    settings = settings_from_args(settings_parser().parse_args(["--checkpoint", str(tiny_checkpoint),
                                                                "--device", "cpu"]))
    engine = _load_tts(settings)
    try:
        assert engine.facts["decode_slots"] == 2  # as the TTS process loaded it
    finally:
        engine.close()
    monkeypatch.setenv("DECODE_SLOTS", "0")
    engine = _load_tts(settings_from_args(settings_parser().parse_args(["--checkpoint", str(tiny_checkpoint),
                                                                        "--device", "cpu"])))
    try:
        assert engine.facts["decode_slots"] == 0
    finally:
        engine.close()


_BLAS_PROBE = """
import json, sys, threadpoolctl
from server.services import load_services_sync
from server.settings import Settings
def openblas():
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
before = openblas()
services = load_services_sync(Settings(checkpoint=sys.argv[1], asr_model="none", llm_enabled=False))
assert services.tts is None and "tts" in services.errors, services.errors
print(json.dumps([before, openblas()]))
"""


def _openblas_threads_around_startup(tmp_path, **env: str) -> list[list[int]]:
    """numpy's OpenBLAS thread counts before and after `load_services_sync`, in a fresh process."""
    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env = {**base, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DATA_DIR": str(tmp_path / "data"),
           "OMP_NUM_THREADS": "2", **env}  # OpenBLAS starts with 2 threads even on a 1-core runner
    out = subprocess.run([sys.executable, "-c", _BLAS_PROBE, str(tmp_path / "no-checkpoint")], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_startup_keeps_numpys_blas_to_one_thread(tmp_path):
    # OpenBLAS's idle threads spin after each product and took a core from the ASR encoder.
    before, after = _openblas_threads_around_startup(tmp_path)
    assert before and all(n == 2 for n in before)  # the probe can see the limit change
    assert after == [1] * len(before)


def test_startup_leaves_an_explicit_openblas_setting_alone(tmp_path):
    before, after = _openblas_threads_around_startup(tmp_path, OPENBLAS_NUM_THREADS="2")
    assert before and after == before == [2] * len(before)


def test_image_entrypoint_serves_a_loaded_model(tiny_checkpoint, tmp_path):
    """docker/entrypoint.sh off RunPod: the HTTP server with the model loaded at start-up, MODE honoured,
    extra flags passed through; a bad MODE is refused before anything starts."""
    entrypoint = str(REPO / "docker" / "entrypoint.sh")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "CHECKPOINT": str(tiny_checkpoint), "DEVICE": "cpu", "ASR_MODEL": "none", "LLM_ENABLED": "false",
           "DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    bad = subprocess.run(["sh", entrypoint], env={**env, "MODE": "speak"}, capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "MODE must be 'agent' or 'tts', got 'speak'" in bad.stderr

    port = free_port()
    proc = subprocess.Popen(["sh", entrypoint, "serve", "--api-key", "k", "--max-new-tokens-limit", "8"],
                            env={**env, "MODE": "tts", "HOST": "127.0.0.1", "PORT": str(port)}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_health(url, proc)
        assert health["status"] == "ok" and health["mode"] == "tts" and health["model"]["loaded"] is True
        job = requests.post(f"{url}/runsync", json={"input": {"text": "Served from the image.", "streaming": False}},
                            headers={"Authorization": "Bearer k"}, timeout=60).json()
        assert job["status"] == "COMPLETED" and job["output"]["mode"] == "tts" and job["output"]["duration"] > 0
        assert requests.post(f"{url}/run", json={"input": {"text": "x"}}).status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
