"""HTTP side of phone calls.

  POST /v1/telephony/twilio/voice   Twilio's voice webhook -> TwiML <Connect><Stream> (signed when
                                    TWILIO_AUTH_TOKEN is set)
  POST /v1/telephony/telnyx/voice   Telnyx TeXML webhook -> the same, with bidirectional RTP
  POST /v1/telephony/plivo/voice    Plivo answer URL -> <Stream bidirectional="true">
  GET  /v1/telephony/stream         the media-stream WebSocket (any of the three dialects, detected
                                    from the first messages); also /v1/telephony/{carrier}/stream

Session options (mode, voice, instructions, and the other flat names of signaling.options) come
from the webhook URL's query string and travel to the stream as stream parameters, beside a
short-lived single-use token that admits exactly that call. With a tools file (TELEPHONY_TOOLS)
the server runs the model's tool calls itself (signaling.tool_executor); `tools=a,b` and
`tool_choice=auto|none|required|<name>` narrow them for one call (a query option, or a TwiML
<Parameter> of the stream).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Mapping
from xml.etree import ElementTree

from aiohttp import WSMsgType, web
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, VoiceResponse
from yarl import URL

from engine.agent.tools import ToolConfigError
from signaling.configure import build_conversation
from signaling.errors import CallError
from signaling.host import RealtimeConfig, RealtimeModels
from signaling.options import OptionsError, SessionOptions, from_query
from signaling.registry import CallRegistry
from signaling.server_tools import ServerTools
from signaling.telephony.bridge import PhoneCall
from signaling.telephony.messages import Dialect, MessageError, Start
from signaling.telephony.plivo import PlivoDialect
from signaling.telephony.telnyx import TelnyxDialect
from signaling.telephony.tokens import StreamTokens, TokenError
from signaling.telephony.twilio import TwilioDialect

log = logging.getLogger(__name__)

PREFIX = "/v1/telephony"
STREAM_PATH = PREFIX + "/stream"
TOKEN_PARAM = "token"
TOOLS_PARAM, CHOICE_PARAM = "tools", "tool_choice"
DIALECTS: tuple[Dialect, ...] = (TwilioDialect(), TelnyxDialect(), PlivoDialect())
START_MESSAGES = 4  # messages a stream may send before its start (Twilio and Telnyx send `connected`)
START_TIMEOUT = 10.0
MAX_MESSAGE_BYTES = 256 * 1024
TOKENS = web.AppKey("telephony_tokens", StreamTokens)
CALLS = web.AppKey("telephony_calls", CallRegistry)
MODELS = web.AppKey("telephony_models", object)
CONFIG = web.AppKey("telephony_config", RealtimeConfig)


def install(app: web.Application, *, services: RealtimeModels, config: RealtimeConfig,
            registry: CallRegistry) -> None:
    """Add the telephony routes; calls count in `registry`, the cap shared by every realtime transport."""
    telephony = config.telephony
    app[TOKENS] = StreamTokens(telephony.token_secret, telephony.token_ttl)
    app[CALLS] = registry
    app[MODELS] = services
    app[CONFIG] = config
    if not telephony.twilio_auth_token:
        log.info("TWILIO_AUTH_TOKEN is not set: Twilio voice webhooks are not signature-checked")
    r = app.router
    r.add_post(PREFIX + "/twilio/voice", twilio_voice)
    r.add_post(PREFIX + "/telnyx/voice", telnyx_voice)
    r.add_post(PREFIX + "/plivo/voice", plivo_voice)
    r.add_get(STREAM_PATH, media_stream)
    r.add_get(PREFIX + "/{carrier:twilio|telnyx|plivo}/stream", media_stream)


# --------------------------------------------------------------------------- webhooks
def _refuse(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def _public_url(request: web.Request) -> URL:
    """The URL the carrier requested (behind a TLS proxy: the configured public base URL)."""
    base = request.app[CONFIG].telephony.public_url
    if not base:
        return request.url
    return URL(base.rstrip("/") + request.path_qs)


def _stream_url(request: web.Request, query: Mapping[str, str] | None = None) -> str:
    public = _public_url(request)
    scheme = "wss" if public.scheme in ("https", "wss") else "ws"
    url = public.with_scheme(scheme).with_path(STREAM_PATH).with_query(None)
    return str(url.with_query(query) if query else url)


def _options(request: web.Request) -> dict[str, str]:
    """The webhook URL's session options, checked now (a bad one is the operator's mistake: 400)."""
    options = {k: v for k, v in request.query.items() if k not in ("key", TOKEN_PARAM)}
    from_query(options)  # raises OptionsError
    _call_tools(request.app[CONFIG], options)  # raises ToolConfigError
    return options


def _call_tools(config: RealtimeConfig, params: Mapping[str, str]) -> ServerTools | None:
    """The tools the server runs for this call: the tools file's, narrowed by the call's own
    `tools` (names, comma-separated) and `tool_choice` parameters."""
    tools = config.telephony.tools
    names = [name.strip() for name in params.get(TOOLS_PARAM, "").split(",") if name.strip()]
    choice = params.get(CHOICE_PARAM, "").strip() or None
    if tools is None:
        if names or choice:
            raise ToolConfigError(TOOLS_PARAM if names else CHOICE_PARAM,
                                  "this server has no phone-call tools (set TELEPHONY_TOOLS to a tools file)")
        return None
    if not names and choice is None:
        return tools
    return tools.narrowed(names or [w.tool.name for w in tools.webhooks], choice)


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return {k: str(v) for k, v in (await request.post()).items()}
    return {}


async def twilio_voice(request: web.Request) -> web.Response:
    """Answer an incoming Twilio call with TwiML that connects it to our media stream."""
    form = await _form(request)
    token_secret = request.app[CONFIG].telephony.twilio_auth_token
    if token_secret:
        signature = request.headers.get("X-Twilio-Signature", "")
        if not RequestValidator(token_secret).validate(str(_public_url(request)), form, signature):
            log.warning("Twilio webhook with a bad or missing X-Twilio-Signature refused")
            return _refuse(403, "invalid X-Twilio-Signature")
    admitted = _admit(request, form.get("CallSid"))
    if isinstance(admitted, web.Response):
        return admitted
    options, token = admitted
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=_stream_url(request))  # Twilio allows no query string here
    for name, value in options.items():
        stream.parameter(name=name, value=value)
    stream.parameter(name=TOKEN_PARAM, value=token)
    response.append(connect)
    return web.Response(text=str(response), content_type="application/xml")


def _admit(request: web.Request, call_sid: str | None) -> tuple[dict[str, str], str] | web.Response:
    """The call's session options and a single-use stream token, or why the call is refused."""
    try:
        options = _options(request)
    except (OptionsError, ToolConfigError) as exc:
        return _refuse(400, str(exc))
    if (busy := _not_ready(request)) is not None:
        return busy
    return options, request.app[TOKENS].issue(call_sid)


def _not_ready(request: web.Request) -> web.Response | None:
    """A call the server cannot take now is refused at the webhook (the carrier plays its error)."""
    services = request.app[MODELS]
    if services.asr is None or services.vad is None:
        return _refuse(503, "the speech models are still loading" if services.loading
                       else "phone calls need the ASR and VAD models, which are not loaded")
    registry = request.app[CALLS]
    if registry.active >= registry.max_calls:
        return _refuse(503, f"the server is at its limit of {registry.max_calls} concurrent calls")
    return None


def _webhook_key_ok(request: web.Request) -> bool:
    key = request.app[CONFIG].telephony.webhook_key
    return not key or hmac.compare_digest(request.query.get("key", "").encode(), key.encode())


async def telnyx_voice(request: web.Request) -> web.Response:
    """Telnyx TeXML: the same <Connect><Stream>, bidirectional RTP in PCMU, token in the URL."""
    if not _webhook_key_ok(request):
        return _refuse(403, "missing or wrong webhook key")
    admitted = _admit(request, None)
    if isinstance(admitted, web.Response):
        return admitted
    options, token = admitted
    response = VoiceResponse()
    connect = Connect()
    connect.stream(url=_stream_url(request, {**options, TOKEN_PARAM: token}), bidirectional_mode="rtp",
                   bidirectional_codec="PCMU")
    response.append(connect)
    return web.Response(text=str(response), content_type="application/xml")


async def plivo_voice(request: web.Request) -> web.Response:
    """Plivo answer XML: a bidirectional μ-law stream that keeps the call until it ends."""
    if not _webhook_key_ok(request):
        return _refuse(403, "missing or wrong webhook key")
    admitted = _admit(request, None)
    if isinstance(admitted, web.Response):
        return admitted
    options, token = admitted
    root = ElementTree.Element("Response")
    stream = ElementTree.SubElement(root, "Stream", bidirectional="true", keepCallAlive="true",
                                    contentType="audio/x-mulaw;rate=8000")
    stream.text = _stream_url(request, {**options, TOKEN_PARAM: token})
    body = '<?xml version="1.0" encoding="UTF-8"?>' + ElementTree.tostring(root, encoding="unicode")
    return web.Response(text=body, content_type="application/xml")


# --------------------------------------------------------------------------- the media stream
async def _read_start(ws: web.WebSocketResponse) -> tuple[Dialect, Start]:
    """Skip `connected`, detect the dialect from the start message, parse it."""
    for _ in range(START_MESSAGES):
        message = await ws.receive(timeout=START_TIMEOUT)
        if message.type != WSMsgType.TEXT:
            raise MessageError("the stream closed before its start message")
        try:
            data = json.loads(message.data)
        except ValueError:
            raise MessageError("a message before the start is not JSON") from None
        if not isinstance(data, dict):
            raise MessageError("a message before the start is not a JSON object")
        for dialect in DIALECTS:
            if dialect.is_start(data):
                start = dialect.parse(data)
                assert isinstance(start, Start)
                return dialect, start
        if data.get("event") != "connected":
            raise MessageError(f"expected a start message, got event {data.get('event')!r}")
    raise MessageError(f"no start message in the first {START_MESSAGES} messages")


async def media_stream(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, autoping=True)
    await ws.prepare(request)
    config: RealtimeConfig = request.app[CONFIG]
    try:
        dialect, start = await _read_start(ws)
    except (MessageError, asyncio.TimeoutError) as exc:
        log.warning("telephony stream refused: %s", exc)
        await ws.close(code=1008, message=b"expected a carrier start message")
        return ws
    token = start.parameters.get(TOKEN_PARAM) or request.query.get(TOKEN_PARAM)
    try:
        request.app[TOKENS].redeem(token, start.call_id if dialect.name == "twilio" else None)
    except TokenError as exc:
        log.warning("%s stream for call %s refused: %s", dialect.name, start.call_id, exc)
        await ws.close(code=1008, message=b"stream not admitted")
        return ws
    # Session options: the webhook's query string, carried in the stream URL or the stream parameters.
    params = {**{k: v for k, v in request.query.items() if k != "key"}, **start.parameters}
    registry = request.app[CALLS]
    try:
        options: SessionOptions = from_query({k: v for k, v in params.items() if k != TOKEN_PARAM})
        tools = _call_tools(config, params)
        async with registry.reserve():
            conversation = await build_conversation(request.app[MODELS], config, options)
            if tools is not None:
                conversation.update(tools=tools.tools, tool_choice=tools.tool_choice)
            call = PhoneCall(ws=ws, dialect=dialect, start=start, conversation=conversation, registry=registry,
                             telephony=config.telephony, limits=config.limits, tools=tools,
                             observe_tool_run=config.observe_tool_run)
            registry.add(call)  # inside the reservation, so the slot is never free in between
    except (OptionsError, ToolConfigError, CallError) as exc:
        log.warning("%s call %s refused: %s", dialect.name, start.call_id, exc)
        await ws.close(code=1011 if isinstance(exc, CallError) and exc.status >= 500 else 1008,
                       message=str(exc).encode()[:120])
        return ws
    log.info("%s call %s connected as %s (%d live)", dialect.name, start.call_id, call.id, len(registry.calls))
    try:
        await call.run()
    finally:
        await call.close("handler_exit")
    return ws
