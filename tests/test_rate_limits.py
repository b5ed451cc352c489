"""Rate limits and concurrency caps: the published table's budgets per key (per client address on
an open server), 429 with Retry-After and the route's JSON error, /health never limited, refusals
counted in /metrics; and with RATE_LIMIT_STORAGE=redis://... two server processes share one budget
(a real redis-server, started here on a loopback port)."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from server.ratelimit import Limited, LimitsError, RateLimiter
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

KEY = "limits-test-key-0123"
OTHER = "limits-other-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("limits")
    keys = data / "keys.toml"
    keys.write_text('[[key]]\nname = "other"\nkey = "%s"\nscopes = ["*"]\n' % OTHER)
    settings = Settings(data_dir=data, mode="tts", api_key=KEY, keys_file=keys, asr_model="none", llm_enabled=False)
    with LiveServer(settings, Services()) as live:
        yield live


def count_until_429(url: str, headers: dict[str, str], limit: int) -> tuple[int, requests.Response]:
    """How many requests pass before the first 429 (at most `limit` tries), and that 429."""
    for i in range(limit):
        response = requests.post(url, headers=headers, json={})
        if response.status_code == 429:
            return i, response
    raise AssertionError(f"no 429 within {limit} requests")


def test_purge_queue_allows_two_per_ten_seconds_per_key(server):
    passed, refused = count_until_429(server.url + "/purge-queue", AUTH, 10)
    assert passed == 2
    assert 1 <= int(refused.headers["Retry-After"]) <= 10
    body = refused.json()
    assert body["output"]["status"] == "error" and "rate limit" in body["error"]  # the job API's error shape
    # Another key has its own budget; the /v2 path is the same route and budget.
    assert requests.post(server.url + "/purge-queue", headers={"Authorization": f"Bearer {OTHER}"}).status_code == 200
    assert requests.post(server.url + "/v2/ep/purge-queue", headers=AUTH).status_code == 429
    metrics = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {OTHER}"}).text
    counted = sum(float(x.split()[-1]) for x in metrics.splitlines()
                  if x.startswith("fishvoice_access_refusals_total{") and 'status="429"' in x
                  and ('route="/v2/{endpoint_id}/purge-queue"' in x or 'route="/purge-queue"' in x))
    assert counted >= 2, metrics


def test_cancel_allows_a_hundred_per_ten_seconds(server):
    passed, refused = count_until_429(server.url + "/cancel/no-such-job", AUTH, 150)
    assert passed == 100
    assert refused.headers["Retry-After"].isdigit()


def test_health_and_ping_are_never_limited(server):
    for _ in range(60):
        assert requests.get(server.url + "/health").status_code == 200
        assert requests.get(server.url + "/ping").status_code in (200, 204, 503)


def test_open_server_limits_per_client_address(tmp_path):
    settings = Settings(data_dir=tmp_path, mode="tts", asr_model="none", llm_enabled=False,
                        rate_limits={"purge-queue": "1 per 10 seconds"})
    with LiveServer(settings, Services()) as live:
        assert requests.post(live.url + "/purge-queue").status_code == 200
        assert requests.post(live.url + "/purge-queue").status_code == 429


def test_concurrency_cap_and_bad_configuration():
    limiter = RateLimiter(concurrency={"cancel": 2})
    with limiter.slot("cancel", "a"), limiter.slot("cancel", "a"):
        with pytest.raises(Limited):
            with limiter.slot("cancel", "a"):
                pass
        with limiter.slot("cancel", "b"):  # another caller's slots are its own
            pass
    with limiter.slot("cancel", "a"):  # released on exit
        pass
    with pytest.raises(LimitsError, match="unknown group"):
        RateLimiter(rates={"everything": "1 per second"})
    with pytest.raises(LimitsError, match="per 10 seconds"):
        RateLimiter(rates={"cancel": "lots"})
    with pytest.raises(LimitsError, match="positive integer"):
        RateLimiter(concurrency={"cancel": 0})


# --------------------------------------------------------------------------- Redis across processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout} s")


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            break
        assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def test_redis_budget_is_shared_by_two_server_processes(redis_url, tiny_checkpoint, tmp_path):
    procs, urls = [], []
    try:
        for i in range(2):
            port = free_port()
            env = {**os.environ, "API_KEY": KEY, "RATE_LIMIT_STORAGE": redis_url, "CHECKPOINT": str(tiny_checkpoint),
                   "DEVICE": "cpu", "MODE": "tts", "ASR_MODEL": "none", "LLM_ENABLED": "false",
                   "DATA_DIR": str(tmp_path / f"replica{i}"), "PORT": str(port), "HOST": "127.0.0.1",
                   "RATE_LIMITS": '{"cancel": "5 per 10 seconds"}', "PYTHONPATH": str(ROOT)}
            procs.append(subprocess.Popen([sys.executable, "-m", "server", "serve"], cwd=ROOT, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs):
            wait_http(url + "/health", proc)
        # Alternate between the replicas: the one budget of 2 (purge-queue) and of 5 (cancel, overridden).
        statuses = [requests.post(urls[i % 2] + "/purge-queue", headers=AUTH).status_code for i in range(4)]
        assert statuses == [200, 200, 429, 429], statuses
        statuses = [requests.post(urls[i % 2] + "/cancel/nope", headers=AUTH).status_code for i in range(7)]
        assert statuses == [404] * 5 + [429, 429], statuses
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
