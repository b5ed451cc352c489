"""Function calling over the realtime WebSocket, driven by the official `openai` SDK against the
real models (SmolLM2 via llama.cpp, whisper tiny.en, silero, the TTS engine on a tiny random
checkpoint): a named tool_choice, the call's GA events in order, the output sent back by the SDK,
a spoken reply that uses it, and the refusals of bad tool configuration."""
from __future__ import annotations

import base64
import json

import pytest

from engine.agent.tools import argument_problem, parse_tools
from test_realtime_ws import TTS_FRAMES, client_for, events_until, server  # noqa: F401 - fixtures (models: conftest)

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}


async def test_named_tool_choice_call_output_and_spoken_reply_with_the_openai_sdk(server):  # noqa: F811
    async with client_for(server).realtime.connect(model="gpt-realtime") as conn:
        await events_until(conn, "session.created", 20)
        await conn.session.update(session={
            "type": "realtime", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
            "temperature": 0.0, "max_output_tokens": 60, "sampling": {"max_new_tokens": TTS_FRAMES, "seed": 1},
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}}}})
        updated = (await events_until(conn, "session.updated", 20))[-1]
        assert updated.session.tools[0].name == "get_weather"
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is the weather like in Paris today?"}]})
        await conn.response.create()
        events = await events_until(conn, "response.done", 90)
        kinds = [e.type for e in events]
        order = ["response.created", "response.output_item.added", "response.function_call_arguments.delta",
                 "response.function_call_arguments.done", "response.output_item.done", "response.done"]
        positions = [kinds.index(k) for k in order]
        assert positions == sorted(positions), kinds
        added = events[kinds.index("response.output_item.added")]
        assert added.item.type == "function_call" and added.item.name == "get_weather"
        assert added.item.arguments == "" and added.item.status == "in_progress"
        done_args = events[kinds.index("response.function_call_arguments.done")]
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert deltas == done_args.arguments and done_args.call_id == added.item.call_id
        assert done_args.name == "get_weather"
        assert argument_problem(parse_tools([WEATHER])[0], done_args.arguments) is None, done_args.arguments
        assert json.loads(done_args.arguments)["city"]  # the grammar only guarantees the shape; a city was named
        assert "conversation.item.added" in kinds and "conversation.item.done" in kinds
        assert not any(k.startswith("response.output_audio") for k in kinds)  # nothing was said before the call
        response = events[-1].response
        assert response.status == "completed"
        assert [o.type for o in response.output] == ["function_call"]
        assert response.output[0].call_id == added.item.call_id and response.output[0].arguments == done_args.arguments

        # The application runs the tool and answers through the SDK; the next reply uses the output.
        await conn.conversation.item.create(item={"type": "function_call_output", "call_id": added.item.call_id,
                                                  "output": "Sunny, 21 degrees celsius."})
        item_done = (await events_until(conn, "conversation.item.done", 20))[-1]
        assert item_done.item.type == "function_call_output" and item_done.item.call_id == added.item.call_id
        await conn.response.create(response={"tool_choice": "none"})
        events = await events_until(conn, "response.done", 120)
        reply = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert "21" in reply or "sunny" in reply.lower(), reply
        audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
        assert len(audio) > 24_000  # over half a second of reply speech at 24 kHz s16
        assert events[-1].response.status == "completed"
        assert events[-1].response.output[0].type == "message"

        # Tool items are conversation items like any other.
        await conn.conversation.item.retrieve(item_id=added.item.id)
        retrieved = (await events_until(conn, "conversation.item.retrieved", 20))[-1]
        assert retrieved.item.type == "function_call" and retrieved.item.arguments == done_args.arguments
        await conn.conversation.item.delete(item_id=item_done.item.id)
        assert (await events_until(conn, "conversation.item.deleted", 20))[-1].item_id == item_done.item.id


async def test_bad_tool_configuration_is_refused_and_the_session_keeps_its_tools(server):  # noqa: F811
    async with client_for(server).realtime.connect(model="gpt-realtime") as conn:
        await events_until(conn, "session.created", 20)
        await conn.session.update(session={"type": "realtime", "tools": [WEATHER]})
        await events_until(conn, "session.updated", 20)
        bad = [
            ({"tools": [{"type": "function", "description": "no name"}]}, "tools[0].name"),
            ({"tools": [{"type": "function", "name": "has space"}]}, "tools[0].name"),
            ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]}, "tools[0].parameters"),
            ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "properties": 3}}]},
             "tools[0].parameters"),
            ({"tool_choice": {"type": "function", "name": "book_table"}}, "tool_choice.name"),
            ({"tool_choice": "sometimes"}, "tool_choice"),
        ]
        for n, (session, param) in enumerate(bad):
            await conn.send({"type": "session.update", "event_id": f"evt_{n}", "session": session})
            error = (await events_until(conn, "error", 20))[-1]
            assert error.error.param == param and error.error.event_id == f"evt_{n}", (session, error.error)
        await conn.send({"type": "conversation.item.create", "event_id": "evt_out", "item": {
            "type": "function_call_output", "call_id": "call_nope", "output": "42"}})
        error = (await events_until(conn, "error", 20))[-1]
        assert error.error.event_id == "evt_out" and error.error.param == "item.call_id"
        await conn.send({"type": "response.create", "event_id": "evt_resp",
                         "response": {"tool_choice": {"type": "function", "name": "nope"}}})
        error = (await events_until(conn, "error", 20))[-1]
        assert error.error.event_id == "evt_resp" and error.error.param == "response.tool_choice.name"
        await conn.session.update(session={"type": "realtime", "instructions": "Still here."})
        updated = (await events_until(conn, "session.updated", 20))[-1]
        assert [t.name for t in updated.session.tools] == ["get_weather"] and updated.session.tool_choice == "auto"


async def test_cancelling_during_a_call_leaves_it_incomplete_and_unanswerable(server):  # noqa: F811
    async with client_for(server).realtime.connect(model="gpt-realtime") as conn:
        await events_until(conn, "session.created", 20)
        await conn.session.update(session={"type": "realtime", "tools": [WEATHER], "output_modalities": ["text"],
                                           "tool_choice": {"type": "function", "name": "get_weather"},
                                           "max_output_tokens": 200})
        await events_until(conn, "session.updated", 20)
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is the weather like in Oslo?"}]})
        await conn.response.create()
        added = (await events_until(conn, "response.output_item.added", 60))[-1]
        assert added.item.type == "function_call"
        await conn.response.cancel()
        events = await events_until(conn, "response.done", 60)
        response = events[-1].response
        assert response.status == "cancelled" and response.status_details.reason == "client_cancelled"
        assert [(o.type, o.status) for o in response.output] == [("function_call", "incomplete")]
        assert "response.function_call_arguments.done" not in [e.type for e in events]
        # The cut-off call never joined the conversation, so an output for it is refused.
        await conn.send({"type": "conversation.item.create", "event_id": "evt_late", "item": {
            "type": "function_call_output", "call_id": added.item.call_id, "output": "too late"}})
        error = (await events_until(conn, "error", 20))[-1]
        assert error.error.event_id == "evt_late" and error.error.param == "item.call_id"
