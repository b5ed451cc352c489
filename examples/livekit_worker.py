"""A LiveKit Agents worker whose voice agent is a fishvoice server.

LiveKit carries the rooms, the phone calls (SIP trunks) and the dispatch of jobs to workers; this
worker joins each room it is sent to and runs LiveKit's `AgentSession` with OpenAI's Realtime
plugin pointed at our server's Realtime WebSocket (`GET /v1/realtime`) instead of OpenAI: the
caller's audio goes to our VAD, ASR and agent LLM, and the reply comes back in the server's
cloned voice. Run one worker per fishvoice box (or several per box, up to its session cap):
the worker reports the box's load from `/health`, so LiveKit stops dispatching to a full box.

    pip install "livekit-agents==1.8.9" "livekit-plugins-openai==1.8.9"
    export LIVEKIT_URL=wss://your-livekit LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    export FISHVOICE_URL=http://127.0.0.1:8000 FISHVOICE_API_KEY=...   # the server's API_KEY, if set
    python examples/livekit_worker.py start        # or `dev` while developing

Options (environment): FISHVOICE_VOICE (a reference id stored on the server, the voice the agent
speaks in), FISHVOICE_INSTRUCTIONS (the agent's system prompt), AGENT_NAME (for explicit dispatch,
e.g. from a SIP dispatch rule; unset = join every new room), GREETING (what the agent says first;
empty = wait for the caller), LOAD_THRESHOLD (the load, sessions in use over the cap, at which the
worker takes no new jobs; default 1.0).
"""
from __future__ import annotations

import json
import logging
import os
import urllib.request

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli
from livekit.plugins import openai

log = logging.getLogger("fishvoice-worker")

FISHVOICE_URL = os.environ.get("FISHVOICE_URL", "http://127.0.0.1:8000").rstrip("/")
FISHVOICE_API_KEY = os.environ.get("FISHVOICE_API_KEY", "unused")  # the plugin insists on a key
VOICE = os.environ.get("FISHVOICE_VOICE", "")
INSTRUCTIONS = os.environ.get("FISHVOICE_INSTRUCTIONS", "You are a helpful voice assistant. Answer briefly.")
GREETING = os.environ.get("GREETING", "Greet the caller in one short sentence.")


def realtime_model(base_url: str = FISHVOICE_URL, api_key: str = FISHVOICE_API_KEY,
                   voice: str = VOICE) -> openai.realtime.RealtimeModel:
    """OpenAI's Realtime plugin, talking to a fishvoice server (`{base_url}/v1/realtime`)."""
    options = {"voice": voice} if voice else {}
    return openai.realtime.RealtimeModel(base_url=f"{base_url}/v1", api_key=api_key, **options)


def assistant(instructions: str = INSTRUCTIONS) -> Agent:
    return Agent(instructions=instructions)


def session_load(health: dict) -> float | None:
    """A box's load in 0..1 from its /health body (`"realtime": {"active", "max", "available"}`):
    realtime sessions in use over the cap."""
    realtime = health.get("realtime") or {}
    active, cap = realtime.get("active"), realtime.get("max")
    if not isinstance(active, int) or not isinstance(cap, int) or cap <= 0:
        return None
    return min(1.0, active / cap)


def fishvoice_load() -> float:
    """The worker's load for LiveKit's dispatch, read from the server's /health (LiveKit calls this
    off its event loop every few seconds and before each job offer). An unreachable server, or one
    that reports no session figures, counts as full."""
    try:
        with urllib.request.urlopen(f"{FISHVOICE_URL}/health", timeout=2) as response:
            load = session_load(json.load(response))
    except Exception as exc:  # noqa: BLE001 - any failure means: send no calls here
        log.warning("fishvoice /health unreachable (%s); reporting full load", exc)
        return 1.0
    return 1.0 if load is None else load


# Full (no new jobs) once every realtime session of the box is taken, not at LiveKit's default 0.7.
server = AgentServer(load_fnc=fishvoice_load, load_threshold=float(os.environ.get("LOAD_THRESHOLD", "1.0")))


@server.rtc_session(agent_name=os.environ.get("AGENT_NAME", ""))
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(llm=realtime_model())
    await session.start(room=ctx.room, agent=assistant())  # joins the room; caller audio flows to fishvoice
    if GREETING:
        await session.generate_reply(instructions=GREETING)


if __name__ == "__main__":
    cli.run_app(server)
