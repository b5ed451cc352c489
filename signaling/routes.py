"""HTTP side of realtime calls (OpenAI Realtime WebRTC shapes) and the web page.

  POST   /v1/realtime/calls            SDP offer (application/sdp, or multipart `sdp` + `session`)
                                       -> 201, SDP answer, Location: /v1/realtime/calls/{call_id}
  GET    /v1/realtime                  WebSocket: the OpenAI Realtime GA events (signaling.websocket)
  POST   /v1/realtime                  the beta WebRTC path, same behaviour as /v1/realtime/calls
  DELETE /v1/realtime/calls/{call_id}  hang up (also POST .../{call_id}/hangup)
  GET    /v1/realtime/calls/{call_id}  the call's state and audio statistics
  GET    /v1/realtime/config           ICE servers and modes for browser clients
  GET    /  and /web/...               the browser client

Session options come from the query string and the multipart `session` field (see
signaling.options). `Authorization: Bearer KEY` is required when a key is configured; CORS
headers and preflights are answered for the /v1/realtime routes from the configured origins.
"""
from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.agent.conversation import TurnDetection
from signaling.datachannel import CHANNEL_LABEL, clamp_sctp_chunks
from signaling.errors import CallError
from signaling.host import RealtimeConfig, RealtimeModels
from signaling.ice import ice_servers_for_browser
from signaling.options import OptionsError, SessionOptions, from_query, from_session
from signaling.registry import CallRegistry
from signaling.configure import build_conversation
from signaling.protocol import MAX_AUDIO_MESSAGE_BYTES
from signaling.session import PeerCall
from signaling.websocket import HEARTBEAT_SECONDS, SUBPROTOCOL, RealtimeSocket, subprotocol_key

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
CALLS_PATH = "/v1/realtime/calls"
CORS_PREFIX = "/v1/realtime"
CALLS = web.AppKey("realtime_calls", CallRegistry)
MODELS = web.AppKey("realtime_models", object)
CONFIG = web.AppKey("realtime_config", RealtimeConfig)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application, *, services: RealtimeModels, config: RealtimeConfig) -> None:
    """Add the realtime routes, the CORS and auth handling for them, and the web page to `app`."""
    clamp_sctp_chunks()
    app[CALLS] = CallRegistry(config.max_sessions)
    app[MODELS] = services
    app[CONFIG] = config
    app.middlewares.append(_cors_middleware(config.cors_origins))

    async def close_calls(app: web.Application) -> None:
        await app[CALLS].close_all()

    app.on_shutdown.append(close_calls)
    r = app.router
    r.add_post(CALLS_PATH, create_call)
    r.add_post("/v1/realtime", create_call)
    r.add_get("/v1/realtime", realtime_socket)
    r.add_get(CALLS_PATH + "/{call_id}", get_call)
    r.add_delete(CALLS_PATH + "/{call_id}", hang_up)
    r.add_post(CALLS_PATH + "/{call_id}/hangup", hang_up)
    r.add_get("/v1/realtime/config", get_config)
    if WEB_DIR.is_dir():
        r.add_get("/", index)
        r.add_static("/web/", WEB_DIR, append_version=False)


# --------------------------------------------------------------------------- errors and auth
def error_response(status: int, code: str, message: str, *, type_: str | None = None,
                   param: str | None = None) -> web.Response:
    kind = type_ or ("server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


def _unauthorized(request: web.Request, *, offered: str | None = None) -> web.Response | None:
    """401 unless the request carries the API key (`offered`: a key sent another way, e.g. as a
    WebSocket subprotocol by a browser)."""
    key = request.app[CONFIG].api_key
    if not key:
        return None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), str(key).encode()):
        return None
    if offered is not None and hmac.compare_digest(offered.encode(), str(key).encode()):
        return None
    return error_response(401, "invalid_api_key", "missing or wrong API key: send Authorization: Bearer KEY")


# --------------------------------------------------------------------------- CORS
def _cors_middleware(origins: tuple[str, ...]):
    """CORS for /v1/realtime only (other routes belong to the server, which has its own policy)."""

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(CORS_PREFIX):
            return await handler(request)
        origin = request.headers.get("Origin")
        allowed = origin is not None and ("*" in origins or origin.rstrip("/") in origins)
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            if not allowed:
                return error_response(403, "cors_origin_not_allowed", f"origin {origin!r} is not allowed")
            response: web.StreamResponse = web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                    "Authorization, Content-Type"),
                "Access-Control-Max-Age": "600"})
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = exc
            if isinstance(response, web.WebSocketResponse):
                return response  # already sent (and browsers send no CORS checks for WebSockets)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = origin  # type: ignore[assignment]
            response.headers["Access-Control-Expose-Headers"] = "Location"
            response.headers["Vary"] = "Origin"
        if isinstance(response, web.HTTPException):
            raise response
        return response

    return cors


# --------------------------------------------------------------------------- handlers
async def _read_offer(request: web.Request) -> tuple[str, SessionOptions]:
    options = from_query(request.query)
    ctype = request.content_type
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.post()
        sdp = form.get("sdp")
        if sdp is None:
            raise CallError(400, "missing_sdp", "multipart offers need an `sdp` field")
        if hasattr(sdp, "file"):
            sdp = sdp.file.read().decode("utf-8", "replace")  # type: ignore[union-attr]
        session = form.get("session")
        if session is not None:
            if hasattr(session, "file"):
                session = session.file.read().decode("utf-8", "replace")  # type: ignore[union-attr]
            try:
                parsed = json.loads(str(session))
            except json.JSONDecodeError as exc:
                raise CallError(400, "invalid_session", f"the `session` field is not JSON: {exc.msg}",
                                param="session") from None
            # Query values are the base; the session object overrides field by field.
            base = options.turn_detection if isinstance(options.turn_detection, TurnDetection) else None
            options = options.merged(from_session(parsed, base))
        return str(sdp), options
    if ctype in ("application/sdp", "text/plain", "application/octet-stream", ""):
        return await request.text(), options
    raise CallError(415, "unsupported_media_type",
                    f"send the SDP offer as application/sdp (or multipart/form-data), not {ctype}")


async def create_call(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    registry = request.app[CALLS]
    try:
        sdp, options = await _read_offer(request)
        async with registry.reserve():
            call = await PeerCall.start(sdp, services=request.app[MODELS], config=request.app[CONFIG],
                                        registry=registry, options=options)
    except OptionsError as exc:
        return error_response(400, "invalid_value", str(exc), param=exc.param)
    except CallError as exc:
        return error_response(exc.status, exc.code, str(exc), param=exc.param)
    log.info("call %s answered (%d live)", call.id, len(registry.calls))
    return web.Response(status=201, text=call.answer, content_type="application/sdp",
                        headers={"Location": f"{CALLS_PATH}/{call.id}"})


async def realtime_socket(request: web.Request) -> web.StreamResponse:
    """GET /v1/realtime: a WebSocket session (refusals come as HTTP errors before the upgrade)."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return error_response(426, "websocket_required", "GET /v1/realtime opens a WebSocket (Upgrade: websocket); "
                                                         "POST an SDP offer to /v1/realtime/calls for WebRTC")
    if (denied := _unauthorized(request, offered=subprotocol_key(request))) is not None:
        return denied
    registry = request.app[CALLS]
    services, config = request.app[MODELS], request.app[CONFIG]
    try:
        options = from_query(request.query)
        async with registry.reserve():
            conversation = await build_conversation(services, config, options)
            ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), heartbeat=HEARTBEAT_SECONDS,
                                       max_msg_size=MAX_AUDIO_MESSAGE_BYTES + 64 * 1024)
            try:
                await ws.prepare(request)
            except BaseException:
                await conversation.close()
                raise
            session = RealtimeSocket(ws, services=services, config=config, registry=registry,
                                     conversation=conversation, options=options)
            registry.add(session)
    except OptionsError as exc:
        return error_response(400, "invalid_value", str(exc), param=exc.param)
    except CallError as exc:
        return error_response(exc.status, exc.code, str(exc), param=exc.param)
    log.info("realtime session %s opened over WebSocket (%d live)", session.id, len(registry.calls))
    await session.run()
    return ws


def _find_call(request: web.Request) -> PeerCall | web.Response:
    call = request.app[CALLS].calls.get(request.match_info["call_id"])
    if call is None:
        return error_response(404, "call_not_found", "no such call (it may have ended already)",
                              param="call_id")
    return call


async def hang_up(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    call = _find_call(request)
    if isinstance(call, web.Response):
        return call
    await call.close("hangup")
    return web.json_response({"id": call.id, "status": "closed"})


async def get_call(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    call = _find_call(request)
    if isinstance(call, web.Response):
        return call
    return web.json_response({**call.stats(), "session": call.describe()})


async def get_config(request: web.Request) -> web.Response:
    if (denied := _unauthorized(request)) is not None:
        return denied
    services, config = request.app[MODELS], request.app[CONFIG]
    modes = [m for m, ok in (("agent", services.llm is not None), ("tts", services.tts is not None)) if ok]
    registry = request.app[CALLS]
    default = config.mode
    return web.json_response({
        "ice_servers": ice_servers_for_browser(list(config.ice_servers)),
        "modes": modes,
        "default_mode": default if default in modes else (modes[0] if modes else None),
        "data_channel": CHANNEL_LABEL,
        "calls": {"active": len(registry.calls), "max": registry.max_calls},
    })


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})
