"""WebRTC transport: SDP offer/answer routes, peer sessions, audio tracks, the `oai-events` channel.

`install(app, services=..., settings=...)` adds everything to an aiohttp application.
"""
from signaling.routes import install

__all__ = ["install"]
