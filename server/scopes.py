"""Every route's scope and rate-limit group, in one place.

A route is named by its canonical path (the job API's /v2/{endpoint_id} prefix removed). `scope`
None means public (no key, never limited). `ANY` is any valid key. `ephemeral` routes also accept
an `ek_` client secret: only the ones that open a realtime session. tests/test_access_scopes.py
walks the router and fails when a route is missing here.
"""
from __future__ import annotations

import dataclasses

from aiohttp import web

SCOPES = ("realtime", "tts", "asr", "jobs", "references", "admin")
ANY = "any"  # any valid key, whatever its scopes


@dataclasses.dataclass(frozen=True)
class Rule:
    scope: str | None  # None: public
    limit: str | None  # the rate-limit group (server.ratelimit.DEFAULT_LIMITS); None: never limited
    ephemeral: bool = False  # an ek_ client secret may call it


PUBLIC = Rule(None, None)
SESSION_OPEN = Rule("realtime", "realtime-session", ephemeral=True)

ROUTES: dict[str, Rule] = {
    # job API (RunPod), also under /v2/{endpoint_id}
    "/run": Rule("jobs", "run"),
    "/runsync": Rule("jobs", "runsync"),
    "/status/{job_id}": Rule("jobs", "status"),
    "/stream/{job_id}": Rule("jobs", "status"),
    "/cancel/{job_id}": Rule("jobs", "cancel"),
    "/retry/{job_id}": Rule("jobs", "cancel"),
    "/purge-queue": Rule("admin", "purge-queue"),
    "/health": PUBLIC,
    "/ping": PUBLIC,
    # upstream Fish Speech
    "/v1/tts": Rule("tts", "tts"),
    "/v1/health": PUBLIC,
    "/v1/references/add": Rule("references", "references"),
    "/v1/references/update": Rule("references", "references"),
    "/v1/references/delete": Rule("references", "references"),
    "/v1/references/list": Rule("references", "read"),
    # OpenAI audio
    "/v1/audio/speech": Rule("tts", "tts"),
    "/v1/audio/voices": Rule("tts", "read"),
    "/v1/audio/transcriptions": Rule("asr", "asr"),
    "/v1/audio/translations": Rule("asr", "asr"),
    "/v1/models": Rule(ANY, "read"),
    "/v1/models/{model_id}": Rule(ANY, "read"),
    # realtime
    "/v1/realtime": SESSION_OPEN,  # POST: WebRTC (beta path); GET: the WebSocket
    "/v1/realtime/calls": SESSION_OPEN,
    "/v1/realtime/calls/{call_id}": Rule("realtime", "read"),
    "/v1/realtime/calls/{call_id}/hangup": Rule("realtime", "read"),
    "/v1/realtime/config": Rule("realtime", "read"),
    "/v1/realtime/client_secrets": Rule("realtime", "client-secrets"),
    # operations and the web page
    "/metrics": Rule("admin", "read"),
    "/openapi.json": PUBLIC,
    "/docs": PUBLIC,
    "/": PUBLIC,
    "/web": PUBLIC,
}
# A route that is not in the table: a key with every scope, so a forgotten entry fails closed.
UNLISTED = Rule("admin", "read")
JOB_PREFIX = "/v2/{endpoint_id}"


def route_name(request: web.Request) -> str | None:
    """The matched route's canonical path, or None when no route matched (404, 405)."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    return resource.canonical


def _table_path(canonical: str) -> str:
    return canonical[len(JOB_PREFIX):] if canonical.startswith(JOB_PREFIX + "/") else canonical


def rule_for(canonical: str) -> Rule:
    return ROUTES.get(_table_path(canonical), UNLISTED)


def listed(canonical: str) -> bool:
    return _table_path(canonical) in ROUTES
