"""The aiohttp server: the RunPod-compatible job API, upstream Fish Speech's /v1 API, realtime
calls (via signaling), the RunPod worker and a test client. See server.app for the routes."""
