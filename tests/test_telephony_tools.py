"""Tools on phone calls: the server runs the model's tool calls through webhooks.

The tools file and its errors are checked alone; then a faithful Twilio carrier (tests/phone_peer.py)
calls the real server (silero, whisper tiny.en, the embedded SmolLM2, the TTS engine on a tiny
random checkpoint) whose tools file points at a real local aiohttp webhook server. A named
tool_choice makes SmolLM2 call the tool under a grammar, so each call is deterministic.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from engine.agent.conversation.events import FunctionCallDone, ResponseCreated, ResponseDone, UserSpeechStarted
from engine.agent.llm.base import ChatOptions
from engine.agent.tools import argument_problem
from phone_peer import CarrierPeer, of_type, phone_call, phone_line, wait_event, wait_until
from rtc_client import LocalServer
from signaling import TelephonyConfig
from signaling.server_tools import ToolsFileError, load_server_tools

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How is the weather in Paris?"
FORECAST = "Sunny, 21 degrees celsius."
SECRET = "hook-secret-42"
PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}


def weather_tool(name: str, url: str, **run) -> dict:
    return {"type": "function", "name": name, "description": "The current weather in a city.",
            "parameters": PARAMETERS, "url": url, **run}


# --------------------------------------------------------------------------- the tools file alone
def write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_tools_file_json_and_yaml_with_defaults_and_env_secrets(tmp_path):
    good = write(tmp_path / "tools.json", {
        "tool_choice": {"type": "function", "name": "get_weather"}, "timeout": 2,
        "headers": {"Authorization": "Bearer ${HOOK_SECRET}"},
        "tools": [weather_tool("get_weather", "http://127.0.0.1:9/w"),
                  weather_tool("book_table", "https://example.com/book", timeout=10, headers={"X-App": "a"})]})
    tools = load_server_tools(good, {"HOOK_SECRET": SECRET})
    assert [t.name for t in tools.tools] == ["get_weather", "book_table"]
    assert tools.tool_choice.mode == "function" and tools.tool_choice.name == "get_weather"
    weather, book = tools.webhooks
    assert weather.timeout == 2.0 and weather.headers == {"Authorization": f"Bearer {SECRET}"}
    assert book.timeout == 10.0 and book.headers == {"Authorization": f"Bearer {SECRET}", "X-App": "a"}
    assert tools.tools[0].wire() == {k: v for k, v in weather_tool("get_weather", "").items() if k != "url"}
    yaml_file = write(tmp_path / "tools.yaml", "- type: function\n  name: hang_up\n  url: http://127.0.0.1:9/h\n")
    assert load_server_tools(yaml_file, {}).tools[0].name == "hang_up"
    # A call narrows them: fewer tools, its own choice; the file's named choice falls back to auto.
    narrowed = tools.narrowed(["book_table"])
    assert [t.name for t in narrowed.tools] == ["book_table"] and narrowed.tool_choice.mode == "auto"
    assert tools.narrowed(["get_weather"], "none").tool_choice.mode == "none"
    with pytest.raises(ValueError, match="no server tool named 'nope'"):
        tools.narrowed(["nope"])
    with pytest.raises(ValueError, match="tool_choice.name"):
        tools.narrowed(["book_table"], "get_weather")


@pytest.mark.parametrize("content, message", [
    ({"tools": [{"type": "function", "name": "f"}]}, r"tools\[0\].url: each tool needs"),
    ([weather_tool("f", "ftp://example.com/x")], r"tools\[0\].url: must be an http"),
    ([weather_tool("has space", "http://h/x")], r"tools\[0\].name"),
    ([{**weather_tool("f", "http://h/x"), "parameters": {"type": "object", "properties": 3}}],
     r"tools\[0\].parameters: not a valid JSON Schema"),
    ({"tools": [weather_tool("f", "http://h/x")], "tool_choice": {"type": "function", "name": "g"}},
     "tool_choice.name: no tool named 'g'"),
    ([weather_tool("f", "http://h/x", timeout=0)], r"tools\[0\].timeout: must be a number"),
    ([weather_tool("f", "http://h/x", headers={"X-Key": "${NOT_SET_ANYWHERE}"})], r"NOT_SET_ANYWHERE.*not set"),
    ({"tools": [], "extra": 1}, "unknown fields"),
    ({"tools": []}, "tools: must be a non-empty list"),
    ("{not json", "not valid JSON"),
])
def test_bad_tools_file_is_refused_naming_file_and_field(tmp_path, content, message):
    path = write(tmp_path / "tools.json", content)
    with pytest.raises(ToolsFileError, match=message) as error:
        load_server_tools(path, {})
    assert str(path) in str(error.value)


def test_server_start_up_fails_clearly_on_a_bad_tools_file(tmp_path):
    from server.app import create_app
    from server.settings import Settings

    missing = tmp_path / "absent.yaml"
    with pytest.raises(ToolsFileError, match="absent.yaml: cannot be read"):
        create_app(Settings(data_dir=tmp_path / "data", telephony_tools=missing))
    bad = write(tmp_path / "bad.json", [{"type": "function", "name": "get_weather"}])
    proc = subprocess.run([sys.executable, "-m", "server", "serve", "--telephony-tools", str(bad), "--port", "0",
                           "--data-dir", str(tmp_path / "data")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"tools file {bad}: tools[0].url: each tool needs the http(s) URL of its webhook" in proc.stderr


# --------------------------------------------------------------------------- calls
class Webhooks:
    """A real HTTP service that the tools point at; records each request with its arrival time."""

    def __init__(self) -> None:
        self.requests: list[dict] = []  # {"path", "t", "t_answered", "headers", "body"}
        self.slow_seconds = 3.0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        record = {"path": request.path, "t": time.monotonic(), "headers": dict(request.headers),
                  "body": await request.json(), "t_answered": None}
        self.requests.append(record)
        if request.path == "/broken":
            record["t_answered"] = time.monotonic()
            return web.Response(status=500, text="database down")
        if request.path == "/slow":
            await asyncio.sleep(self.slow_seconds)
        record["t_answered"] = time.monotonic()
        return web.json_response({"forecast": FORECAST})

    async def start(self) -> Webhooks:
        app = web.Application()
        app.router.add_post("/{name}", self.handle)
        # A request the server gave up on (timeout, barge-in) stops here too, and shutdown is quick.
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self


@pytest.fixture
async def hooks():
    service = await Webhooks().start()
    yield service
    await service.runner.cleanup()


@pytest.fixture
async def server(models, hooks, tmp_path):
    tools_file = tmp_path / "tools.yaml"
    tools_file.write_text(json.dumps({  # JSON is YAML too
        "tool_choice": {"type": "function", "name": "get_weather"},
        "headers": {"Authorization": "Bearer ${HOOK_SECRET}"},
        "tools": [weather_tool("get_weather", hooks.url + "/weather"),
                  weather_tool("broken_weather", hooks.url + "/broken"),
                  weather_tool("slow_weather", hooks.url + "/slow", timeout=0.5),
                  weather_tool("stuck_weather", hooks.url + "/slow", timeout=20)]}))
    tools = load_server_tools(tools_file, {"HOOK_SECRET": SECRET})
    srv = await LocalServer(models, telephony=TelephonyConfig(tools=tools, liveness_timeout=3.0)).start()
    yield srv
    await srv.stop()


@pytest.fixture
async def dial(server):
    peers: list[CarrierPeer] = []

    async def place(**query) -> tuple[CarrierPeer, object]:
        peer = CarrierPeer(server.base_url, "twilio")
        peers.append(peer)
        status, body = await peer.dial({"mode": "agent", "max_new_tokens": 24, **query})
        assert status == 200, body
        await peer.connect()
        await wait_until(lambda: phone_call(server, peer) is not None, 10, "the call to register")
        call = phone_call(server, peer)
        call.conversation.update(chat=ChatOptions(temperature=0.0, max_tokens=60))  # SmolLM2, greedy
        return peer, call

    yield place
    for peer in peers:
        await peer.close()


def timeline(call, t0: float, hooks: Webhooks) -> list[str]:
    """The call's events and the webhook's requests in time order (ms after t0), for the report."""
    rows = [(e.t, type(e).__name__ + (f"({e.name})" if isinstance(e, FunctionCallDone) else "")
             + (f"[{e.status}]" if isinstance(e, ResponseDone) else ""))
            for e in call.events if type(e).__name__ not in ("ResponseTextDelta",)]
    for r in hooks.requests:
        rows += [(r["t"], f"webhook {r['path']} called"), (r["t_answered"] or r["t"], f"webhook {r['path']} answered")]
    return [f"{1000 * (t - t0):6.0f} ms  {name}" for t, name in sorted(rows) if t >= t0]


async def test_spoken_question_runs_the_webhook_and_the_caller_hears_the_answer(dial, hooks):
    peer, call = await dial()
    peer.say(phone_line(QUESTION))
    t_voice_end = await peer.voice_ended()
    done_call = await wait_event(call, FunctionCallDone, timeout=60)
    assert done_call.name == "get_weather"
    await wait_until(lambda: hooks.requests, 20, "the webhook to be called")
    request = hooks.requests[0]
    # The webhook got the documented body: the call, schema-valid parsed arguments, the carrier's call.
    assert request["path"] == "/weather" and request["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = request["body"]
    assert body["call_id"] == done_call.call_id and body["name"] == "get_weather"
    assert isinstance(body["arguments"], dict) and body["arguments"]["city"]
    assert argument_problem(call.conversation.tools[0], json.dumps(body["arguments"])) is None, body["arguments"]
    session = body["session"]
    assert session["carrier"] == "twilio" and session["call_id"] == peer.call_sid
    assert session["stream_id"] == peer.stream_sid and session["id"] == call.id
    assert "token" not in session["parameters"] and session["parameters"]["mode"] == "agent"

    # The server adds the output and answers by itself: a second response, spoken to the caller.
    first = next(e for e in of_type(call, ResponseCreated))
    follow_up = await wait_event(call, ResponseDone, lambda e: e.response_id != first.response_id, timeout=90)
    assert follow_up.status == "completed" and follow_up.audio_seconds > 0.3, follow_up
    items = call.conversation.items()
    kinds = [(i.type, i.role) for i in items]
    assert kinds[:3] == [("message", "user"), ("function_call", "assistant"), ("function_call_output", "tool")], kinds
    assert json.loads(items[2].text) == {"forecast": FORECAST} and items[2].call_id == done_call.call_id
    assert kinds[3] == ("message", "assistant") and items[3].text == follow_up.transcript
    assert "21" in follow_up.transcript, follow_up.transcript  # the reply uses the tool's output
    print("reply:", follow_up.transcript)
    print("heard:", items[0].text)
    # The caller heard nothing before the tool answered, and reply audio after it.
    t_answered = request["t_answered"]
    assert peer.first_media(after=t_voice_end) >= t_answered
    await wait_until(lambda: peer.first_audible(after=t_answered) is not None, 30, "reply audio to play")
    assert call.tools.stats.runs == 1 and call.tools.stats.failures == 0 and call.tools.stats.follow_ups == 1
    assert call.close_reason is None and not peer.violations, peer.violations[:5]
    print("\n".join(["phone path (ms after the end of the caller's speech):", *timeline(call, t_voice_end, hooks)]))
    print(f"end of speech -> webhook called {1000 * (request['t'] - t_voice_end):.0f} ms; webhook answered -> "
          f"first reply media {1000 * (peer.first_media(after=t_answered) - t_answered):.0f} ms")


@pytest.mark.parametrize("tool, error", [("broken_weather", "HTTP 500"), ("slow_weather", "within 0.5 s")])
async def test_a_failing_webhook_still_gives_a_reply_and_keeps_the_call(dial, hooks, tool, error):
    # The call narrows the file's tools with its own parameters (as a TwiML <Parameter> would).
    peer, call = await dial(tools=tool, tool_choice=tool)
    assert [t.name for t in call.conversation.tools] == [tool]
    assert peer.parameters["tools"] == tool  # carried from the webhook to the stream
    await call.conversation.send_text(QUESTION)
    rid = (await wait_event(call, ResponseCreated, timeout=60)).response_id
    await wait_event(call, ResponseDone, lambda e: e.response_id != rid, timeout=90)
    output = next(i for i in call.conversation.items() if i.type == "function_call_output")
    assert error in json.loads(output.text)["error"], output.text
    follow_up = of_type(call, ResponseDone)[-1]
    assert follow_up.status == "completed" and follow_up.transcript and follow_up.audio_seconds > 0.3
    await wait_until(lambda: peer.first_audible() is not None, 30, "reply audio to play")
    assert call.tools.stats.failures == 1 and call.tools.runs[0].outcome == (
        "http_error" if tool == "broken_weather" else "timeout")
    assert call.close_reason is None and not peer.violations
    # The call goes on: the caller can ask again and is answered again.
    await call.conversation.send_text("And tomorrow?")
    await wait_until(lambda: len(of_type(call, ResponseDone)) >= 4, 90, "the second turn's answer")
    assert of_type(call, ResponseDone)[-1].status == "completed" and call.close_reason is None


async def test_barge_in_while_a_tool_runs_cancels_it_cleanly(dial, hooks):
    hooks.slow_seconds = 15.0
    peer, call = await dial(tools="stuck_weather", tool_choice="stuck_weather")
    await call.conversation.send_text(QUESTION)
    await wait_until(lambda: hooks.requests, 60, "the webhook to be called")
    assert call.tools.busy
    peer.say(phone_line("Never mind."))
    await wait_event(call, UserSpeechStarted, timeout=10)
    await wait_until(lambda: not call.tools.busy, 5, "the tool run to be cancelled")
    run = call.tools.runs[0]
    assert run.outcome == "cancelled" and call.tools.stats.cancelled == 1
    output = next(i for i in call.conversation.items() if i.type == "function_call_output")
    assert "caller spoke" in json.loads(output.text)["error"]
    assert call.tools.stats.follow_ups == 0  # nothing answers the abandoned call
    # The caller's new turn is answered (its own forced call starts the tool again), and the call lives.
    await wait_until(lambda: len(hooks.requests) >= 2, 60, "the new turn's tool call")
    assert call.close_reason is None and not peer.violations


async def test_unknown_tools_for_a_call_are_refused_at_the_webhook(server):
    peer = CarrierPeer(server.base_url, "twilio")
    try:
        status, body = await peer.dial({"mode": "agent", "tools": "get_weather,nope"})
        assert status == 400 and "no server tool named 'nope'" in body
        status, body = await peer.dial({"mode": "agent", "tools": "get_weather", "tool_choice": "broken_weather"})
        assert status == 400 and "tool_choice.name" in body
    finally:
        await peer.close()
