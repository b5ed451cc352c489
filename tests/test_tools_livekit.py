"""LiveKit Agents' own tool machinery against our server: an `Agent` with a `@function_tool`, run by
`AgentSession` over `livekit-plugins-openai`'s RealtimeModel (no LiveKit server needed, as in
test_livekit_realtime). The plugin turns our function_call events into its FunctionCall, LiveKit
runs the tool, sends the output back and asks for the reply, which uses it."""
from __future__ import annotations

import asyncio

import pytest

from test_livekit_realtime import API_KEY, FOR_THE_TINY_MODELS, server  # noqa: F401 - the app fixture

lk_openai = pytest.importorskip("livekit.plugins.openai")
from livekit.agents import Agent, AgentSession, function_tool  # noqa: E402


async def test_function_tool_is_called_and_its_result_is_spoken(server):  # noqa: F811
    calls: list[str] = []
    agent_ref: list[Agent] = []

    @function_tool
    async def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        # The session forced this tool for the question; the reply after it may answer freely.
        agent_ref[0].realtime_llm_session.send_event({"type": "session.update",
                                                      "session": {"type": "realtime", "tool_choice": "auto"}})
        return "Sunny, 21 degrees celsius."

    agent = Agent(instructions="You are a helpful assistant. Answer in one short sentence.", tools=[get_weather])
    agent_ref.append(agent)
    model = lk_openai.realtime.RealtimeModel(base_url=f"{server.base_url}/v1", api_key=API_KEY)
    async with AgentSession(llm=model) as session:
        await session.start(agent)
        agent.realtime_llm_session.send_event(FOR_THE_TINY_MODELS)
        agent.realtime_llm_session.send_event({"type": "session.update", "session": {
            "type": "realtime", "tool_choice": {"type": "function", "name": "get_weather"}}})
        result = await asyncio.wait_for(session.run(user_input="What is the weather in Paris?"), 180)
    kinds = [e.type for e in result.events]
    assert calls and isinstance(calls[0], str) and calls[0], (calls, kinds)
    call = next(e.item for e in result.events if e.type == "function_call")
    output = next(e.item for e in result.events if e.type == "function_call_output")
    assert call.name == "get_weather" and output.call_id == call.call_id and "21" in output.output
    replies = [e.item.text_content for e in result.events if e.type == "message" and e.item.role == "assistant"]
    assert replies and ("21" in replies[-1] or "sunny" in replies[-1].lower()), (replies, kinds)
    await model.aclose()
