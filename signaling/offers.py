"""Reading and vetting an SDP offer before and around the WebRTC machinery.

`read_offer` takes the offer from the request (application/sdp, or multipart/url-encoded `sdp` +
`session`) through the server's one body reader: bad UTF-8, a broken multipart body or a
`session` that is not JSON are 400s. `parse_offer` runs aiortc's own SDP parser first, and
`aiortc_errors` turns anything aiortc raises while applying the offer or making the answer
(its parser and negotiation raise KeyError, IndexError, AssertionError... on malformed SDP) into a
400 with the reason. An exception raised in our own code stays what it is: a bug, not bad input.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import aiortc
from aiohttp import web
from aiortc.sdp import SessionDescription

from engine.agent.conversation import SemanticTurnDetection, TurnDetection
from server.bodies import FORM_TYPES, parse_json, read_form, read_text
from server.schema import RequestError
from signaling.errors import CallError
from signaling.options import SessionOptions, from_query, from_session

MAX_OFFER_BYTES = 64 * 1024


def check_offer(sdp: str) -> None:
    if not sdp or not sdp.strip():
        raise CallError(400, "invalid_offer", "the request body must be an SDP offer")
    if len(sdp) > MAX_OFFER_BYTES:
        raise CallError(413, "offer_too_large", f"SDP offers are limited to {MAX_OFFER_BYTES} bytes")
    if not sdp.lstrip().startswith("v=0"):
        raise CallError(400, "invalid_offer", "the body is not an SDP offer (it must start with v=0)")
    if "\nm=audio " not in sdp.replace("\r\n", "\n"):
        raise CallError(400, "no_audio", "the offer has no audio m-line: add a microphone track or an audio "
                                         "transceiver (the agent talks over audio)")
    if "opus/48000" not in sdp.lower():
        raise CallError(400, "no_opus", "the offer's audio does not include Opus (opus/48000/2)")


SDP_TYPES = ("application/sdp", "text/plain", "application/octet-stream", "")
_AIORTC_DIR = os.path.realpath(Path(aiortc.__file__).parent) + os.sep
_OUR_DIRS = tuple(os.path.realpath(Path(__file__).parent.parent / name) + os.sep
                  for name in ("engine", "server", "signaling"))


async def read_offer(request: web.Request) -> tuple[str, SessionOptions]:
    """The offer's SDP text and the session options from its query string and `session` field."""
    options = from_query(request.query)
    ctype = request.content_type
    try:
        if ctype in FORM_TYPES:
            form, _ = await read_form(request)
            sdp = form.get("sdp")
            if sdp is None:
                raise CallError(400, "missing_sdp", "multipart offers need an `sdp` field")
            session = form.get("session")
            if session is not None:
                parsed = parse_json(_utf8(session, "session"), "the `session` field")
                # Query values are the base; the session object overrides field by field.
                base = (options.turn_detection
                        if isinstance(options.turn_detection, (TurnDetection, SemanticTurnDetection)) else None)
                options = options.merged(from_session(parsed, base))
            return _utf8(sdp, "sdp"), options
        if ctype in SDP_TYPES:
            return await read_text(request, "the SDP offer"), options
    except RequestError as exc:
        code = "invalid_session" if "`session`" in exc.message else "invalid_offer"
        raise CallError(exc.status, code, exc.message, param="session" if code == "invalid_session" else None) from None
    raise CallError(415, "unsupported_media_type",
                    f"send the SDP offer as application/sdp (or multipart/form-data), not {ctype}")


def _utf8(value: str | bytes, field: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"the `{field}` field is not UTF-8 text: invalid byte at position {exc.start}") \
            from None


def parse_offer(sdp: str) -> None:
    """aiortc's SDP parser on the offer; whatever it raises is a 400 that names the reason."""
    try:
        SessionDescription.parse(sdp)
    except Exception as exc:  # noqa: BLE001 - aiortc's parser raises many types on malformed SDP
        raise CallError(400, "invalid_offer", f"the SDP offer could not be parsed: {_describe(exc)}") from None


@contextlib.contextmanager
def aiortc_errors() -> Iterator[None]:
    """Exceptions that aiortc raises while it applies the offer or answers it become 400s."""
    try:
        yield
    except (CallError, web.HTTPException):
        raise
    except Exception as exc:
        if not raised_by_aiortc(exc.__traceback__):
            raise
        raise CallError(400, "negotiation_failed", f"no answer can be made for this offer: {_describe(exc)}") \
            from None


def raised_by_aiortc(tb: TracebackType | None) -> bool:
    """True when the deepest frame of ours or aiortc's in `tb` is aiortc's (library frames below it,
    such as ipaddress or struct, count as aiortc's call)."""
    owner = None
    while tb is not None:
        filename = os.path.realpath(tb.tb_frame.f_code.co_filename)  # a venv may be reached through a symlink
        if filename.startswith(_AIORTC_DIR):
            owner = "aiortc"
        elif filename.startswith(_OUR_DIRS):
            owner = "ours"
        tb = tb.tb_next
    return owner == "aiortc"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    text = text if len(text) <= 200 else text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
