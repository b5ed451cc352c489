"""Small HTTP helpers shared by the route modules: typed app keys, bodies, errors, auth, CORS."""
from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from aiohttp import web

from server.conversations import ConversationStore
from server.jobs import JobManager
from server.schema import RequestError, job_error_body
from server.services import Services
from server.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
SERVICES = web.AppKey("services", Services)
JOBS = web.AppKey("jobs", JobManager)
CONVERSATIONS = web.AppKey("conversations", ConversationStore)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REALTIME_PREFIX = "/v1/realtime"  # signaling answers its own auth and CORS there


# --------------------------------------------------------------------------- errors
def job_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The job API's error: {"error", "output": {"status": "error", "error"}}."""
    return web.json_response(job_error_body(message), status=status, headers=headers)


def fish_error(status: int, message: str) -> web.Response:
    """Upstream Fish Speech's error shape for the /v1 routes."""
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return web.json_response({"statusCode": status, "error": phrase, "message": message}, status=status)


# --------------------------------------------------------------------------- bodies
def body_limit(settings: Settings) -> int:
    """Largest request body: room for two base64 audio fields at the reference limit, plus JSON."""
    return 4 * settings.max_reference_bytes + 2 * 1024 * 1024


async def read_bytes(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        limit = body_limit(request.app[SETTINGS])
        raise RequestError(413, f"the request body is larger than the {limit} byte limit") from exc


async def read_json(request: web.Request) -> Any:
    raw = await read_bytes(request)
    if not raw.strip():
        raise RequestError(400, "the request body is empty; send JSON")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None


async def read_structured(request: web.Request, *, allow_form: bool = False) -> dict[str, Any]:
    """A JSON, msgpack (or, where allowed, multipart form) body as a dict."""
    ctype = request.content_type
    if ctype in ("application/msgpack", "application/x-msgpack"):
        raw = await read_bytes(request)
        try:
            body = msgpack.unpackb(raw, raw=False)
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
            raise RequestError(400, f"the request body is not valid msgpack: {exc}") from None
    elif allow_form and ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge as exc:
            raise RequestError(413, "the request body is too large") from exc
        body = {k: (v.file.read() if hasattr(v, "file") else v) for k, v in form.items()}
        body["_filenames"] = {k: v.filename for k, v in form.items() if hasattr(v, "filename")}
    elif ctype in ("application/json", "text/json", "", "application/octet-stream", "text/plain"):
        body = await read_json(request)
    else:
        allowed = "application/json or application/msgpack" + (" or multipart/form-data" if allow_form else "")
        raise RequestError(415, f"unsupported Content-Type {ctype!r}; send {allowed}")
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be an object, got {type(body).__name__}")
    return body


# --------------------------------------------------------------------------- auth
def requires_key(style: str | Callable[[int, str], web.Response]) -> Callable[[Handler], Handler]:
    """Mark a handler as protected by API_KEY; `style` picks the error body ("job", "fish", or a
    function (status, message) -> response for a route family with its own shape)."""

    def mark(handler: Handler) -> Handler:
        handler.requires_key = style  # type: ignore[attr-defined]
        return handler

    return mark


def key_matches(request: web.Request, key: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # RunPod's docs also show the bare key in the header.
    token = token.strip() if scheme.lower() == "bearer" else header.strip()
    return hmac.compare_digest(token.encode(), key.encode())


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    style = getattr(request.match_info.handler, "requires_key", None)
    key = request.app[SETTINGS].api_key
    if style and key and request.method != "OPTIONS" and not key_matches(request, key):
        message = "unauthorized: missing or wrong API key (send Authorization: Bearer <API_KEY>)"
        if callable(style):
            response = style(401, message)
        else:
            response = job_error(401, message) if style == "job" else fish_error(401, message)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    return await handler(request)


def _origin_allowed(request: web.Request, origins: tuple[str, ...]) -> bool:
    origin = request.headers.get("Origin")
    return origin is not None and ("*" in origins or origin.rstrip("/") in origins)


def install_cors(app: web.Application, origins: list[str]) -> None:
    """CORS for the server's routes (the realtime routes have their own): preflights answered by a
    middleware, the allow-origin header added to every response before its headers go out."""
    allowed = tuple(o.rstrip("/") for o in origins)
    if not allowed:
        return

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method != "OPTIONS" or not request.headers.get("Access-Control-Request-Method")
                or request.path.startswith(REALTIME_PREFIX)):
            return await handler(request)
        if not _origin_allowed(request, allowed):
            return job_error(403, f"origin {request.headers.get('Origin')!r} is not allowed")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                "Authorization, Content-Type"),
            "Access-Control-Max-Age": "600"})

    async def allow_origin(request: web.Request, response: web.StreamResponse) -> None:
        if not request.path.startswith(REALTIME_PREFIX) and _origin_allowed(request, allowed):
            response.headers["Access-Control-Allow-Origin"] = request.headers["Origin"]
            response.headers["Vary"] = "Origin"

    app.middlewares.insert(0, preflight)  # before auth: preflights carry no credentials
    app.on_response_prepare.append(allow_origin)
