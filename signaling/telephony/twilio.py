"""Twilio Media Streams (bidirectional, `<Connect><Stream>`): the message shapes.

From Twilio: connected, start (start.streamSid, start.callSid, start.customParameters,
start.mediaFormat), media (media.payload: base64 μ-law 8 kHz, 20 ms), dtmf (dtmf.digit),
mark (mark.name, echoed once the audio sent before it has played, or dropped by a clear), stop.
To Twilio: media {streamSid, media.payload}, mark {streamSid, mark.name}, clear {streamSid}.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from signaling.telephony.codec import Encoding
from signaling.telephony.messages import (Connected, Dtmf, Inbound, Media, MessageError, Played, Start,
                                          Stop, b64, encoding_of, field, payload, sample_rate_of, string_map,
                                          text)


class TwilioDialect:
    name = "twilio"

    def is_start(self, message: Mapping[str, Any]) -> bool:
        start = message.get("start")
        return message.get("event") == "start" and isinstance(start, Mapping) and "streamSid" in start \
            and "callSid" in start

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
            fmt = field(message, "start").get("mediaFormat") or {}
            if not isinstance(fmt, Mapping):
                raise MessageError("start.mediaFormat must be an object")
            return Start(stream_id=text(message, "start", "streamSid"), call_id=text(message, "start", "callSid"),
                         parameters=string_map(message["start"].get("customParameters")),
                         encoding=encoding_of(fmt.get("encoding", "audio/x-mulaw")),
                         sample_rate=sample_rate_of(fmt.get("sampleRate")),
                         account_id=message["start"].get("accountSid"))
        if event == "stop":
            return Stop()
        raise MessageError(f"unknown Twilio event {event!r}")

    def media(self, stream_id: str, data: bytes, encoding: Encoding, rate: int) -> dict[str, Any]:
        return {"event": "media", "streamSid": stream_id, "media": {"payload": b64(data)}}

    def mark(self, stream_id: str, name: str) -> dict[str, Any]:
        return {"event": "mark", "streamSid": stream_id, "mark": {"name": name}}

    def clear(self, stream_id: str) -> dict[str, Any]:
        return {"event": "clear", "streamSid": stream_id}

