"""Function calling on the WebRTC data channel: tools configured in the call's multipart `session`
field, a spoken question (espeak-ng into the microphone track) answered with a call, the output
sent back on the data channel and the reply spoken on the audio track. Real models throughout."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

import speechkit
from rtc_client import RealtimeClient
from test_webrtc import TTS_FRAMES, loopback_ice, server, speech  # noqa: F401 - fixtures (models: conftest)

pytestmark = pytest.mark.skipif(not speechkit.espeak_available(), reason="espeak-ng/sox not installed")

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


async def test_spoken_question_tool_call_and_spoken_answer_over_webrtc(server):  # noqa: F811
    client = RealtimeClient(server.base_url)
    try:
        await client.connect(session={"type": "realtime", "tools": [WEATHER], "temperature": 0.0,
                                      "tool_choice": {"type": "function", "name": "get_weather"},
                                      "max_output_tokens": 60, "sampling": {"max_new_tokens": TTS_FRAMES}})
        created = await client.wait_for("session.created")
        assert created["session"]["tools"][0]["name"] == "get_weather"
        client.mic.play(speech("What is the weather in Paris?"))
        stopped = await client.wait_for("input_audio_buffer.speech_stopped", timeout=30)
        done = await client.wait_for("response.function_call_arguments.done", timeout=90)
        added = client.of_type("response.output_item.added")[-1]
        assert added["item"]["type"] == "function_call" and added["item"]["call_id"] == done["call_id"]
        deltas = "".join(e["delta"] for e in client.of_type("response.function_call_arguments.delta"))
        assert deltas == done["arguments"] and isinstance(json.loads(done["arguments"])["city"], str)
        print(f"end of turn -> function_call_arguments.done: {done['t_ms'] - stopped['t_ms']:.0f} ms (server clock)")
        first = await client.wait_for("response.done", timeout=30)
        assert [o["type"] for o in first["response"]["output"]] == ["function_call"]
        assert not client.of_type("output_audio_buffer.started")  # nothing spoken before the call

        client.send({"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": done["call_id"], "output": "Sunny, 21 degrees celsius."}})
        await client.wait_for("conversation.item.done", lambda e: e["item"]["type"] == "function_call_output")
        t_create = time.monotonic()
        client.send({"type": "response.create", "response": {"tool_choice": "none"}})
        reply = await client.wait_for("response.done", lambda e: e["response_id"] != first["response_id"],
                                      timeout=120)
        assert reply["response"]["status"] == "completed"
        assert "21" in reply["transcript"] or "sunny" in reply["transcript"].lower(), reply["transcript"]
        await asyncio.sleep(0.5)
        assert client.sink.audible_seconds(after=t_create) > 0.5  # the answer was spoken on the track
        history = server.calls[client.call_id].conversation.items()
        assert [i.type for i in history][-3:] == ["function_call", "function_call_output", "message"]
    finally:
        await client.hang_up()
