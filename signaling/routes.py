"""HTTP side of realtime calls (OpenAI Realtime WebRTC shapes) and the web page.

  POST   /v1/realtime/calls            SDP offer (application/sdp, or multipart `sdp` + `session`)
                                       -> 201, SDP answer, Location: /v1/realtime/calls/{call_id}
  GET    /v1/realtime                  WebSocket: the OpenAI Realtime GA events (signaling.websocket)
  POST   /v1/realtime                  the beta WebRTC path, same behaviour as /v1/realtime/calls
  DELETE /v1/realtime/calls/{call_id}  hang up (also POST .../{call_id}/hangup)
  GET    /v1/realtime/calls/{call_id}  the call's state and audio statistics
  GET    /v1/realtime/config           ICE servers and modes for browser clients
  POST   /v1/realtime/client_secrets   mint an `ek_` secret for a browser (signaling.client_secrets)
  GET    /  and /web/...               the browser client

Session options come from the query string and the multipart `session` field (see
signaling.options). The API key (`Authorization: Bearer KEY`, or on the WebSocket the browser's
`openai-insecure-api-key.KEY` subprotocol) and CORS are the server's one policy, server.access,
which also answers these routes' refusals in OpenAI's error shape.
"""
from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from server import access
from signaling.client_secrets import create_client_secret, secret_options
from signaling.configure import build_conversation
from signaling.datachannel import CHANNEL_LABEL, clamp_sctp_chunks
from signaling.errors import CallError
from signaling.host import RealtimeConfig, RealtimeModels
from signaling.ice import ice_servers_for_browser
from signaling.offers import aiortc_errors, check_offer, parse_offer, read_offer
from signaling.options import OptionsError, from_query
from signaling.registry import CallRegistry
from signaling.protocol import MAX_AUDIO_MESSAGE_BYTES
from signaling.session import PeerCall
from signaling.telephony import install as install_telephony
from signaling.websocket import HEARTBEAT_SECONDS, SUBPROTOCOL, RealtimeSocket

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
CALLS_PATH = "/v1/realtime/calls"
REALTIME_PREFIX = "/v1/realtime"
CALLS = web.AppKey("realtime_calls", CallRegistry)
MODELS = web.AppKey("realtime_models", object)
CONFIG = web.AppKey("realtime_config", RealtimeConfig)


def install(app: web.Application, *, services: RealtimeModels, config: RealtimeConfig) -> None:
    """Add the realtime routes and the web page to `app`. The API key, CORS and last-resort errors
    are the server's one policy (server.access; installed here when the app has none yet), with
    OpenAI's error shape under /v1/realtime."""
    clamp_sctp_chunks()
    app[CALLS] = CallRegistry(config.max_sessions)
    app[MODELS] = services
    app[CONFIG] = config
    access.install(app, api_key=config.api_key, cors_origins=config.cors_origins)
    access.add_error_style(app, REALTIME_PREFIX, access.openai_error, name="realtime")

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
    install_telephony(app, services=services, config=config, registry=app[CALLS])
    r.add_post("/v1/realtime/client_secrets", create_client_secret)
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


# --------------------------------------------------------------------------- handlers
@access.requires_key("realtime")
async def create_call(request: web.Request) -> web.Response:
    registry = request.app[CALLS]
    try:
        sdp, options = await read_offer(request)
        options = secret_options(request).merged(options)  # an ek_ secret's session, then the request's
        check_offer(sdp)  # our clear 400s first (no audio, no Opus, too large), then aiortc's parser
        parse_offer(sdp)
        async with registry.reserve():
            with aiortc_errors():
                call = await PeerCall.start(sdp, services=request.app[MODELS], config=request.app[CONFIG],
                                            registry=registry, options=options)
    except OptionsError as exc:
        return error_response(400, "invalid_value", str(exc), param=exc.param)
    except CallError as exc:
        return error_response(exc.status, exc.code, str(exc), param=exc.param)
    log.info("call %s answered (%d live)", call.id, len(registry.calls))
    return web.Response(status=201, text=call.answer, content_type="application/sdp",
                        headers={"Location": f"{CALLS_PATH}/{call.id}"})


@access.requires_key("realtime")
async def realtime_socket(request: web.Request) -> web.StreamResponse:
    """GET /v1/realtime: a WebSocket session (refusals come as HTTP errors before the upgrade)."""
    if request.headers.get("Upgrade", "").lower() != "websocket":
        return error_response(426, "websocket_required", "GET /v1/realtime opens a WebSocket (Upgrade: websocket); "
                                                         "POST an SDP offer to /v1/realtime/calls for WebRTC")
    registry = request.app[CALLS]
    services, config = request.app[MODELS], request.app[CONFIG]
    try:
        options = secret_options(request).merged(from_query(request.query))
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


@access.requires_key("realtime")
async def hang_up(request: web.Request) -> web.Response:
    call = _find_call(request)
    if isinstance(call, web.Response):
        return call
    await call.close("hangup")
    return web.json_response({"id": call.id, "status": "closed"})


@access.requires_key("realtime")
async def get_call(request: web.Request) -> web.Response:
    call = _find_call(request)
    if isinstance(call, web.Response):
        return call
    return web.json_response({**call.stats(), "session": call.describe()})


@access.requires_key("realtime")
async def get_config(request: web.Request) -> web.Response:
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
