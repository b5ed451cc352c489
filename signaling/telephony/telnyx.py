"""Telnyx media streaming (bidirectional, `stream_bidirectional_mode: rtp`): the message shapes.

From Telnyx: connected, start (stream_id, start.call_control_id, start.media_format {encoding
PCMU|PCMA, sample_rate}, start.custom_parameters), media (media.payload, media.track), dtmf
(dtmf.digit), mark (mark.name), error (payload), stop. To Telnyx: media {media.payload},
mark {mark.name}, clear.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from signaling.telephony.codec import Encoding
from signaling.telephony.messages import (Connected, Dtmf, Inbound, Media, MessageError, Other, Played, Start,
                                          Stop, b64, encoding_of, field, payload, sample_rate_of, string_map,
                                          text)


class TelnyxDialect:
    name = "telnyx"

    def is_start(self, message: Mapping[str, Any]) -> bool:
        start = message.get("start")
        return "stream_id" in message and isinstance(start, Mapping) and "call_control_id" in start

    def parse(self, message: Mapping[str, Any]) -> Inbound:
        event = message.get("event")
        if event == "media":
            return Media(payload(message, "media", "payload"), str(message["media"].get("track", "inbound")))
        if event == "mark":
            return Played(text(message, "mark", "name"))
        if event == "dtmf":
            return Dtmf(text(message, "dtmf", "digit"))
        if event == "connected":
            return Connected()
        if event == "start":
            fmt = field(message, "start").get("media_format") or {}
            if not isinstance(fmt, Mapping):
                raise MessageError("start.media_format must be an object")
            return Start(stream_id=text(message, "stream_id"), call_id=text(message, "start", "call_control_id"),
                         parameters=string_map(message["start"].get("custom_parameters")),
                         encoding=encoding_of(fmt.get("encoding", "PCMU")),
                         sample_rate=sample_rate_of(fmt.get("sample_rate")),
                         account_id=message["start"].get("user_id"))
        if event == "stop":
            return Stop()
        if event == "error":
            return Other("error", str(message.get("payload")))
        raise MessageError(f"unknown Telnyx event {event!r}")

    def media(self, stream_id: str, data: bytes, encoding: Encoding, rate: int) -> dict[str, Any]:
        return {"event": "media", "media": {"payload": b64(data)}}

    def mark(self, stream_id: str, name: str) -> dict[str, Any]:
        return {"event": "mark", "mark": {"name": name}}

    def clear(self, stream_id: str) -> dict[str, Any]:
        return {"event": "clear"}
