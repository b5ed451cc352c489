"""The `oai-events` data channel of a WebRTC call: server events out (held until the channel
opens), client messages in.

Messages stay small: long text is split over several `delta` events, and aiortc's SCTP chunks are
clamped to fit 1280-byte paths (see `clamp_sctp_chunks`).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiortc.rtcdatachannel import RTCDataChannel

from signaling.protocol import encode, split_event

CHANNEL_LABEL = "oai-events"
# One SCTP DATA chunk must fit a 1280-byte IPv6/VPN MTU after IP(40) + UDP(8) + DTLS(~37) headers.
SAFE_SCTP_USERDATA = 1100
MAX_PENDING_EVENTS = 200  # server events kept until the data channel opens


def clamp_sctp_chunks(limit: int = SAFE_SCTP_USERDATA) -> int:
    """Keep aiortc's SCTP DATA chunks within `limit` bytes of user data.

    Older aiortc releases sized chunks for a 1500-byte MTU, and without path-MTU discovery a
    data channel then stalls silently over VPNs and IPv6 tunnels. aiortc >= 1.14 already uses a
    safe size; this only ever lowers the module constant, never raises it. Returns the size in use.
    """
    from aiortc import rtcsctptransport

    if rtcsctptransport.USERDATA_MAX_LENGTH > limit:
        rtcsctptransport.USERDATA_MAX_LENGTH = limit
    return rtcsctptransport.USERDATA_MAX_LENGTH


class EventChannel:
    """Sends server events on the call's data channel; `incoming` receives the client's messages.

    `on_open()` returns the first event to send when the channel opens (session.created); events
    sent before that wait, up to MAX_PENDING_EVENTS.
    """

    def __init__(self, on_open: Callable[[], dict[str, Any]]) -> None:
        self.channel: RTCDataChannel | None = None
        self.incoming: asyncio.Queue[str | bytes] = asyncio.Queue()
        self._on_open = on_open
        self._pending: list[str] = []

    def attach(self, channel: RTCDataChannel) -> bool:
        """Take the first `oai-events` channel the peer opens; False for any other."""
        if channel.label != CHANNEL_LABEL or self.channel is not None:
            return False
        self.channel = channel
        channel.on("message", self.incoming.put_nowait)
        if channel.readyState == "open":
            self._opened()
        else:
            channel.on("open", self._opened)
        return True

    def _opened(self) -> None:
        self.channel.send(encode(self._on_open()))  # type: ignore[union-attr]
        pending, self._pending = self._pending, []
        for message in pending:
            self.channel.send(message)  # type: ignore[union-attr]

    def send(self, event: dict[str, Any]) -> None:
        for part in split_event(event):
            message = encode(part)
            channel = self.channel
            if channel is not None and channel.readyState == "open":
                channel.send(message)
            elif channel is None or channel.readyState == "connecting":
                if len(self._pending) < MAX_PENDING_EVENTS:
                    self._pending.append(message)
