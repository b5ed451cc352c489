"""The OpenAI Realtime vocabulary at the transport edge: client JSON -> event models, and the
conversation's typed events -> server event dicts. Every realtime transport uses this package."""
from signaling.protocol.client_events import *  # noqa: F401,F403
from signaling.protocol.client_events import ProtocolError, parse_client_event  # noqa: F401
from signaling.protocol.server_events import DELTA_CHARS, ServerEvents, encode, split_event, wire_payload  # noqa: F401
