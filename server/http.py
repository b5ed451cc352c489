"""Small HTTP helpers shared by the route modules: typed app keys, error shapes, the body limit and
the access policy's set-up. Bodies are read by server.bodies; auth and CORS live in server.access."""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

from aiohttp import web

from server import access
from server.access import requires_key
from server.bodies import read_bytes, read_json, read_structured
from server.conversations import ConversationStore
from server.jobs import JobManager
from server.keys import KeyRing
from server.ratelimit import RateLimiter
from server.schema import job_error_body
from server.services import Services
from server.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
SERVICES = web.AppKey("services", Services)
JOBS = web.AppKey("jobs", JobManager)
CONVERSATIONS = web.AppKey("conversations", ConversationStore)

__all__ = ["CONVERSATIONS", "JOBS", "SERVICES", "SETTINGS", "body_limit", "fish_error", "install_access", "job_error",
           "read_bytes", "read_json", "read_structured", "requires_key"]


# --------------------------------------------------------------------------- errors
def job_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The job API's error: {"error", "output": {"status": "error", "error"}}."""
    return web.json_response(job_error_body(message), status=status, headers=headers)


def fish_error(status: int, message: str) -> web.Response:
    """Upstream Fish Speech's error shape for the /v1 routes."""
    return web.json_response(fish_error_style(status, "", message), status=status)


# --------------------------------------------------------------------------- error styles
def job_error_style(status: int, code: str, message: str) -> dict[str, Any]:
    return job_error_body(message)


def fish_error_style(status: int, code: str, message: str) -> dict[str, Any]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return {"statusCode": status, "error": phrase, "message": message}


def body_limit(settings: Settings) -> int:
    """Largest request body: room for two base64 audio fields at the reference limit, plus JSON."""
    return 4 * settings.max_reference_bytes + 2 * 1024 * 1024


def install_access(app: web.Application, settings: Settings) -> None:
    """Keys, rate limits, CORS and last-resort error handling for every route (see server.access): the
    job API's error shape at / and /v2, upstream Fish Speech's under /v1."""
    limiter = None
    if settings.rate_limits_enabled:
        limiter = RateLimiter(settings.rate_limit_storage, settings.rate_limits, settings.concurrency_limits)
    access.install(app, api_key=settings.api_key, cors_origins=settings.cors_origins,
                   keys=KeyRing(settings.api_key, settings.keys_file), client_secret_key=settings.client_secret_key,
                   limiter=limiter)
    access.add_error_style(app, "", job_error_style, name="job")
    access.add_error_style(app, "/v1", fish_error_style, name="fish")
    for prefix in ("/v1/audio", "/v1/models"):  # OpenAI's audio API answers in OpenAI's shape
        access.add_error_style(app, prefix, access.openai_error)
