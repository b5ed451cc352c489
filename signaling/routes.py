"""HTTP side of realtime calls (OpenAI Realtime WebRTC shapes) and the web page.

  POST   /v1/realtime/calls            SDP offer (application/sdp, or multipart `sdp` + `session`)
                                       -> 201, SDP answer, Location: /v1/realtime/calls/{call_id}
  POST   /v1/realtime                  the beta path, same behaviour
  DELETE /v1/realtime/calls/{call_id}  hang up (also POST .../{call_id}/hangup)
  GET    /v1/realtime/calls/{call_id}  the call's state and audio statistics
  GET    /v1/realtime/config           ICE servers and modes for browser clients
  GET    /  and /web/...               the browser client

Session options come from the query string and the multipart `session` field (see
signaling.options). The API key (`Authorization: Bearer KEY`) and CORS are the server's one
policy, server.access, which also answers these routes' refusals in OpenAI's error shape.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from server import access
from signaling import events as ev
from signaling.errors import CallError
from signaling.ice import ice_servers_for_browser
from signaling.offers import aiortc_errors, parse_offer, read_offer
from signaling.options import OptionsError
from signaling.session import CallLimits, CallRegistry, PeerCall, check_offer

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
CALLS_PATH = "/v1/realtime/calls"
REALTIME_PREFIX = "/v1/realtime"
DEFAULT_MAX_SESSIONS = 8
CALLS = web.AppKey("realtime_calls", CallRegistry)
CONTEXT = web.AppKey("realtime_context", dict)


def install(app: web.Application, *, services: Any, settings: Any) -> None:
    """Add the realtime routes and the web page to `app`. The API key, CORS and last-resort errors
    are the server's one policy (server.access; installed here when the app has none yet), with
    OpenAI's error shape under /v1/realtime.

    `services` holds the loaded models (tts, asr, vad, llm; any may be None), `settings` the
    configuration (api_key, cors_origins, ice_servers, max_sessions, mode, and optional
    rtc_liveness_timeout / rtc_connect_timeout / rtc_max_call_seconds in seconds).
    """
    ev.clamp_sctp_chunks()
    max_sessions = int(getattr(settings, "max_sessions", None) or DEFAULT_MAX_SESSIONS)
    app[CALLS] = CallRegistry(max_sessions)
    app[CONTEXT] = {"services": services, "settings": settings, "limits": _limits(settings)}
    access.install(app, api_key=getattr(settings, "api_key", None),
                   cors_origins=getattr(settings, "cors_origins", None))
    access.add_error_style(app, REALTIME_PREFIX, access.openai_error, name="realtime")

    async def close_calls(app: web.Application) -> None:
        await app[CALLS].close_all()

    app.on_shutdown.append(close_calls)
    r = app.router
    r.add_post(CALLS_PATH, create_call)
    r.add_post("/v1/realtime", create_call)
    r.add_get(CALLS_PATH + "/{call_id}", get_call)
    r.add_delete(CALLS_PATH + "/{call_id}", hang_up)
    r.add_post(CALLS_PATH + "/{call_id}/hangup", hang_up)
    r.add_get("/v1/realtime/config", get_config)
    if WEB_DIR.is_dir():
        r.add_get("/", index)
        r.add_static("/web/", WEB_DIR, append_version=False)


def _limits(settings: Any) -> CallLimits:
    base = CallLimits()
    return CallLimits(
        liveness_timeout=float(getattr(settings, "rtc_liveness_timeout", None) or base.liveness_timeout),
        connect_timeout=float(getattr(settings, "rtc_connect_timeout", None) or base.connect_timeout),
        max_call_seconds=getattr(settings, "rtc_max_call_seconds", None) or base.max_call_seconds,
    )


# --------------------------------------------------------------------------- errors
def error_response(status: int, code: str, message: str, *, type_: str | None = None,
                   param: str | None = None) -> web.Response:
    kind = type_ or ("server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


# --------------------------------------------------------------------------- handlers
@access.requires_key("realtime")
async def create_call(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    registry = request.app[CALLS]
    try:
        sdp, options = await read_offer(request)
        check_offer(sdp)  # our clear 400s first (no audio, no Opus, too large), then aiortc's parser
        parse_offer(sdp)
        async with registry.reserve():
            with aiortc_errors():
                call = await PeerCall.start(sdp, services=ctx["services"], settings=ctx["settings"],
                                            registry=registry, options=options, limits=ctx["limits"])
    except OptionsError as exc:
        return error_response(400, "invalid_value", str(exc), param=exc.param)
    except CallError as exc:
        return error_response(exc.status, exc.code, str(exc), param=exc.param)
    log.info("call %s answered (%d live)", call.id, len(registry.calls))
    return web.Response(status=201, text=call.answer, content_type="application/sdp",
                        headers={"Location": f"{CALLS_PATH}/{call.id}"})


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
    ctx = request.app[CONTEXT]
    services, settings = ctx["services"], ctx["settings"]
    modes = [m for m, ok in (("agent", getattr(services, "llm", None) is not None),
                             ("tts", getattr(services, "tts", None) is not None)) if ok]
    registry = request.app[CALLS]
    default = getattr(settings, "mode", None) or "agent"
    return web.json_response({
        "ice_servers": ice_servers_for_browser(getattr(settings, "ice_servers", None)),
        "modes": modes,
        "default_mode": default if default in modes else (modes[0] if modes else None),
        "data_channel": ev.CHANNEL_LABEL,
        "calls": {"active": len(registry.calls), "max": registry.max_calls},
    })


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})
