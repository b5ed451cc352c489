"""ICE servers for calls, from settings only.

aiortc's own default configuration contacts a public Google STUN server, so every peer
connection here gets an explicit list (empty unless STUN/TURN servers are configured).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer


def ice_configuration(ice_servers: Any) -> RTCConfiguration:
    """RTCConfiguration from settings: URLs or {urls, username, credential} dicts.

    Always explicit: aiortc's own default would contact a public Google STUN server.
    """
    servers: list[RTCIceServer] = []
    for entry in ice_servers or ():
        if isinstance(entry, str):
            servers.append(RTCIceServer(urls=entry))
        elif isinstance(entry, Mapping):
            servers.append(RTCIceServer(urls=entry["urls"], username=entry.get("username"),
                                        credential=entry.get("credential")))
        elif isinstance(entry, RTCIceServer):
            servers.append(entry)
        else:
            raise ValueError(f"ice server entries are URLs or {{urls, username, credential}} objects, got {entry!r}")
    return RTCConfiguration(iceServers=servers)


def ice_servers_for_browser(ice_servers: Any) -> list[dict[str, Any]]:
    """The same list in the browser's RTCIceServer shape (for the page's RTCPeerConnection)."""
    out = []
    for server in ice_configuration(ice_servers).iceServers or ():
        item: dict[str, Any] = {"urls": server.urls}
        if server.username:
            item["username"] = server.username
            item["credential"] = server.credential
        out.append(item)
    return out
