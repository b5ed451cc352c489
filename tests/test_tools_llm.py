"""Function calling in both agent LLM backends: the embedded llama.cpp model (grammar-constrained
for "required" and a named tool_choice) and llama.cpp's own OpenAI-compatible server through the
passthrough backend; tool definitions checked with jsonschema; one constrained retry of a call
whose arguments do not validate."""
from __future__ import annotations

import asyncio
import json

import hypothesis
import hypothesis.strategies
import pytest

from engine.agent.conversation.tool_calls import CallReady, CallStarted, with_tool_calls, without_tool_markup
from engine.agent.llm.embedded import CallScanner, parse_calls
from engine.agent.llm.openai_compat import OpenAICompatLLM
from engine.agent.reply_stream import ReplyError
from engine.agent.tools import (ToolChoice, ToolConfigError, ToolCallDelta, argument_problem, check_choice,
                                parse_tool_choice, parse_tools)
from llmkit import FaultyEndpoint, LlamaServer, llama_server_missing
from test_llm import embedded, needs_llama  # noqa: F401 - the shared embedded model fixture

TOOLS = parse_tools([
    {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                    "required": ["city", "unit"], "additionalProperties": False}},
    {"type": "function", "name": "book_table", "description": "Book a restaurant table.",
     "parameters": {"type": "object", "properties": {"people": {"type": "integer", "minimum": 1},
                                                     "time": {"type": "string"}},
                    "required": ["people", "time"]}},
])
ASK = [{"role": "system", "content": "You are a helpful assistant."},
       {"role": "user", "content": "What is the weather in Paris?"}]
ANSWERED = ASK + [
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees celsius."}]


def calls_of(items) -> dict[int, dict]:
    """Streamed ToolCallDeltas gathered per call index."""
    calls: dict[int, dict] = {}
    for item in items:
        if isinstance(item, ToolCallDelta):
            call = calls.setdefault(item.index, {"name": None, "arguments": ""})
            call["name"] = call["name"] or item.name
            call["arguments"] += item.arguments
    return calls


# ---------------------------------------------------------------- definitions
def test_tool_definitions_and_choices_are_checked():
    assert [t.name for t in TOOLS] == ["get_weather", "book_table"]
    for raw, param in [([{"type": "function"}], "tools[0].name"),
                       ([{"type": "function", "name": "x" * 65}], "tools[0].name"),
                       ([{"type": "function", "name": "a.b"}], "tools[0].name"),
                       ([{"type": "web_search", "name": "a"}], "tools[0].type"),
                       ([{"type": "function", "name": "a"}, {"type": "function", "name": "a"}], "tools[1].name"),
                       ([{"type": "function", "name": "a", "parameters": "{}"}], "tools[0].parameters"),
                       ([{"type": "function", "name": "a", "parameters": {"type": "object", "required": 5}}],
                        "tools[0].parameters"),
                       ({"name": "a"}, "tools")]:
        with pytest.raises(ToolConfigError) as refused:
            parse_tools(raw)
        assert refused.value.param == param, raw
    # The Chat Completions nesting is taken too, and parameters default to an empty object.
    nested = parse_tools([{"type": "function", "function": {"name": "ping"}}])[0]
    assert nested.name == "ping" and nested.parameters == {"type": "object", "properties": {}}
    assert parse_tool_choice({"type": "function", "name": "book_table"}, TOOLS) == ToolChoice("function", "book_table")
    with pytest.raises(ToolConfigError) as refused:
        parse_tool_choice({"type": "function", "name": "nope"}, TOOLS)
    assert refused.value.param == "tool_choice.name"
    with pytest.raises(ToolConfigError):
        check_choice(ToolChoice("required"), ())
    weather = TOOLS[0]
    assert argument_problem(weather, '{"city": "Oslo", "unit": "celsius"}') is None
    assert "not JSON" in argument_problem(weather, '{"city": ')
    assert "schema" in argument_problem(weather, '{"city": "Oslo", "unit": "kelvin"}')
    assert "schema" in argument_problem(weather, '{"city": "Oslo"}')
    assert "not configured" in argument_problem(None, "{}")


def test_call_scanner_passes_text_and_holds_back_call_tags():
    scanner = CallScanner()
    said = [scanner.feed(piece) for piece in ["Let me ", "check. <", "tool", "_call>{\"name\": ",
                                              "\"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>"]]
    assert "".join(said) + scanner.flush() == "Let me check. "
    assert said[1] == "check. "  # the "<" waits until it is clearly not a tag
    assert list(parse_calls(scanner.calls)) == [("get_weather", '{"city": "Oslo"}')]
    plain = CallScanner()
    assert plain.feed("a < b") + plain.flush() == "a < b" and plain.calls == ""


# ---------------------------------------------------------------- embedded llama.cpp
@needs_llama
async def test_embedded_named_tool_choice_always_gives_schema_valid_arguments(embedded):  # noqa: F811
    for question in ("What is the weather in Paris?", "Tell me a joke.", "Book a table for four at 8 pm."):
        messages = [ASK[0], {"role": "user", "content": question}]
        items = [i async for i in embedded.stream_chat(messages, max_tokens=80, temperature=0.0, tools=TOOLS,
                                                       tool_choice=ToolChoice("function", "get_weather"))]
        calls = calls_of(items)
        assert list(calls) == [0] and calls[0]["name"] == "get_weather"
        assert sum(isinstance(i, ToolCallDelta) and bool(i.arguments) for i in items) > 3  # streamed
        assert argument_problem(TOOLS[0], calls[0]["arguments"]) is None, calls[0]


@needs_llama
async def test_embedded_required_calls_one_of_the_tools_with_valid_arguments(embedded):  # noqa: F811
    items = [i async for i in embedded.stream_chat(ASK, max_tokens=80, temperature=0.0, tools=TOOLS,
                                                   tool_choice=ToolChoice("required"))]
    calls = calls_of(items)
    assert len(calls) == 1
    tool = next(t for t in TOOLS if t.name == calls[0]["name"])
    assert argument_problem(tool, calls[0]["arguments"]) is None, calls[0]


@needs_llama
async def test_embedded_answers_with_the_tool_output(embedded):  # noqa: F811
    items = [i async for i in embedded.stream_chat(ANSWERED, max_tokens=60, temperature=0.0, tools=TOOLS)]
    text = "".join(i for i in items if isinstance(i, str))
    assert not calls_of(items) and ("21" in text or "sunny" in text.lower()), text


# ---------------------------------------------------------------- llama.cpp's OpenAI-compatible server
@pytest.fixture(scope="module")
def llama_server():
    if (why := llama_server_missing()) is not None:
        pytest.skip(why)
    server = LlamaServer().start()
    yield server
    server.stop()


async def test_openai_compat_passes_tools_through_and_streams_the_call(llama_server):
    llm = OpenAICompatLLM(llama_server.base_url, "smollm2")
    try:
        items = [i async for i in llm.stream_chat(ASK, max_tokens=80, temperature=0.0, tools=TOOLS,
                                                  tool_choice=ToolChoice("function", "get_weather"))]
        calls = calls_of(items)
        assert list(calls) == [0] and calls[0]["name"] == "get_weather"
        assert argument_problem(TOOLS[0], calls[0]["arguments"]) is None, calls[0]
        first = next(i for i in items if isinstance(i, ToolCallDelta))
        assert first.call_id  # the server's own call id
        # The output goes back as a `tool` message after the assistant's tool_calls.
        reply = "".join([i async for i in llm.stream_chat(ANSWERED, max_tokens=60, temperature=0.0)
                         if isinstance(i, str)])
        assert "21" in reply or "sunny" in reply.lower(), reply
    finally:
        await llm.aclose()


async def _collect_calls(llm, choice: ToolChoice) -> list[object]:
    def stream(override):
        return llm.stream_chat(ASK, max_tokens=80, temperature=0.0, tools=TOOLS, tool_choice=override or choice)

    ids = iter(range(1, 100))
    return [item async for item in with_tool_calls(stream, TOOLS, lambda: f"call_{next(ids)}")]


async def test_invalid_arguments_get_one_constrained_retry(llama_server):
    faulty = await FaultyEndpoint(upstream=llama_server.base_url).start()
    faulty.behaviour = "broken_tool_call_once"  # cut-off JSON first, then the real server
    llm = OpenAICompatLLM(faulty.base_url, "smollm2")
    try:
        items = await _collect_calls(llm, ToolChoice("auto"))
        ready = [i for i in items if isinstance(i, CallReady)]
        assert faulty.requests == 2 and len(ready) == 1
        assert ready[0].name == "get_weather" and ready[0].call_id == "call_x"
        assert argument_problem(TOOLS[0], ready[0].arguments) is None
        assert "".join(ready[0].deltas) == ready[0].arguments
        assert isinstance(items[0], CallStarted) and items[0].call_id == "call_x"

        faulty.behaviour, faulty.requests = "broken_tool_call", 0  # the retry is broken too: a clear failure
        with pytest.raises(ReplyError) as failed:
            await _collect_calls(llm, ToolChoice("auto"))
        assert failed.value.code == "invalid_tool_call" and "not JSON" in str(failed.value)
        assert faulty.requests == 2  # one retry, no more
    finally:
        await llm.aclose()
        await faulty.stop()


TOOL_MARKUP_TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                    '</tool_call> It is sunny, 3 < 4 and <b>bold</b> stays.')


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(cuts=hypothesis.strategies.lists(
    hypothesis.strategies.integers(0, len(TOOL_MARKUP_TEXT)), max_size=12))
def test_tool_markup_is_left_out_of_spoken_text_however_the_stream_splits_it(cuts):
    bounds = [0, *sorted(cuts), len(TOOL_MARKUP_TEXT)]
    pieces = [TOOL_MARKUP_TEXT[a:b] for a, b in zip(bounds, bounds[1:])]

    async def stream():
        for piece in pieces:
            yield piece

    async def collect():
        return [item async for item in without_tool_markup(stream())]

    out = asyncio.run(collect())
    assert "".join(out) == "Let me check.  It is sunny, 3 < 4 and <b>bold</b> stays."
    assert all(out)  # no empty deltas


def test_an_unclosed_tool_call_block_is_dropped_to_the_end():
    async def stream():
        for piece in ["Sure", ". <tool_", "call>{\"name\": ", "\"x\"}"]:
            yield piece

    async def collect():
        return "".join([item async for item in without_tool_markup(stream())])

    assert asyncio.run(collect()) == "Sure. "
