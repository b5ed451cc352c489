"""The one way every route reads a request body: raw bytes, JSON, msgpack, multipart or url-encoded
forms, and strict UTF-8 text. Whatever a client sends, the outcome is the parsed value or a
RequestError with a 4xx status and a reason, never an exception that escapes as a 500:

- a body over the application's size limit is a 413; one whose Content-Encoding does not
  decode, or that ends early, is a 400;
- JSON that Python's parser refuses for any reason (syntax, a number with too many digits,
  nesting deep enough to exhaust the recursion limit) is a 400 (NaN and Infinity pass, for the
  models' own finite-number checks to name the field);
- any string holding a lone surrogate (JSON's "\\ud800") is a 400: such text cannot be written
  to a file, encoded for a tokenizer or sent back as UTF-8;
- a multipart body with no or a broken boundary, bad part headers or an early end is a 400.
"""
from __future__ import annotations

import json
from typing import Any

import msgpack
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from server.schema import RequestError

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")


def _too_large(request: web.Request) -> RequestError:
    limit = getattr(request, "client_max_size", None) or getattr(request, "_client_max_size", None)
    if limit:
        return RequestError(413, f"the request body is larger than the {limit} byte limit")
    return RequestError(413, "the request body is too large")


async def read_bytes(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    except (RequestPayloadError, HttpProcessingError, EOFError, ValueError) as exc:  # bad encoding, early end
        raise RequestError(400, f"the request body could not be read: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def check_text(value: Any, what: str = "the request body") -> Any:
    """`value` unchanged if every string in it (keys included) is valid Unicode; else a 400."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise RequestError(400, f"{what} holds text that is not valid Unicode "
                                        f"(a lone surrogate at position {exc.start})") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return value


def parse_json(raw: bytes | str, what: str = "the request body") -> Any:
    """JSON text -> value, or a 400 that says why."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise RequestError(400, f"{what} is not valid JSON: it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the integer digit limit
        raise RequestError(400, f"{what} is not valid JSON: {_reason(exc)}") from None
    return check_text(value, what)


def parse_msgpack(raw: bytes, what: str = "the request body") -> Any:
    """msgpack bytes -> value, or a 400 that says why (ext types are refused: no route takes them)."""
    try:
        value = msgpack.unpackb(raw, raw=False, ext_hook=_no_ext)
    except (ValueError, TypeError, RecursionError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise RequestError(400, f"{what} is not valid msgpack: {_reason(exc)}") from None
    return check_text(value, what)


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not accepted")


async def read_json(request: web.Request) -> Any:
    raw = await read_bytes(request)
    if not raw.strip():
        raise RequestError(400, "the request body is empty; send JSON")
    return parse_json(raw)


async def read_text(request: web.Request, what: str = "the request body") -> str:
    """The body as strict UTF-8 text (the charset must be UTF-8 or unset)."""
    raw = await read_bytes(request)
    charset = (request.charset or "utf-8").lower()
    if charset not in ("utf-8", "utf8", "us-ascii", "ascii"):
        raise RequestError(415, f"{what} must be UTF-8 text, not {charset}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"{what} is not UTF-8 text: invalid byte at position {exc.start}") from None


async def read_form(request: web.Request) -> tuple[dict[str, Any], dict[str, str]]:
    """A multipart or url-encoded form: (fields, filenames of the file fields). File fields hold
    their bytes, text fields their text; a repeated field keeps its first value, as upstream reads forms."""
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    except Exception as exc:  # noqa: BLE001 - aiohttp's form parsers raise many types on bad input
        raise RequestError(400, f"the form body is malformed: {type(exc).__name__}: {_reason(exc)}") from None
    fields: dict[str, Any] = {}
    filenames: dict[str, str] = {}
    for name, value in form.items():
        if name in fields:
            continue
        if isinstance(value, web.FileField):
            fields[name] = value.file.read()
            if value.filename:
                filenames[name] = value.filename
        else:
            fields[name] = value
    check_text([*fields.keys(), *(v for v in fields.values() if isinstance(v, str)), *filenames.values()],
               "the form")
    return fields, filenames


async def read_structured(request: web.Request, *, allow_form: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """A JSON, msgpack (or, where allowed, form) body that must be an object: (fields, filenames of
    uploaded files; empty unless it was a multipart form)."""
    ctype = request.content_type
    filenames: dict[str, str] = {}
    if ctype in MSGPACK_TYPES:
        body = parse_msgpack(await read_bytes(request))
    elif allow_form and ctype in FORM_TYPES:
        body, filenames = await read_form(request)
    elif ctype in ("application/json", "text/json", "", "application/octet-stream", "text/plain"):
        body = await read_json(request)
    else:
        allowed = "application/json or application/msgpack" + (" or multipart/form-data" if allow_form else "")
        raise RequestError(415, f"unsupported Content-Type {ctype!r}; send {allowed}")
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be an object, got {type(body).__name__}")
    return body, filenames
