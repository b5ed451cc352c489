"""A scripted conversation whose wire events are recorded, for the golden test of the protocol edge.

The script: a spoken question (agent turn), a TTS request, a typed question whose reply is
interrupted by speech after it finished generating (barge-in while it plays), and the answer to
that interruption. Every step waits for the previous one's audio to play out, so the order of
events is deterministic; values that depend on the clock are replaced by their type.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any

import speechkit

QUESTION = "What is the capital of France?"
VOLATILE_NUMBERS = {"t_ms", "audio_end_ms", "audio_start_ms", "audio_seconds"}
VOLATILE_DICTS = {"latency_ms", "t"}


def normalise(event: dict[str, Any], *, volatile_text: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in VOLATILE_NUMBERS:
            out[key] = type(value).__name__
        elif key in VOLATILE_DICTS and isinstance(value, dict):
            out[key] = sorted(value)
        elif isinstance(value, dict):
            out[key] = normalise(value, volatile_text=volatile_text)
        elif key == "transcript" and volatile_text:
            out[key] = "<heard text>"
        else:
            out[key] = value
    return out


def condense(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive transcript deltas become one (token boundaries are the LLM's business), and runs
    of audio chunks become one entry."""
    out: list[dict[str, Any]] = []
    for rec in records:
        prev = out[-1] if out else None
        if (prev is not None and rec.get("type") == "response.output_audio_transcript.delta"
                and prev.get("type") == rec["type"] and prev.get("response_id") == rec.get("response_id")):
            prev["delta"] += rec["delta"]
            continue
        if prev is not None and rec.get("kind") == "audio" and prev == rec:
            continue
        out.append(rec)
    return out


async def run_script(session, wire, *, audio_kinds) -> list[dict[str, Any]]:
    """Drive `session` through the script; `wire(item)` maps one conversation event to its wire
    events, `audio_kinds(item)` names audio outputs ("audio" / "clear")."""
    records: list[dict[str, Any]] = []
    cancelled: set[str] = set()

    async def until(predicate, timeout=60.0):
        async def run():
            async for item in session.outputs():
                kind = audio_kinds(item)
                if kind is not None:
                    records.append({"kind": kind, "response_id": getattr(item, "response_id", None)})
                    continue
                for event in wire(item):
                    if event["type"] == "conversation.item.truncated" or (
                            event["type"] == "response.done" and event["response"]["status"] == "cancelled"):
                        cancelled.add(event.get("response_id"))
                    volatile = event.get("response_id") in cancelled and event["type"] in (
                        "conversation.item.truncated", "response.done", "response.output_audio_transcript.done")
                    records.append(normalise(event, volatile_text=volatile))
                    if predicate(event):
                        return
        await asyncio.wait_for(run(), timeout)

    def is_type(kind):
        return lambda e: e["type"] == kind

    question, _ = speechkit.speech_with_gaps([0.4, QUESTION, 0.8])
    interruption, _ = speechkit.speech_with_gaps([0.1, "Hello from the server.", 0.8])

    async def push(pcm):
        for chunk in speechkit.frames(pcm, 320):
            await session.push_audio(chunk)

    await push(question)  # 1. spoken question -> agent reply
    await until(is_type("output_audio_buffer.stopped"))
    await session.speak("Hello there, this is a test.")  # 2. a TTS request
    await until(is_type("output_audio_buffer.stopped"))
    await session.send_text(QUESTION)  # 3. typed question; interrupted while its audio plays
    await until(is_type("response.done"))
    await push(interruption)
    await until(is_type("output_audio_buffer.stopped"))  # 4. the interruption's own reply played out
    records.append({"history": [m["role"] for m in session.history]})
    return condense(records)


def canonical_ids(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids are opaque: rename each (item_, resp_, event_) by its order of first appearance, so two
    runs compare equal when they refer to the same things in the same places."""
    names: dict[str, str] = {}

    def rename(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        if isinstance(value, str) and re.fullmatch(r"(item|resp|event)_\w+", value):
            prefix = value.split("_", 1)[0]
            names.setdefault(value, f"<{prefix} {sum(n.startswith('<' + prefix) for n in names.values()) + 1}>")
            return names[value]
        return value

    return [rename(r) for r in records]


def contains(got: Any, want: Any) -> bool:
    """Every field of `want` is in `got` with the same value (new fields may be added)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and contains(got[k], v) for k, v in want.items())
    return got == want
