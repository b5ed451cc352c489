"""The RunPod-compatible job API: /run, /runsync, /status, /stream, /cancel, /retry, /purge-queue,
/health.

Handlers only translate HTTP: validation and decoding live in server.jobs.input, queueing in
server.jobs.manager.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from server.access import ACCESS
from server.jobs.input import prepare_job
from server.http import JOBS, SERVICES, SETTINGS, job_error, read_json, requires_key
from server.jobs import FINAL_STATES, NotRetryable, QueueFull
from server.schema import JobRequest, RequestError, describe_validation_error

RUNSYNC_MIN_WAIT_MS, RUNSYNC_MAX_WAIT_MS = 1000, 300_000  # RunPod's bounds for ?wait=


def _job_id(request: web.Request) -> str:
    return request.match_info["job_id"]


def _not_found(job_id: str, request: web.Request) -> web.Response:
    minutes = request.app[SETTINGS].result_ttl / 60
    return job_error(404, f"job {job_id!r} not found (finished jobs are kept for {minutes:g} minutes)")


async def _accept(request: web.Request, id_prefix: str = "") -> str:
    """Validate a /run or /runsync body and queue it; RequestError / QueueFull say why not."""
    body = await read_json(request)
    try:
        envelope = JobRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestError(400, f"invalid request: {describe_validation_error(exc)} "
                                "(send {\"input\": {...}})") from None
    services, settings = request.app[SERVICES], request.app[SETTINGS]
    job = await prepare_job(envelope.input, services, settings)
    timeout = None
    if envelope.policy is not None and envelope.policy.executionTimeout:
        timeout = envelope.policy.executionTimeout / 1000.0
    return await request.app[JOBS].submit(envelope.input, streaming=job.input.streaming, timeout=timeout,
                                          id_prefix=id_prefix, webhook=envelope.webhook,
                                          prepared=job, prepared_bytes=job.nbytes)


def _refused(exc: Exception) -> web.Response:
    if isinstance(exc, QueueFull):
        return job_error(503, str(exc), headers={"Retry-After": "1"})
    assert isinstance(exc, RequestError)
    return job_error(exc.status, exc.message)


@requires_key("job")
async def run(request: web.Request) -> web.Response:
    try:
        job_id = await _accept(request)
    except (RequestError, QueueFull) as exc:
        return _refused(exc)
    return web.json_response({"id": job_id, "status": "IN_QUEUE"})


@requires_key("job")
async def runsync(request: web.Request) -> web.Response:
    wait = request.app[SETTINGS].runsync_wait
    if "wait" in request.query:
        try:
            wait_ms = int(request.query["wait"])
        except ValueError:
            return job_error(400, "wait must be an integer number of milliseconds")
        wait = min(max(wait_ms, RUNSYNC_MIN_WAIT_MS), RUNSYNC_MAX_WAIT_MS) / 1000.0
    try:
        job_id = await _accept(request, id_prefix="sync-")
    except (RequestError, QueueFull) as exc:
        return _refused(exc)
    jobs = request.app[JOBS]
    await jobs.wait(job_id, wait)
    body = await jobs.status(job_id)
    if body is None:
        return _not_found(job_id, request)
    if body["status"] not in FINAL_STATES:
        # As RunPod does: the caller continues with /status/{id}.
        body = {"id": job_id, "status": body["status"]}
    return web.json_response(body)


@requires_key("job")
async def status(request: web.Request) -> web.Response:
    body = await request.app[JOBS].status(_job_id(request))
    return web.json_response(body) if body is not None else _not_found(_job_id(request), request)


@requires_key("job")
async def stream(request: web.Request) -> web.Response:
    body = await request.app[JOBS].take_stream(_job_id(request))
    return web.json_response(body) if body is not None else _not_found(_job_id(request), request)


@requires_key("job")
async def cancel(request: web.Request) -> web.Response:
    body = await request.app[JOBS].cancel(_job_id(request))
    return web.json_response(body) if body is not None else _not_found(_job_id(request), request)


@requires_key("job")
async def retry(request: web.Request) -> web.Response:
    try:
        body = await request.app[JOBS].retry(_job_id(request))
    except NotRetryable as exc:
        return job_error(400, str(exc))
    except QueueFull as exc:
        return _refused(exc)
    return web.json_response(body) if body is not None else _not_found(_job_id(request), request)


@requires_key("job")
async def purge_queue(request: web.Request) -> web.Response:
    removed = await request.app[JOBS].purge_queue()
    return web.json_response({"removed": removed, "status": "completed"})


def model_state(request: web.Request) -> dict[str, Any]:
    services, settings = request.app[SERVICES], request.app[SETTINGS]
    tts_loaded = services.tts is not None
    if services.loading:
        state = "loading"
    elif not tts_loaded:
        state = "unavailable"
    else:  # agent mode without its LLM still serves requests that say "tts": true
        state = "degraded" if settings.mode == "agent" and services.llm is None else "ok"
    model: dict[str, Any] = {"checkpoint": settings.checkpoint, "loaded": tts_loaded}
    if not tts_loaded and not services.loading:
        model["error"] = services.errors.get("tts", "not loaded")
    return {"status": state, "mode": settings.mode, "model": model, "components": services.describe()}


async def health(request: web.Request) -> web.Response:
    """Job and worker counts (RunPod's shape) plus the model state; never needs the API key."""
    body = await request.app[JOBS].health()
    body = {**body, **model_state(request), "realtime": realtime_sessions(request.app)}
    keys = request.app[ACCESS].keys
    if keys.keys_file is not None:  # says when the keys file is broken (the last good one stays in force)
        body["access"] = keys.describe()
    return web.json_response(body)


def realtime_sessions(app: web.Application) -> dict[str, int]:
    """Live realtime sessions (WebRTC and WebSocket) against the cap, so a dispatcher can route."""
    from signaling.routes import CALLS

    registry = app.get(CALLS)
    if registry is None:
        return {"active": 0, "max": 0, "available": 0}
    return {"active": registry.active, "max": registry.max_calls,
            "available": max(registry.max_calls - registry.active, 0)}


async def ping(request: web.Request) -> web.Response:
    """Load-balancer probe (RunPod's convention): 200 ready, 204 still loading, 503 no model."""
    services = request.app[SERVICES]
    if services.tts is not None:
        return web.json_response({"status": "ready"})
    if services.loading:
        return web.Response(status=204)
    return job_error(503, services.errors.get("tts", "the TTS model is not loaded"))


def add_routes(router: web.UrlDispatcher, prefix: str = "") -> None:
    router.add_post(prefix + "/run", run)
    router.add_post(prefix + "/runsync", runsync)
    for method in ("GET", "POST"):
        router.add_route(method, prefix + "/status/{job_id}", status)
        router.add_route(method, prefix + "/stream/{job_id}", stream)
    router.add_post(prefix + "/cancel/{job_id}", cancel)
    router.add_post(prefix + "/retry/{job_id}", retry)
    router.add_post(prefix + "/purge-queue", purge_queue)
    router.add_get(prefix + "/health", health)
    router.add_get(prefix + "/ping", ping)
