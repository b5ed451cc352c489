"""Who may call, from which origin, how often, and what a refused or failed request looks like:
one key check, one CORS policy, one rate limiter and one last-resort error handler for every route
of the application (the job API, upstream Fish Speech's /v1 routes, /v1/realtime and whatever is
added later).

    install(app, api_key=..., cors_origins=..., keys_file=..., limiter=...)   once per application
    add_error_style(app, "/v1/realtime", openai_error)   the error body a path prefix answers with
    @requires_key()                                  marks a keyed handler (and may name its error style)

Which key a route needs, and its rate-limit group, is server.scopes' table. A caller is the full
API_KEY, a named key of the keys file with scopes (server.keys) or an `ek_` client secret
(server.client_secrets), which opens realtime sessions only; request[PRINCIPAL] says which.
401 for a missing, unknown, forged or expired key; 403 for a key without the route's scope; 429
with Retry-After over a limit. Refusals are counted for /metrics by route and status.

A route picks its error body by the longest registered path prefix (or the style named in
`requires_key`), so a client always gets the error shape of the API it speaks. Every response
carries an `X-Request-Id`; an unexpected exception is logged with it and answered with a 500 in
the route's error shape that names it, never with aiohttp's HTML page or a stack trace.
"""
from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from server import scopes
from server.client_secrets import ClientSecrets, InvalidSecret, signing_secret
from server.keys import KeyRing, Principal
from server.ratelimit import Limited, RateLimiter

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (status, code, message) -> the JSON body of an error response
ErrorStyle = Callable[[int, str, str], dict[str, Any]]
# request[REQUEST_ID]: this request's id, also its X-Request-Id header
REQUEST_ID: Any = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
UNAUTHORIZED = "missing or wrong API key: send Authorization: Bearer <API_KEY>"
PRINCIPAL: Any = web.RequestKey("principal", Principal) if hasattr(web, "RequestKey") else "principal"
# Process-wide like the other metrics; each app's /metrics registry includes it.
REFUSALS = Counter("fishvoice_access_refusals", "Requests refused by the access policy (401, 403, 429) by route",
                   ["route", "status"], registry=None)


def openai_error(status: int, code: str, message: str) -> dict[str, Any]:
    """OpenAI's error body; also the style of routes that registered none."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


@dataclasses.dataclass
class AccessPolicy:
    api_key: str | None
    origins: tuple[str, ...]
    keys: KeyRing = dataclasses.field(default_factory=lambda: KeyRing(None, None))
    client_secrets: ClientSecrets = dataclasses.field(default_factory=lambda: ClientSecrets(signing_secret(None, None)[0]))
    limiter: RateLimiter | None = None
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


def install(app: web.Application, *, api_key: str | None, cors_origins: str | Iterable[str] | None,
            keys: KeyRing | None = None, client_secret_key: str | None = None,
            limiter: RateLimiter | None = None) -> AccessPolicy:
    """Add the access middlewares to `app` (outermost, in front of any others). A second call on the
    same app returns the policy the first one installed. Without `keys`, `api_key` alone is the key;
    without `limiter`, nothing is rate limited."""
    if ACCESS in app:
        return app[ACCESS]
    secret, shared = signing_secret(client_secret_key, api_key or None)
    keys = keys if keys is not None else KeyRing(api_key or None, None)
    if not shared and keys.enabled:
        log.warning("client secrets are signed with a per-process secret: set CLIENT_SECRET_KEY so that "
                    "every replica accepts them")
    policy = AccessPolicy(api_key=api_key or None, origins=_origins(cors_origins), keys=keys,
                          client_secrets=ClientSecrets(secret), limiter=limiter)
    app[ACCESS] = policy
    # Outermost first: the last resort sees everything; preflights pass before the key check, and
    # the key check before the limits (which count per key).
    app.middlewares[0:0] = [_last_resort, _preflight, _auth, _limit]
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


def _bearer(request: web.Request) -> str | None:
    """`Bearer KEY`, or the bare key as RunPod's docs also show it; None when nothing was sent."""
    header = _presented_key(request).strip()
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else header


def _refuse(request: web.Request, route: str, status: int, code: str, message: str,
            headers: dict[str, str] | None = None) -> web.Response:
    REFUSALS.labels(route=route, status=str(status)).inc()
    return request.app[ACCESS].error(request, status, code, message, headers=headers)


def admit(policy: AccessPolicy, request: web.Request, rule: scopes.Rule) -> Principal | tuple[int, str, str]:
    """The caller of a keyed route, or (status, code, message) saying why not."""
    token = _bearer(request)
    if token is not None and token.startswith("ek_"):
        try:
            claims = policy.client_secrets.verify(token)
        except InvalidSecret as exc:
            return 401, exc.code, str(exc)
        if not rule.ephemeral:
            return 403, "client_secret_not_allowed", ("client secrets (ek_) only open realtime sessions "
                                                      "(POST /v1/realtime/calls, the /v1/realtime WebSocket)")
        return Principal(name=claims.minted_by, kind="ephemeral", scopes=frozenset({"realtime"}),
                         session=claims.session, secret_id=claims.id)
    if not policy.keys.enabled:  # an open server: per client address
        return Principal(name=f"ip:{request.remote}", kind="anonymous")
    principal = policy.keys.lookup(token) if token else None
    if principal is None:
        return 401, "invalid_api_key", UNAUTHORIZED
    assert rule.scope is not None
    if not principal.allows(rule.scope):
        return 403, "insufficient_scope", (f"this key ({principal.name.removeprefix('key:')}) lacks the "
                                           f"{rule.scope!r} scope that {request.path} needs")
    return principal


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = scopes.route_name(request)
    if request.method == "OPTIONS" or route is None:
        return await handler(request)
    rule = scopes.rule_for(route)
    if rule.scope is None:
        return await handler(request)
    admitted = admit(request.app[ACCESS], request, rule)
    if isinstance(admitted, tuple):
        status, code, message = admitted
        return _refuse(request, route, status, code, message,
                       headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
    request[PRINCIPAL] = admitted
    return await handler(request)


@web.middleware
async def _limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    limiter = request.app[ACCESS].limiter
    principal = request.get(PRINCIPAL)
    route = scopes.route_name(request)
    group = scopes.rule_for(route).limit if route is not None else None
    if limiter is None or principal is None or group is None:
        return await handler(request)
    try:
        await limiter.hit(group, principal.name)
        with limiter.slot(group, principal.name):
            return await handler(request)
    except Limited as exc:
        assert route is not None
        return _refuse(request, route, 429, "rate_limit_exceeded", f"{exc}; retry after {exc.retry_after} s",
                       headers={"Retry-After": str(exc.retry_after)})


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
