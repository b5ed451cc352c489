"""Phone calls: carrier media streams (Twilio, Telnyx, Plivo) bridged to the conversation pipeline.

    routes.py    voice webhooks (TwiML / TeXML / Plivo XML) and the media-stream WebSocket
    bridge.py    one call: carrier messages <-> ConversationSession, liveness, teardown
    playback.py  reply audio out in paced chunks with marks; what was heard; clear on barge-in
    codec.py     G.711 μ-law / A-law and 8 kHz resampling through PyAV
    messages.py  the carrier-neutral events and the dialect contract
    twilio.py, telnyx.py, plivo.py   one dialect each: message shapes only
    tokens.py    short-lived single-use stream tokens (only admitted calls get a stream)
"""
from signaling.telephony.routes import install

__all__ = ["install"]
