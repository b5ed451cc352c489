"""WebRTC transport: SDP offer/answer routes, peer sessions, audio tracks, the `oai-events` channel.

`install(app, services=..., config=RealtimeConfig(...))` adds everything to an aiohttp application.
"""
from signaling.host import CallLimits, RealtimeConfig, RealtimeModels, TelephonyConfig
from signaling.routes import install

__all__ = ["CallLimits", "RealtimeConfig", "RealtimeModels", "TelephonyConfig", "install"]
