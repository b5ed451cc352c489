"""Plivo audio streams (`<Stream bidirectional="true">`): the message shapes.

From Plivo: start (start.streamId, start.callId, start.mediaFormat, extra_headers "a=1,b=2"),
media (media.payload), dtmf (dtmf.digit), playedStream (name: the checkpoint whose audio has
played), clearedAudio, stop. To Plivo: playAudio {media {contentType, sampleRate, payload}},
checkpoint {streamId, name}, clearAudio {streamId}.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from signaling.telephony.codec import Encoding
from signaling.telephony.messages import (Dtmf, Inbound, Media, MessageError, Other, Played, Start, Stop, b64,
                                          encoding_of, field, payload, sample_rate_of, text)

_CONTENT_TYPES = {"mulaw": "audio/x-mulaw", "alaw": "audio/x-alaw"}


def _extra_headers(value: Any) -> dict[str, str]:
    """Plivo's extraHeaders arrive as one string, "key1=value1,key2=value2"."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    for pair in str(value or "").split(","):
        key, sep, val = pair.partition("=")
        if sep and key.strip():
            out[key.strip()] = val.strip()
    return out


class PlivoDialect:
    name = "plivo"

    def is_start(self, message: Mapping[str, Any]) -> bool:
        start = message.get("start")
        return isinstance(start, Mapping) and "streamId" in start and "callId" in start

    def parse(self, message: Mapping[str, Any]) -> Inbound:
        event = message.get("event")
        if event == "media":
            return Media(payload(message, "media", "payload"), str(message["media"].get("track", "inbound")))
        if event == "playedStream":
            return Played(text(message, "name"))
        if event == "dtmf":
            return Dtmf(text(message, "dtmf", "digit"))
        if event == "start":
            fmt = field(message, "start").get("mediaFormat") or {}
            if not isinstance(fmt, Mapping):
                raise MessageError("start.mediaFormat must be an object")
            return Start(stream_id=text(message, "start", "streamId"), call_id=text(message, "start", "callId"),
                         parameters=_extra_headers(message.get("extra_headers")),
                         encoding=encoding_of(fmt.get("encoding", "audio/x-mulaw")),
                         sample_rate=sample_rate_of(fmt.get("sampleRate")),
                         account_id=message["start"].get("accountId"))
        if event == "stop":
            return Stop()
        if event == "clearedAudio":
            return Other("clearedAudio")
        raise MessageError(f"unknown Plivo event {event!r}")

    def media(self, stream_id: str, data: bytes, encoding: Encoding, rate: int) -> dict[str, Any]:
        return {"event": "playAudio", "streamId": stream_id,
                "media": {"contentType": _CONTENT_TYPES[encoding], "sampleRate": rate, "payload": b64(data)}}

    def mark(self, stream_id: str, name: str) -> dict[str, Any]:
        return {"event": "checkpoint", "streamId": stream_id, "name": name}

    def clear(self, stream_id: str) -> dict[str, Any]:
        return {"event": "clearAudio", "streamId": stream_id}
