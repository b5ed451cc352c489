"""GET /metrics on a live server: Prometheus text that prometheus_client's own parser reads, behind the
API key, with jobs by status, queue depth, active calls, model batch sizes and per-stage latency
histograms that move when real jobs run."""
from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from server import metrics
from server.services import Services
from server.settings import Settings
from server.testing import LiveServer

import pytest

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tts_engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("metrics"), mode="tts", api_key=KEY, asr_model="none",
                        llm_enabled=False, max_new_tokens_limit=6, cors_origins=[], max_sessions=3)
    with LiveServer(settings, Services(tts=tts_engine)) as live:
        yield live


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, parsed by prometheus_client."""
    response = requests.get(f"{server.url}/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_api_key(server):
    assert requests.get(f"{server.url}/metrics").status_code == 401
    assert requests.get(f"{server.url}/metrics", headers={"Authorization": "Bearer no"}).status_code == 401


def test_jobs_queue_calls_and_batches_are_reported(server):
    before = scrape(server)
    assert value(before, "fishvoice_job_queue_depth") == 0 and value(before, "fishvoice_job_queue_capacity") == 64
    assert value(before, "fishvoice_realtime_calls_active") == 0 and value(before, "fishvoice_realtime_calls_max") == 3
    assert ("process_resident_memory_bytes", ()) in before
    done = requests.post(f"{server.url}/runsync", json={"input": {"tts": True, "text": "Hello there.",
                                                                   "streaming": False}}, headers=AUTH, timeout=120)
    assert done.status_code == 200 and done.json()["status"] == "COMPLETED", done.text
    refused = requests.post(f"{server.url}/run", json={"input": {"tts": True}}, headers=AUTH)
    assert refused.status_code == 400  # refused before queueing: not a job
    queued = requests.post(f"{server.url}/run", json={"input": {"tts": True, "text": "Cancel me."}}, headers=AUTH)
    requests.post(f"{server.url}/cancel/{queued.json()['id']}", headers=AUTH)
    after = scrape(server)
    assert value(after, "fishvoice_jobs", status="COMPLETED") == value(before, "fishvoice_jobs", status="COMPLETED") + 1
    assert value(after, "fishvoice_jobs", status="CANCELLED") + value(after, "fishvoice_jobs", status="COMPLETED") \
        >= value(before, "fishvoice_jobs", status="COMPLETED") + 2  # the second job either finished or was cancelled
    health = requests.get(f"{server.url}/health").json()["jobs"]
    assert value(after, "fishvoice_jobs", status="COMPLETED") == health["completed"]
    # The tiny model really ran: its batched decode steps are counted by size.
    assert value(after, "fishvoice_model_batch_size_count") > value(before, "fishvoice_model_batch_size_count")
    assert value(after, "fishvoice_model_batch_size_bucket", le="1.0") >= 1
    assert value(after, "fishvoice_model_batch_size_sum") >= value(after, "fishvoice_model_batch_size_count")
    # The job's own latencies (from the handler's latency_ms) landed in the per-stage histogram.
    stage = dict(source="job", stage="total")
    assert value(after, "fishvoice_turn_latency_seconds_count", **stage) == \
        value(before, "fishvoice_turn_latency_seconds_count", **stage) + 1
    total_ms = done.json()["output"]["latency_ms"]["total"]
    grown = value(after, "fishvoice_turn_latency_seconds_sum", **stage) - \
        value(before, "fishvoice_turn_latency_seconds_sum", **stage)
    assert abs(grown - total_ms / 1000) < 1e-6


def test_observe_turn_latency_fills_each_stage(server):
    before = scrape(server)
    metrics.observe_turn_latency({"transcript": 120.0, "first_token": 300.0, "first_audio": 650.0,
                                  "bogus": 1.0, "total": float("nan")})
    after = scrape(server)
    for name, seconds in (("transcript", 0.12), ("first_token", 0.3), ("first_audio", 0.65)):
        labels = dict(source="realtime", stage=name)
        assert value(after, "fishvoice_turn_latency_seconds_count", **labels) == \
            value(before, "fishvoice_turn_latency_seconds_count", **labels) + 1
        grown = value(after, "fishvoice_turn_latency_seconds_sum", **labels) - \
            value(before, "fishvoice_turn_latency_seconds_sum", **labels)
        assert abs(grown - seconds) < 1e-9
        # each of these values lands in the 0.75 s bucket (cumulative buckets)
        assert value(after, "fishvoice_turn_latency_seconds_bucket", le="0.75", **labels) > \
            value(before, "fishvoice_turn_latency_seconds_bucket", le="0.75", **labels)
    assert value(after, "fishvoice_turn_latency_seconds_count", source="realtime", stage="total") == \
        value(before, "fishvoice_turn_latency_seconds_count", source="realtime", stage="total")  # NaN is ignored
    assert not any("bogus" in str(key) for key in after)


def test_speculative_reply_outcomes_are_counted(server, tmp_path):
    from server.app import realtime_config

    # The app hands the realtime layer this counter (ConversationSession reports each outcome to it).
    assert realtime_config(Settings(data_dir=tmp_path)).observe_speculation is metrics.observe_speculation
    before = scrape(server)
    for outcome in ("started", "adopted", "started", "dropped"):
        metrics.observe_speculation(outcome)
    after = scrape(server)
    for outcome, grown in (("started", 2), ("adopted", 1), ("dropped", 1)):
        assert value(after, "fishvoice_speculative_replies_total", outcome=outcome) == \
            value(before, "fishvoice_speculative_replies_total", outcome=outcome) + grown
