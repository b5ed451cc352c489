"""Prometheus metrics, served at GET /metrics (behind the API key like the other routes).

    fishvoice_turn_latency_seconds{source, stage}   histogram: from the end of the user's turn (VAD
        end on a call; the request's start for a job) to each stage: transcript, first_token,
        first_audio, total. Calls report through `observe_turn_latency(latency_ms)`; jobs are
        observed by the server as they finish.
    fishvoice_jobs{status}                          jobs in the job store by status
    fishvoice_job_queue_depth, _capacity, fishvoice_jobs_running
    fishvoice_realtime_calls_active, _max          live WebRTC calls and the limit
    fishvoice_model_batch_size                      histogram: sequences per batched model step
    fishvoice_model_active_requests                 requests the model worker is serving now
    fishvoice_access_refusals_total{route, status}  requests refused with 401, 403 or 429
    fishvoice_tool_runs_total{tool, outcome}         tool calls the server ran by webhook (phone calls):
        ok, http_error, timeout, unreachable, too_long, cancelled
    fishvoice_speculative_replies_total{outcome}    replies started from a turn's pause transcript before
        the turn ended (SPECULATIVE_REPLIES): started, adopted (the turn ended as predicted), dropped
        (cancelled unseen; with a paid LLM endpoint each one cost tokens)
    process_* (CPU, memory, open files)

Values that describe the app's state are read when /metrics is scraped, from the objects that
own them (job store, call registry, model worker), so they cannot drift from what /health says.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.access import REFUSALS, requires_key

STAGES = ("transcript", "first_token", "first_audio", "total")
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# Process-wide, like the latencies they record; each app's registry includes it.
TURN_LATENCY = Histogram("fishvoice_turn_latency_seconds",
                         "Time from the end of the user's turn to each stage of the reply",
                         ["source", "stage"], buckets=LATENCY_BUCKETS, registry=None)

TOOL_RUNS = Counter("fishvoice_tool_runs_total", "Tool calls the server ran through their webhooks",
                    ["tool", "outcome"], registry=None)

SPECULATIONS = Counter("fishvoice_speculative_replies_total", "Replies started before their turn ended, by outcome",
                       ["outcome"], registry=None)

REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


def observe_speculation(outcome: str) -> None:
    """Count one speculative reply's outcome (started, adopted, dropped), as the conversation reports it."""
    SPECULATIONS.labels(outcome=outcome).inc()


def observe_tool_run(tool: str, outcome: str, seconds: float) -> None:
    """Count one webhook tool run by its outcome (signaling.tool_executor reports each)."""
    TOOL_RUNS.labels(tool=tool, outcome=outcome).inc()


def observe_turn_latency(latency_ms: Mapping[str, Any], source: str = "realtime") -> None:
    """Record one turn's stage latencies (milliseconds by stage name, as the conversation pipeline
    and the job handler report them). Unknown stages and non-numbers are ignored."""
    for stage in STAGES:
        value = latency_ms.get(stage)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            TURN_LATENCY.labels(source=source, stage=stage).observe(value / 1000.0)


async def observe_job(items: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """The job handler's output, passed through; a successful result's latencies are recorded.
    Closing this closes the handler's generator too, so cancelling still stops the model work."""
    async with contextlib.aclosing(items):  # type: ignore[type-var]
        async for item in items:
            if isinstance(item, dict) and item.get("status") == "success" and isinstance(item.get("latency_ms"), dict):
                observe_turn_latency(item["latency_ms"], source="job")
            yield item


class AppStateCollector(Collector):
    """Gauges read from the running app at scrape time."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        from server.http import JOBS, SERVICES
        from signaling.routes import CALLS

        jobs = self.app.get(JOBS)
        if jobs is not None:
            by_status = GaugeMetricFamily("fishvoice_jobs", "Jobs in the job store by status", labels=["status"])
            counts = jobs.store.counts()
            counts.pop("retried", None)
            for status in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
                by_status.add_metric([status], counts.get(status, 0))
            yield by_status
            yield GaugeMetricFamily("fishvoice_job_queue_depth", "Jobs waiting for a worker", value=jobs.queued)
            yield GaugeMetricFamily("fishvoice_job_queue_capacity", "Queue size above which /run answers 503",
                                    value=jobs.queue_size)
            yield GaugeMetricFamily("fishvoice_jobs_running", "Jobs generating now", value=jobs.running)
        calls = self.app.get(CALLS)
        if calls is not None:
            yield GaugeMetricFamily("fishvoice_realtime_calls_active", "Live WebRTC calls", value=len(calls.calls))
            yield GaugeMetricFamily("fishvoice_realtime_calls_max", "Concurrent call limit", value=calls.max_calls)
        services = self.app.get(SERVICES)
        worker = getattr(getattr(services, "tts", None), "worker", None)
        if worker is not None:
            yield GaugeMetricFamily("fishvoice_model_active_requests", "Requests the model worker is serving",
                                    value=worker.active_jobs)
            yield _batch_histogram(_snapshot(worker.batch_sizes))


def _snapshot(counter: Mapping[int, int]) -> dict[int, int]:
    """A copy of a Counter that the model thread may be adding a key to right now."""
    for _ in range(5):
        try:
            return dict(counter)
        except RuntimeError:  # changed size during iteration: try again
            continue
    return {}


def _batch_histogram(sizes: Mapping[int, int]) -> HistogramMetricFamily:
    buckets = [(str(float(bound)), sum(n for size, n in sizes.items() if size <= bound)) for bound in BATCH_BUCKETS]
    total = sum(sizes.values())
    buckets.append(("+Inf", total))
    return HistogramMetricFamily("fishvoice_model_batch_size", "Sequences per batched model step",
                                 buckets=buckets, sum_value=float(sum(s * n for s, n in sizes.items())))


def install(app: web.Application) -> None:
    """A registry for this app (its state, the process-wide turn latencies, process figures) and GET /metrics."""
    registry = CollectorRegistry()
    registry.register(TURN_LATENCY)
    registry.register(REFUSALS)
    registry.register(TOOL_RUNS)
    registry.register(SPECULATIONS)
    registry.register(AppStateCollector(app))
    ProcessCollector(registry=registry)
    app[REGISTRY] = registry
    app.router.add_get("/metrics", metrics)


@requires_key()
async def metrics(request: web.Request) -> web.Response:
    # Collecting reads the job store (SQLite): off the event loop.
    body = await asyncio.to_thread(generate_latest, request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
