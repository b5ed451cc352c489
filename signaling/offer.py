"""Checks on an SDP offer before any WebRTC machinery starts: clear 400s for what we cannot answer."""
from __future__ import annotations

from signaling.errors import CallError

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
