"""OpenAI's own Agents SDK for JavaScript (`@openai/agents-realtime`, its `RealtimeSession` over the
`OpenAIRealtimeWebRTC` transport) talks to our server from a real browser.

The page in tests/agents_js/ is what a developer writes for OpenAI's Realtime API, with only the
base URL changed. It loads the SDK's published browser bundle (installed from npm by `npm ci` in
tests/agents_js, done here when missing), connects through Chromium's WebRTC stack, and speaks
through a fake microphone that plays an espeak-ng sentence. Checked: the SDK connects (session
config acknowledged), our server hears and transcribes the speech, the SDK's history holds the
user's transcript and the agent's reply transcript, the page hears the reply audio, a typed
follow-up on the same session gets a second reply with the history kept in order, and closing
the session ends the call on the server.

As in test_browser_call.py, the server and Chromium run inside a network namespace that has only
loopback (`unshare -n`). Skipped, with the reason, where node/npm, Chromium or network namespaces
are missing; under CI=true that is a failure instead.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

import speechkit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP_DIR = HERE / "agents_js"
SDK_BUNDLE = APP_DIR / "node_modules" / "@openai" / "agents-realtime" / "dist" / "bundle"
SENTENCE = "What is the capital of France?"
TYPED = "Please say hello."
WEATHER_QUESTION = "What is the weather in Paris?"
API_KEY = "agents-js-test-key"
AUDIBLE_FRAMES = 10  # 20 ms analyser ticks above the page's RMS threshold
# Our server's own session fields, passed by the page as the SDK's `providerData`: the random tiny
# checkpoint never stops speaking by itself (cap its frames per sentence), and SmolLM2 is only
# reliable on facts when greedy.
FOR_THE_TINY_MODELS = {"temperature": 0.0, "sampling": {"max_new_tokens": 30, "seed": 1}}


# ---------------------------------------------------------------------------- the pytest side
def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_or_fail(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"the Agents SDK browser test must run in CI, but: {reason}")
    pytest.skip(reason)


def _ensure_sdk() -> None:
    """The SDK comes from npm, pinned by tests/agents_js/package-lock.json."""
    if (SDK_BUNDLE / "openai-realtime-agents.umd.js").exists():
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        _skip_or_fail("node/npm are missing (apt-get install nodejs npm), so @openai/agents-realtime cannot be installed")
    proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(APP_DIR)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not (SDK_BUNDLE / "openai-realtime-agents.umd.js").exists():
        pytest.fail(f"npm ci in {APP_DIR} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _run_harness(tmp_path: Path) -> dict:
    from test_browser_call import _unavailable

    reason = _unavailable()
    if reason is not None:
        _skip_or_fail(reason)
    _ensure_sdk()
    report_path = tmp_path / "report.json"
    inner = (f"ip link set lo up; exec {sys.executable} {__file__} --out {report_path} --workdir {tmp_path}")
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", inner], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "HF_HUB_OFFLINE": "1",
                                 "SE_AVOID_STATS": "true"})
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the Agents SDK harness timed out; its output:\n{output[-4000:]}")
    assert report_path.exists(), f"no report (exit {proc.returncode}); output:\n{output[-4000:]}"
    report = json.loads(report_path.read_text())
    print(json.dumps(report, indent=1)[:6000])
    assert report.get("error") is None, f"{report.get('error')}\n{report.get('browser_log')}\n{output[-4000:]}"
    return report


def _messages(history: list[dict], role: str) -> list[str]:
    """The text (transcript) of each message item of `role` in the SDK's history, in order."""
    return [" ".join(c["text"] or "" for c in item["content"]).strip()
            for item in history if item["type"] == "message" and item["role"] == role]


@pytest.fixture(scope="module")
def agents_report(tmp_path_factory):
    """One harness run (server, Chromium, both transports) shared by the tests below."""
    return _run_harness(tmp_path_factory.mktemp("agents-js"))


@pytest.mark.e2e
def test_agents_sdk_voice_session_in_the_browser(agents_report):
    report = agents_report
    page = report["page"]
    assert page["phase"] == "connected" and not page["errors"], page["errors"]
    assert page["callId"] and page["callId"] == report["server"]["call_id"]  # from our Location header
    assert "session.update" in page["clientEvents"] and "session.updated" in page["serverEvents"]
    # The spoken turn: our server transcribed the fake mic, and the SDK's history shows it.
    heard = report["server"]["user_transcripts"]
    assert heard and speechkit.wer(SENTENCE, heard[0]) <= 0.25, heard
    users = _messages(page["history"], "user")
    assert users[0] == heard[0], page["history"]
    # The reply: its transcript in the history (the real LLM), its audio heard by the page.
    assistants = _messages(page["history"], "assistant")
    assert len(assistants) >= 2 and all(assistants), page["history"]
    assert "paris" in assistants[0].lower(), assistants
    assert page["maxRms"] > 0.01 and page["audibleFrames"] >= AUDIBLE_FRAMES, page
    # The typed follow-up on the same session: a second reply, heard, and the history kept in order.
    assert users[1] == TYPED, users
    assert page["audibleAfterText"] >= AUDIBLE_FRAMES, page
    roles = [item["role"] for item in page["history"] if item["type"] == "message"]
    assert roles == ["user", "assistant", "user", "assistant"], page["history"]
    assert report["server"]["history_roles"][:4] == roles
    # The SDK's close() ends the call on the server (it sends no DELETE; the peer connection closes).
    assert report["server"]["close_reason"] == "connection_closed" and report["server"]["calls_after_close"] == 0


@pytest.mark.e2e
def test_agents_sdk_websocket_session_in_the_browser(agents_report):
    """The SDK's WebSocket transport from the browser: the key travels as a subprotocol."""
    page = agents_report["ws_page"]
    assert page["phase"] == "connected" and not page["errors"] and not page["serverErrors"], page
    assert agents_report["ws_sessions_open"] == 1
    assert _messages(page["history"], "user") == [SENTENCE]
    replies = _messages(page["history"], "assistant")
    assert len(replies) == 1 and "paris" in replies[0].lower(), page["history"]
    assert page["audioBytes"] / 2 / 24_000 > 0.3, page["audioBytes"]  # PCM16 at 24 kHz, in `audio` events
    assert "response.output_audio.delta" in page["serverEvents"]
    assert agents_report["ws_sessions_after_close"] == 0


@pytest.mark.e2e
def test_agents_sdk_runs_a_tool_in_the_page_and_speaks_its_result(agents_report):
    """The SDK's own tool loop: our function_call events -> the page's tool() execute -> the
    function_call_output and response.create it sends -> a reply that uses the result."""
    page = agents_report["tool_page"]
    assert page["phase"] == "connected" and not page["errors"] and not page["serverErrors"], page
    assert page["toolCalls"] and page["toolCalls"][0], page["toolCalls"]
    calls = [i for i in page["history"] if i["type"] == "function_call"]
    assert calls[0]["name"] == "get_weather" and "21" in (calls[0]["output"] or ""), calls
    kinds = page["serverEvents"]
    for expected in ("response.output_item.added", "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done", "response.done"):
        assert expected in kinds, (expected, kinds)
    # The SDK sent the output itself (its response.create goes out beside the page's sendEvent hook).
    assert page["clientEvents"].count("conversation.item.create") == 2, page["clientEvents"]  # question, output
    assert kinds.count("response.done") >= 2  # the call, then the reply that uses its output
    reply = _messages(page["history"], "assistant")[-1]
    assert "21" in reply or "sunny" in reply.lower(), page["history"]
    assert page["audioBytes"] / 2 / 24_000 > 0.3, page["audioBytes"]


# ---------------------------------------------------------------------------- the harness side
async def _start_server(workdir: Path):
    """The product's server (`server.app.create_app`) with a key set, plus the test page's routes."""
    from aiohttp import web

    from engine.fish.tiny import make_tiny_checkpoint
    from server.app import create_app
    from server.settings import Settings

    checkpoint = make_tiny_checkpoint(workdir / "tiny-s1-mini", "s1-mini", seed=0)
    settings = Settings(checkpoint=str(checkpoint), device="cpu", data_dir=workdir / "data", api_key=API_KEY,
                        rtc_liveness_timeout=4.0)
    app = create_app(settings)
    app.router.add_get("/agents-test/", lambda _: web.FileResponse(APP_DIR / "index.html"))
    app.router.add_get("/agents-test/client.js", lambda _: web.FileResponse(APP_DIR / "client.js"))
    app.router.add_static("/agents-test/sdk/", SDK_BUNDLE)
    from server import scopes

    for path in ("/agents-test/", "/agents-test/client.js", "/agents-test/sdk"):
        scopes.ROUTES[path] = scopes.PUBLIC  # the test page, public like the product's own page (unlisted fails closed)
    runner = web.AppRunner(app)
    await runner.setup()  # loads the models
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def _scenario(runner, base_url: str, page, report: dict) -> None:
    from signaling.routes import CALLS

    calls = runner.app[CALLS].calls
    t0 = time.monotonic()
    await page.open(f"{base_url}/agents-test/?" + urllib.parse.urlencode({"key": API_KEY,
                                                                          "provider_data": json.dumps(FOR_THE_TINY_MODELS)}))
    await page.until("window.agentsTest.state.phase === 'connected'", 20)
    report["t_connected"] = round(time.monotonic() - t0, 2)
    call_id, call = next(iter(calls.items()))
    report["server"] = {"call_id": call_id}
    state = "window.agentsTest.state"
    assistant_done = (f"{state}.history.filter(i => i.role === 'assistant' && i.status === 'completed'"
                      f" && i.content.some(c => c.text)).length")
    await page.until(f"{assistant_done} >= 1 && {state}.audibleFrames >= {AUDIBLE_FRAMES}", 40)
    report["t_spoken_turn_answered"] = round(time.monotonic() - t0, 2)
    await page.run(page.driver.execute_script, f"window.agentsTest.sendText({json.dumps(TYPED)});")
    await page.until(f"{assistant_done} >= 2 && {state}.audibleAfterText >= {AUDIBLE_FRAMES}", 40)
    report["t_typed_turn_answered"] = round(time.monotonic() - t0, 2)
    report["page"] = await page.run(page.driver.execute_script, f"return {state};")
    report["server"]["user_transcripts"] = [m["content"] for m in call.conversation.history if m["role"] == "user"]
    report["server"]["history_roles"] = [m["role"] for m in call.conversation.history]
    await page.run(page.driver.execute_script, "window.agentsTest.close();")
    await asyncio.wait_for(call.closed.wait(), 15)
    report["server"]["close_reason"] = call.close_reason
    report["server"]["calls_after_close"] = len(calls)
    await _websocket_scenario(runner, base_url, page, report)


async def _websocket_scenario(runner, base_url: str, page, report: dict) -> None:
    """The same page on the SDK's WebSocket transport: key in the subprotocol, a typed turn."""
    from signaling.routes import CALLS

    registry = runner.app[CALLS]
    state = "window.agentsTest.state"
    await page.open(f"{base_url}/agents-test/?" + urllib.parse.urlencode({
        "key": API_KEY, "transport": "websocket", "provider_data": json.dumps(FOR_THE_TINY_MODELS)}))
    await page.until(f"{state}.phase === 'connected' || {state}.phase === 'error'", 20)
    report["ws_sessions_open"] = registry.active
    await page.run(page.driver.execute_script, f"window.agentsTest.sendText({json.dumps(SENTENCE)});")
    await page.until(f"{state}.history.filter(i => i.role === 'assistant' && i.status === 'completed'"
                     f" && i.content.some(c => c.text)).length >= 1", 40)
    report["ws_page"] = await page.run(page.driver.execute_script, f"return {state};")
    await page.run(page.driver.execute_script, "window.agentsTest.close();")
    deadline = time.monotonic() + 10
    while registry.active and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    report["ws_sessions_after_close"] = registry.active
    await _tool_scenario(runner, base_url, page, report)


async def _tool_scenario(runner, base_url: str, page, report: dict) -> None:
    """A tool() in the page, forced for the first reply: the SDK runs it and the agent answers with it."""
    state = "window.agentsTest.state"
    forced = {**FOR_THE_TINY_MODELS, "tool_choice": {"type": "function", "name": "get_weather"}}
    await page.open(f"{base_url}/agents-test/?" + urllib.parse.urlencode({
        "key": API_KEY, "transport": "websocket", "tools": "1", "provider_data": json.dumps(forced)}))
    await page.until(f"{state}.phase === 'connected' || {state}.phase === 'error'", 20)
    await page.run(page.driver.execute_script, f"window.agentsTest.sendText({json.dumps(WEATHER_QUESTION)});")
    await page.until(f"{state}.toolCalls.length >= 1 && {state}.history.some((i, n) => i.role === 'assistant' &&"
                     f" i.status === 'completed' && i.content.some(c => c.text) &&"
                     f" {state}.history.slice(0, n).some(j => j.type === 'function_call'))", 60)
    report["tool_page"] = await page.run(page.driver.execute_script, f"return {state};")
    await page.run(page.driver.execute_script, "window.agentsTest.close();")


def _page(driver):
    from test_browser_call import Page

    class AgentsPage(Page):
        async def state(self) -> dict:
            return await self.run(self.driver.execute_script, "return window.agentsTest.state;")

    return AgentsPage(driver)


async def _harness(out: Path, workdir: Path) -> dict:
    from rtc_client import force_loopback_ice
    from test_browser_call import _chrome, _write_wav

    force_loopback_ice()  # the namespace has only lo, which aioice skips by default
    wav = workdir / "mic.wav"
    # The lead-in covers page load and connection set-up before the sentence starts.
    pcm, _ = speechkit.speech_with_gaps([4.0, SENTENCE, 3.0])
    _write_wav(wav, pcm)
    report: dict = {"error": None}
    runner, base_url = await _start_server(workdir)
    page = None
    try:
        page = _page(await asyncio.get_running_loop().run_in_executor(None, lambda: _chrome(wav, workdir / "profile")))
        await _scenario(runner, base_url, page, report)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which prints it
        report["error"] = f"{type(exc).__name__}: {exc}"
        if page is not None:
            try:
                report["page"] = await page.run(page.driver.execute_script, "return window.agentsTest?.state;")
                logs = await page.run(page.driver.get_log, "browser")
                report["browser_log"] = [entry["message"] for entry in logs][-20:]
            except Exception:  # noqa: BLE001
                pass
    finally:
        if page is not None:
            await page.quit()
        await runner.cleanup()
    out.write_text(json.dumps(report, default=str))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Agents SDK browser harness (run by the test inside unshare -n)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.mkdtemp()))
    args = parser.parse_args()
    result = asyncio.run(_harness(args.out, args.workdir))
    print(json.dumps(result, default=str)[:3000])
