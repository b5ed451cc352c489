"""POST /v1/realtime/client_secrets: an app's backend mints an `ek_` secret for a browser.

Body (both optional): {"expires_after": {"anchor": "created_at", "seconds": 10..7200},
"session": {...}} -> {"value": "ek_...", "expires_at": <epoch s>, "session": {...}}, OpenAI's GA
shape. The session is checked now (a bad one is a 400 here, not at every call) and applied to every
session the secret opens (signaling.routes `secret_options`). Signing and checking: server.client_secrets.
"""
from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from server import access
from server.bodies import parse_json, read_bytes
from server.schema import RequestError
from server.client_secrets import InvalidSecret, expiry_seconds
from signaling.options import OptionsError, SessionOptions, from_session

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "code": code,
                                        "param": param}}, status=status)


@access.requires_key("realtime")
async def create_client_secret(request: web.Request) -> web.Response:
    try:
        raw = await read_bytes(request)
        body: Any = parse_json(raw) if raw.strip() else {}
    except RequestError as exc:
        return _error(exc.status, "invalid_json", exc.message)
    if not isinstance(body, dict):
        return _error(400, "invalid_value", "the body must be a JSON object")
    try:
        seconds = expiry_seconds(body)
    except ValueError as exc:
        param, message = exc.args
        return _error(400, "invalid_value", f"{param}: {message}", param=param)
    session = body.get("session") or {}
    if not isinstance(session, dict):
        return _error(400, "invalid_value", "session: must be a JSON object", param="session")
    if session.get("type", "realtime") != "realtime":
        return _error(400, "invalid_value", 'session.type: only "realtime" sessions are served', param="session.type")
    try:
        from_session(session)
    except OptionsError as exc:
        return _error(400, "invalid_value", str(exc), param=f"session.{exc.param}")
    policy = request.app[access.ACCESS]
    principal = request[access.PRINCIPAL]
    claims = policy.client_secrets.mint(session, seconds, minted_by=principal.name)
    try:
        value = policy.client_secrets.encode(claims)
    except InvalidSecret as exc:
        return _error(400, exc.code, str(exc), param="session")
    log.info("client secret %s minted by %s, expires at %d", claims.id, principal.name, claims.expires_at)
    return web.json_response({"value": value, "expires_at": claims.expires_at,
                              "session": {"type": "realtime", "object": "realtime.session", **session}})


def secret_options(request: web.Request) -> SessionOptions:
    """The session configuration of the `ek_` secret that opened this request (empty without one).
    It was checked when minted; options from the request itself override it."""
    principal = request.get(access.PRINCIPAL)
    if principal is None or not principal.session:
        return SessionOptions()
    return from_session(principal.session)
