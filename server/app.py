"""The aiohttp application: every route in one place, lifetimes in cleanup contexts.

    job API (RunPod shapes), at / and under /v2/{endpoint_id}/ (any id):
        POST /run, POST /runsync, GET|POST /status/{id}, GET|POST /stream/{id}, POST /cancel/{id},
        POST /purge-queue, GET /health (no key), GET /ping (no key)
    upstream Fish Speech: POST /v1/tts, GET|POST /v1/health (no key),
        POST /v1/references/add, GET /v1/references/list, DELETE|POST /v1/references/delete,
        POST /v1/references/update
    OpenAI audio: POST /v1/audio/speech, POST /v1/audio/transcriptions, POST /v1/audio/translations,
        GET /v1/audio/voices, GET /v1/models, GET /v1/models/{id}
    realtime (signaling): /v1/realtime/..., phone calls /v1/telephony/..., and the web page at /
    GET /metrics (Prometheus), GET /openapi.json (OpenAPI 3.1, no key), GET /docs (its page, no key)
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

import signaling
from engine.agent.smart_turn import SemanticTurnDetection
from server import api_fish, api_jobs, metrics, openai_audio, openapi
from server.conversations import ConversationStore
from server.http import CONVERSATIONS, JOBS, SERVICES, SETTINGS, body_limit, install_access
from server.jobs.handler import handle_job
from server.jobs import JobManager, JobStore
from server.services import Services, load_services
from server.settings import Settings
from server.voice_owners import VoiceOwners
from signaling.server_tools import load_server_tools

log = logging.getLogger(__name__)


def create_app(settings: Settings, services: Services | None = None) -> web.Application:
    """The server. Without `services`, the models are loaded (off the loop) when the app starts
    and closed when it stops; the app only starts answering once loading has finished or failed."""
    app = web.Application(client_max_size=body_limit(settings))
    install_access(app, settings)  # API key, CORS and the last-resort error handler, for every route
    app[SETTINGS] = settings
    app[SERVICES] = services if services is not None else Services(loading=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    conversations = ConversationStore(settings.data_dir / "conversations.sqlite3", settings.conversation_ttl)
    app[CONVERSATIONS] = conversations
    app[JOBS] = JobManager(
        JobStore(settings.jobs_db),
        lambda job_input, prepared: metrics.observe_job(
            handle_job(job_input, app[SERVICES], settings, conversations, prepared)),
        queue_size=settings.queue_size, concurrency=settings.concurrent_jobs,
        execution_timeout=settings.execution_timeout, result_ttl=settings.result_ttl,
        on_janitor=conversations.purge_expired, webhook_retry_delay=settings.webhook_retry_delay)
    app.cleanup_ctx.append(_services_context(owned=services is None))
    app.cleanup_ctx.append(_jobs_context)

    r = app.router
    api_jobs.add_routes(r)
    api_jobs.add_routes(r, prefix="/v2/{endpoint_id}")
    api_fish.add_routes(r)
    app[api_fish.VOICE_OWNERS] = VoiceOwners(settings.data_dir / "reference_owners.json")  # who added each voice
    openai_audio.add_routes(r)
    metrics.install(app)
    openapi.install(app)
    signaling.install(app, services=app[SERVICES], config=realtime_config(settings))
    return app


def realtime_config(settings: Settings) -> signaling.RealtimeConfig:
    """What realtime sessions read of the server's settings. A bad tools file raises
    ToolsFileError here, at start-up, naming the file and the field."""
    default = signaling.CallLimits()
    limits = signaling.CallLimits(
        liveness_timeout=settings.rtc_liveness_timeout or default.liveness_timeout,
        connect_timeout=settings.rtc_connect_timeout or default.connect_timeout,
        max_call_seconds=settings.rtc_max_call_seconds or default.max_call_seconds)
    return signaling.RealtimeConfig(
        api_key=settings.api_key, cors_origins=tuple(settings.cors_origins), ice_servers=tuple(settings.ice_servers),
        max_sessions=settings.max_sessions, mode=settings.mode, instructions=settings.instructions,
        llm_max_tokens=settings.llm_max_tokens, sampling=settings.realtime_sampling, limits=limits,
        turn_detection=SemanticTurnDetection() if settings.turn_detection == "semantic_vad" else None,
        speculative_replies=settings.speculative_replies,
        model_name=settings.checkpoint, telephony=signaling.TelephonyConfig(
            twilio_auth_token=settings.twilio_auth_token, public_url=settings.telephony_public_url,
            webhook_key=settings.telephony_webhook_key, token_secret=settings.telephony_token_secret,
            liveness_timeout=settings.telephony_liveness_timeout,
            tools=load_server_tools(settings.telephony_tools) if settings.telephony_tools else None),
        observe_latency=lambda latency_ms: metrics.observe_turn_latency(latency_ms, source="realtime"),
        observe_tool_run=metrics.observe_tool_run, observe_speculation=metrics.observe_speculation)


def _services_context(owned: bool):
    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        services = app[SERVICES]
        if owned:
            await load_services(app[SETTINGS], services)
            log.info("models: %s", {k: v["loaded"] for k, v in services.describe().items()})
        elif services.references is None:
            from server.references import ReferenceStore

            settings = app[SETTINGS]
            services.references = ReferenceStore(settings.references_dir, max_bytes=settings.max_reference_bytes)
        yield
        if owned:
            await services.aclose()

    return services_ctx


async def _jobs_context(app: web.Application) -> AsyncIterator[None]:
    jobs = app[JOBS]
    await jobs.start()
    yield
    await jobs.stop()
    jobs.store.close()
    app[CONVERSATIONS].close()
