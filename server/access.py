"""Who may call, from which origin, and what a refused or failed request looks like: one API-key
check, one CORS policy and one last-resort error handler for every route of the application (the
job API, upstream Fish Speech's /v1 routes, /v1/realtime and whatever is added later).

    install(app, api_key=..., cors_origins=...)     once per application (later calls reuse it)
    add_error_style(app, "/v1/realtime", openai_error)   the error body a path prefix answers with
    @requires_key()                                  a handler that needs the API key

A route picks its error body by the longest registered path prefix (or the style named in
`requires_key`), so a client always gets the error shape of the API it speaks. Every response
carries an `X-Request-Id`; an unexpected exception is logged with it and answered with a 500 in
the route's error shape that names it, never with aiohttp's HTML page or a stack trace.
"""
from __future__ import annotations

import dataclasses
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (status, code, message) -> the JSON body of an error response
ErrorStyle = Callable[[int, str, str], dict[str, Any]]
# request[REQUEST_ID]: this request's id, also its X-Request-Id header
REQUEST_ID: Any = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
UNAUTHORIZED = "missing or wrong API key: send Authorization: Bearer <API_KEY>"


def openai_error(status: int, code: str, message: str) -> dict[str, Any]:
    """OpenAI's error body; also the style of routes that registered none."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


@dataclasses.dataclass
class AccessPolicy:
    api_key: str | None
    origins: tuple[str, ...]
    prefixes: dict[str, ErrorStyle] = dataclasses.field(default_factory=lambda: {"": openai_error})
    named: dict[str, ErrorStyle] = dataclasses.field(default_factory=dict)

    def style_for(self, request: web.Request) -> ErrorStyle:
        marker = _marker(request)
        if isinstance(marker, str) and marker in self.named:
            return self.named[marker]
        path = request.path
        best = max((p for p in self.prefixes if p == "" or path == p or path.startswith(p + "/")), key=len)
        return self.prefixes[best]

    def error(self, request: web.Request, status: int, code: str, message: str, *,
              headers: dict[str, str] | None = None, with_request_id: bool = False) -> web.Response:
        body = self.style_for(request)(status, code, message)
        if with_request_id:
            body["request_id"] = request.get(REQUEST_ID)
        return web.json_response(body, status=status, headers=headers)

    def origin_allowed(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.origins or origin.rstrip("/") in self.origins)

    def key_matches(self, header: str) -> bool:
        """`Bearer KEY`, or the bare key as RunPod's docs also show it."""
        assert self.api_key is not None
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else header.strip()
        # Header values (and a key from the environment) may hold undecodable bytes as surrogates.
        return hmac.compare_digest(token.encode("utf-8", "surrogatepass"),
                                   self.api_key.encode("utf-8", "surrogatepass"))


ACCESS = web.AppKey("access", AccessPolicy)


def _marker(request: web.Request) -> Any:
    match_info = request.match_info
    return getattr(getattr(match_info, "handler", None), "requires_key", None)


def requires_key(style: str | None = None) -> Callable[[Handler], Handler]:
    """Mark a handler as protected by the API key; `style` names an error style registered with
    `add_error_style(..., name=...)` when the path prefix alone does not pick the right one."""

    def mark(handler: Handler) -> Handler:
        handler.requires_key = style or True  # type: ignore[attr-defined]
        return handler

    return mark


def _origins(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(o.strip().rstrip("/") for o in value if o and o.strip())


def install(app: web.Application, *, api_key: str | None, cors_origins: str | Iterable[str] | None) -> AccessPolicy:
    """Add the access middlewares to `app` (outermost, in front of any others). A second call on the
    same app returns the policy the first one installed."""
    if ACCESS in app:
        return app[ACCESS]
    policy = AccessPolicy(api_key=api_key or None, origins=_origins(cors_origins))
    app[ACCESS] = policy
    # Outermost first: the last resort sees everything; preflights pass before the key check.
    app.middlewares[0:0] = [_last_resort, _preflight, _auth]
    app.on_response_prepare.append(_response_headers)
    return policy


def add_error_style(app: web.Application, prefix: str, style: ErrorStyle, *, name: str | None = None) -> None:
    """Routes under `prefix` (and, with `name`, handlers marked `requires_key(name)`) answer errors in `style`."""
    policy = app[ACCESS]
    policy.prefixes[prefix.rstrip("/") if prefix != "/" else ""] = style
    if name:
        policy.named[name] = style


def error_response(request: web.Request, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An error in the style of the route `request` is for."""
    return request.app[ACCESS].error(request, status, code, message, headers=headers)


# --------------------------------------------------------------------------- middlewares
@web.middleware
async def _last_resort(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID] = uuid.uuid4().hex
    policy = request.app[ACCESS]
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        # aiohttp's own plain-text pages (no route, wrong method, body too large): our JSON shape.
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return policy.error(request, exc.status, _code(exc.status), _http_message(request, exc), headers=headers)
    except Exception:  # noqa: BLE001 - the point of a last resort
        rid = request[REQUEST_ID]
        log.exception("request %s (%s %s) failed", rid, request.method, request.path)
        return policy.error(request, 500, "internal_error",
                            f"internal server error; quote request id {rid} when reporting it",
                            with_request_id=True)


def _code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no route for {request.method} {request.path}"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path}; allowed: {exc.headers.get('Allow', '')}"
    text = exc.text or exc.reason
    return text.split(": ", 1)[1] if text.startswith(f"{exc.status}: ") else text


@web.middleware
async def _preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method != "OPTIONS" or not request.headers.get("Access-Control-Request-Method"):
        return await handler(request)
    policy = request.app[ACCESS]
    origin = request.headers.get("Origin")
    if not policy.origin_allowed(origin):
        return policy.error(request, 403, "cors_origin_not_allowed", f"origin {origin!r} is not allowed")
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                            "Authorization, Content-Type"),
        "Access-Control-Max-Age": "600"})


KEY_SUBPROTOCOL = "openai-insecure-api-key."  # how browsers pass a key when opening a WebSocket


def subprotocol_key(request: web.Request) -> str | None:
    """The key offered as an `openai-insecure-api-key.<KEY>` WebSocket subprotocol, if any."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    for proto in (p.strip() for p in offered.split(",")):
        if proto.startswith(KEY_SUBPROTOCOL):
            return proto[len(KEY_SUBPROTOCOL):]
    return None


def _presented_key(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if not header and (key := subprotocol_key(request)) is not None:
        return "Bearer " + key
    return header


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    policy = request.app[ACCESS]
    if (policy.api_key and request.method != "OPTIONS" and _marker(request)
            and not policy.key_matches(_presented_key(request))):
        return policy.error(request, 401, "invalid_api_key", UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def _response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, streamed ones and aiohttp's own included."""
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]
    policy = request.app.get(ACCESS)
    origin = request.headers.get("Origin")
    if policy is not None and policy.origin_allowed(origin):
        response.headers["Access-Control-Allow-Origin"] = origin  # type: ignore[assignment]
        response.headers["Access-Control-Expose-Headers"] = "Location, X-Request-Id"
        response.headers["Vary"] = "Origin"
