"""What a carrier's media stream says, carrier-neutral, and what each dialect must provide.

A dialect (twilio, telnyx, plivo) turns its carrier's JSON messages into these events and builds
the three messages the bridge sends back: media, a mark after it, and clear.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

from signaling.telephony.codec import Encoding

MAX_PAYLOAD_BYTES = 64 * 1024  # one media message; carriers send 160 bytes (20 ms)


class MessageError(ValueError):
    """A message that is not what its carrier documents (logged and skipped)."""


@dataclasses.dataclass(frozen=True)
class Connected:
    pass


@dataclasses.dataclass(frozen=True)
class Start:
    stream_id: str
    call_id: str
    parameters: dict[str, str]  # the carrier's custom parameters for this stream
    encoding: Encoding = "mulaw"
    sample_rate: int = 8000
    account_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Media:
    payload: bytes
    track: str = "inbound"


@dataclasses.dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclasses.dataclass(frozen=True)
class Played:
    """The carrier has played every audio byte sent before the mark `name`."""

    name: str


@dataclasses.dataclass(frozen=True)
class Stop:
    pass


@dataclasses.dataclass(frozen=True)
class Other:
    """A documented message the bridge has no use for (or a carrier error report)."""

    event: str
    detail: str = ""


Inbound = Connected | Start | Media | Dtmf | Played | Stop | Other


class Dialect(Protocol):
    name: str

    def is_start(self, message: Mapping[str, Any]) -> bool:
        """Whether `message` is this carrier's start message (dialect detection)."""

    def parse(self, message: Mapping[str, Any]) -> Inbound:
        """One message -> an event; MessageError when it is malformed or unknown."""

    def media(self, stream_id: str, payload: bytes, encoding: Encoding, rate: int) -> dict[str, Any]: ...

    def mark(self, stream_id: str, name: str) -> dict[str, Any]: ...

    def clear(self, stream_id: str) -> dict[str, Any]: ...


# --------------------------------------------------------------------------- shared parsing helpers
def field(message: Mapping[str, Any], *path: str) -> Any:
    """message[a][b]...; MessageError naming the path when something is missing."""
    value: Any = message
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            raise MessageError(f"missing {'.'.join(path)}")
        value = value[key]
    return value


def text(message: Mapping[str, Any], *path: str) -> str:
    value = field(message, *path)
    if not isinstance(value, str) or not value:
        raise MessageError(f"{'.'.join(path)} must be a non-empty string")
    return value


def payload(message: Mapping[str, Any], *path: str) -> bytes:
    encoded = text(message, *path)
    if len(encoded) > MAX_PAYLOAD_BYTES * 4 // 3 + 4:
        raise MessageError(f"{'.'.join(path)} is larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(f"{'.'.join(path)} is not base64") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encoding_of(name: Any) -> Encoding:
    """A carrier's encoding name -> ours; MessageError for anything but G.711."""
    normal = str(name or "").strip().lower()
    if normal in ("audio/x-mulaw", "mulaw", "ulaw", "pcmu", "g711_ulaw", "audio/pcmu"):
        return "mulaw"
    if normal in ("audio/x-alaw", "alaw", "pcma", "g711_alaw", "audio/pcma"):
        return "alaw"
    raise MessageError(f"unsupported media encoding {name!r} (this bridge carries G.711 μ-law and A-law)")


def sample_rate_of(value: Any, default: int = 8000) -> int:
    if value is None:
        return default
    try:
        rate = int(value)
    except (TypeError, ValueError):
        raise MessageError(f"sample rate {value!r} is not a number") from None
    if rate not in (8000, 16000):
        raise MessageError(f"unsupported sample rate {rate} (8000 or 16000)")
    return rate


def string_map(value: Any) -> dict[str, str]:
    """Custom parameters as a flat str -> str dict (a mapping, or a list of {name, value})."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        out = {}
        for item in value:
            if isinstance(item, Mapping) and "name" in item:
                out[str(item["name"])] = str(item.get("value", ""))
        return out
    raise MessageError("custom parameters must be an object")
