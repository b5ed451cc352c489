"""OpenAI's error shape for the audio routes: {"error": {"message", "type", "param", "code"}},
with the status codes the `openai` SDK maps to its exception classes."""
from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from engine.audio import AudioDecodeError
from server.references import VoiceError
from server.schema import RequestError
from server.services import ServiceUnavailable

log = logging.getLogger(__name__)

_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
          429: "rate_limit_exceeded"}


class OpenAIError(Exception):
    """A request this route refuses; becomes an OpenAI-shaped error response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    kind = _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status)


def as_openai_error(exc: Exception) -> OpenAIError:
    """Map the server's own exceptions to statuses; anything unexpected is a 500 with its reason."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, RequestError):
        return OpenAIError(exc.status, exc.message)
    if isinstance(exc, ServiceUnavailable):
        return OpenAIError(503, str(exc), code="model_not_loaded")
    if isinstance(exc, VoiceError):
        return OpenAIError(exc.status, str(exc), param="voice")
    if isinstance(exc, AudioDecodeError):
        return OpenAIError(413 if "longer than" in str(exc) else 400, str(exc), param="file")
    log.exception("OpenAI audio route failed", exc_info=exc)
    return OpenAIError(500, f"{type(exc).__name__}: {exc}")


def openai_errors(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Answer any exception the handler raises before its response started, in OpenAI's shape."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - one failing request never takes the server down
            err = as_openai_error(exc)
            return error_response(err.status, err.message, err.param, err.code)

    return wrapped
