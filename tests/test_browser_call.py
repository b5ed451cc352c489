"""A real browser calls the agent through the real page.

Debian's headless Chromium, driven by Selenium, opens the page served by the server, presses
Call, and talks through a fake microphone that plays an espeak-ng sentence. Checked: the call
connects (Opus), the server transcribes what the fake mic said, the page shows that transcript,
and the page hears the reply (WebAudio analyser RMS above a threshold).

Everything (server, models, Chromium) runs in a network namespace that has only loopback
(`unshare -n`), so nothing can leave the machine: the test re-executes this file as a harness
inside the namespace and reads back a JSON report. Skipped, with the reason, only where Chromium
or network namespaces are unavailable, and never in CI (CI=true makes that a failure).
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
import wave
from pathlib import Path

import numpy as np
import pytest

import speechkit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SENTENCE = "What is the capital of France?"
TTS_TEXT = "Hello from the server."
VOICE_ID = "kitchen voice"
AUDIBLE_RMS = 0.01


# ---------------------------------------------------------------------------- the pytest side
def _unavailable() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip (util-linux, iproute2) are missing"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces are not permitted here: {probe.stderr.strip()}"
    return None


def _require_browser() -> None:
    reason = _unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"the browser test must run in CI, but: {reason}")
    pytest.skip(reason)


def _run_harness(scenario: str, tmp_path: Path) -> dict:
    _require_browser()
    report_path = tmp_path / "report.json"
    inner = (f"ip link set lo up; exec {sys.executable} {__file__} --harness {scenario} "
             f"--out {report_path} --workdir {tmp_path}")
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", inner], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "HF_HUB_OFFLINE": "1",
                                 "SE_AVOID_STATS": "true"})
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the browser harness timed out; its output:\n{output[-4000:]}")
    assert report_path.exists(), f"no report (exit {proc.returncode}); output:\n{output[-4000:]}"
    report = json.loads(report_path.read_text())
    print(json.dumps({k: v for k, v in report.items() if k != "events"}, indent=1))
    assert report.get("error") is None, f"{report.get('error')}\n{report.get('browser_log')}\n{output[-4000:]}"
    return report


@pytest.mark.e2e
def test_browser_call_through_the_page(tmp_path):
    report = _run_harness("call", tmp_path)
    page = report["page"]
    assert page["phase"] == "connected" and page["callId"], page
    assert report["server"]["answer_codecs"] == ["opus/48000/2"]
    assert report["server"]["inbound_format"] == ["s16", "stereo", 48000]
    heard = report["server"]["transcripts"]
    assert heard and speechkit.wer(SENTENCE, heard[0]) <= 0.25, heard
    assert heard[0] in page["userTranscripts"]  # the page received it...
    assert heard[0] in report["dom_transcript"]  # ...and shows it
    assert report["server"]["reply_audio_seconds"] > 0.3
    assert page["maxRms"] > AUDIBLE_RMS and page["audibleFrames"] >= 10, page  # the page heard the reply
    latency = page["latency"]  # the readout: end of speech -> first audio, server side and as heard
    assert 0 < latency["server_first_audio_ms"] < latency["heard_ms"] < 10_000, latency
    assert 0 < latency["tts_server_first_audio_ms"] < latency["tts_heard_ms"] < 10_000, latency
    assert TTS_TEXT in page["agentTranscripts"]  # the TTS box's text, spoken and shown
    assert not [e for e in page["errors"] if "denied" in e or "Cannot reach" in e], page["errors"]
    assert report["server"]["calls_after_hangup"] == 0
    assert report["server"]["close_reason"] == "hangup"


@pytest.mark.e2e
def test_browser_voice_upload_and_error_messages(tmp_path):
    report = _run_harness("page", tmp_path)
    assert f"“{VOICE_ID}” added" in report["upload_status"], report
    assert report["stored_voices"] == [VOICE_ID]
    assert report["call_voice"] == VOICE_ID and report["call_references"] == [SENTENCE]
    openai = report["openai_style"]
    assert openai["status"] == 201 and not openai["offerHadCandidates"], openai
    assert openai["state"] == "connected" and "session.created" in openai["events"], openai
    assert report["calls_after_openai_style"] == 0
    assert "Microphone access was denied" in report["mic_denied"], report
    assert report["calls_after_denied"] == 0
    assert "ended the call" in report["call_dropped"] or "dropped" in report["call_dropped"], report
    assert "Cannot reach the server" in report["server_down"], report


# ---------------------------------------------------------------------------- the harness side
def _write_wav(path: Path, pcm: np.ndarray, rate: int = 16_000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())


def _chrome(wav: Path, profile: Path, *, deny_mic: bool = False):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The fake UI grants the microphone; without it, --deny-permission-prompts refuses it.
    permission = "--deny-permission-prompts" if deny_mic else "--use-fake-ui-for-media-stream"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 permission, "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={wav}%noloop",
                 "--autoplay-policy=no-user-gesture-required", "--mute-audio",
                 "--allow-loopback-in-peer-connection",
                 "--disable-features=WebRtcHideLocalIpsWithMdns,Translate,MediaRouter,OptimizationHints",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
                 "--metrics-recording-only", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


class Page:
    """The Selenium-driven page, with blocking calls moved off the event loop (the server runs on it)."""

    def __init__(self, driver) -> None:
        self.driver = driver
        self.loop = asyncio.get_running_loop()

    async def run(self, fn, *args):
        return await self.loop.run_in_executor(None, fn, *args)

    async def open(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def click(self, element_id: str) -> None:
        await self.run(lambda: self.driver.find_element("id", element_id).click())

    async def text(self, element_id: str) -> str:
        return await self.run(lambda: self.driver.find_element("id", element_id).text)

    async def state(self) -> dict:
        return await self.run(self.driver.execute_script, "return window.fishvoice.state;")

    async def until(self, predicate: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.run(self.driver.execute_script, f"return Boolean({predicate});"):
                return
            await asyncio.sleep(0.1)
        state = await self.state()
        brief = json.dumps({k: v for k, v in state.items() if k not in ("events", "session")})[:1500]
        raise TimeoutError(f"page: `{predicate}` not true within {timeout} s; state: {brief}")

    async def quit(self) -> None:
        await self.run(self.driver.quit)


class RealServer:
    """The product's own server application (`server.app.create_app`) on 127.0.0.1: it loads its
    models (a tiny random TTS checkpoint, whisper tiny.en, silero VAD, SmolLM2) and serves the page."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.runner = None
        self.base_url = ""

    async def start(self) -> RealServer:
        from aiohttp import web

        from engine.fish.tiny import make_tiny_checkpoint
        from server.app import create_app
        from server.settings import Settings

        checkpoint = make_tiny_checkpoint(self.workdir / "tiny-s1-mini", "s1-mini", seed=0)
        settings = Settings(checkpoint=str(checkpoint), device="cpu", data_dir=self.workdir / "data",
                            rtc_liveness_timeout=4.0)
        self.runner = web.AppRunner(create_app(settings))
        await self.runner.setup()  # loads the models
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    @property
    def app(self):
        return self.runner.app

    @property
    def services(self):
        from server.http import SERVICES

        return self.app[SERVICES]

    @property
    def calls(self) -> dict:
        from signaling.routes import CALLS

        return self.app[CALLS].calls

    async def stop(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


async def _call_scenario(server, page: Page, report: dict) -> None:
    """Call, speak (fake mic), see the transcript, hear the reply, hang up."""
    t0 = time.monotonic()
    # Cap the random tiny TTS (it never stops by itself) through the page's query passthrough.
    await page.open(server.base_url + "/?max_new_tokens=40")
    await page.click("call")
    await page.until("window.fishvoice.state.phase === 'connected'", 15)
    report["t_connected"] = round(time.monotonic() - t0, 2)
    report["server_errors"] = dict(server.services.errors)
    call = next(iter(server.calls.values()))
    await page.until("window.fishvoice.state.userTranscripts.length > 0", 25)
    await page.until("window.fishvoice.state.audibleFrames >= 10", 25)
    report["t_heard_reply"] = round(time.monotonic() - t0, 2)
    await page.until("window.fishvoice.state.latency.heard_ms > 0", 10)
    # The TTS box: the typed text is spoken on the call's audio track.
    await page.run(lambda: page.driver.find_element("id", "tts-text").send_keys(TTS_TEXT))
    await page.click("tts-speak")
    await page.until("window.fishvoice.state.latency.tts_heard_ms > 0", 20)
    await page.until(f"window.fishvoice.state.agentTranscripts.includes({json.dumps(TTS_TEXT)})", 20)
    state = await page.state()
    report["dom_transcript"] = await page.text("transcript")
    report["events"] = [e["type"] for e in state.pop("events")]
    report["page"] = state
    answer = call.pc.localDescription.sdp
    report["server"] = {
        "answer_codecs": [line.split(" ", 1)[1] for line in answer.splitlines() if line.startswith("a=rtpmap:")],
        "inbound_format": list(call.inbound[0].input_format or ()),
        "transcripts": [m["content"] for m in call.conversation.history if m["role"] == "user"],
        "reply_audio_seconds": call.outbound.stats.audio_frames * 0.02,
    }
    await page.click("hangup")
    await asyncio.wait_for(call.closed.wait(), 10)
    report["server"]["calls_after_hangup"] = len(server.calls)
    report["server"]["close_reason"] = call.close_reason


# A client written for OpenAI's Realtime API, unchanged but for the base URL: it posts the offer
# straight after setLocalDescription, so the offer has no candidates (ICE then finds the browser
# through its connectivity checks: peer-reflexive candidates).
OPENAI_STYLE_CLIENT = """
const done = arguments[arguments.length - 1];
(async () => {
  const pc = new RTCPeerConnection();
  const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
  pc.addTrack(mic.getTracks()[0], mic);
  const dc = pc.createDataChannel("oai-events");
  const events = [];
  dc.onmessage = (e) => events.push(JSON.parse(e.data).type);
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  const resp = await fetch("/v1/realtime/calls", {
    method: "POST", body: offer.sdp, headers: { "Content-Type": "application/sdp" } });
  await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
  const t0 = performance.now();
  while (!events.includes("session.created") && performance.now() - t0 < 10000) {
    await new Promise((r) => setTimeout(r, 50));
  }
  const result = { status: resp.status, state: pc.connectionState, events,
                   offerHadCandidates: offer.sdp.includes("a=candidate") };
  await fetch(resp.headers.get("Location"), { method: "DELETE" });
  pc.close();
  mic.getTracks().forEach((t) => t.stop());
  done(result);
})().catch((e) => done({ error: String(e) }));
"""


async def _page_scenario(server, wav: Path, workdir: Path, report: dict) -> None:
    """Uploading a reference voice from the page; an OpenAI-style client; what the page says when
    the mic is denied, the call drops, and the server is down."""
    denied = Page(await asyncio.get_running_loop().run_in_executor(
        None, lambda: _chrome(wav, workdir / "profile-denied", deny_mic=True)))
    try:
        await denied.open(server.base_url + "/")
        await denied.click("call")
        await denied.until("window.fishvoice.state.phase === 'error'", 10)
        report["mic_denied"] = await denied.text("status")
        report["calls_after_denied"] = len(server.calls)
    finally:
        await denied.quit()
    page = Page(await asyncio.get_running_loop().run_in_executor(
        None, lambda: _chrome(wav, workdir / "profile-errors")))
    try:
        await page.open(server.base_url + "/")
        # A new reference voice: a file and its transcript, uploaded, listed and chosen.
        await page.run(lambda: page.driver.find_element("id", "ref-id").send_keys(VOICE_ID))
        await page.run(lambda: page.driver.find_element("id", "ref-file").send_keys(str(wav)))
        await page.run(lambda: page.driver.find_element("id", "ref-text").send_keys(SENTENCE))
        await page.click("ref-upload")
        await page.until(f"document.getElementById('voice').value === {json.dumps(VOICE_ID)}", 15)
        report["upload_status"] = await page.text("ref-status")
        report["stored_voices"] = server.services.references.list_ids()
        await page.run(page.driver.set_script_timeout, 20)
        report["openai_style"] = await page.run(page.driver.execute_async_script, OPENAI_STYLE_CLIENT)
        report["calls_after_openai_style"] = len(server.calls)
        await page.click("call")
        await page.until("window.fishvoice.state.phase === 'connected'", 15)
        await page.until("window.fishvoice.state.session", 5)
        report["call_voice"] = (await page.state())["session"]["voice"]
        call = next(iter(server.calls.values()))
        report["call_references"] = [r.text for r in call.conversation.voice]
        await call.close("server_ended")  # the server drops the call
        await page.until("window.fishvoice.state.phase === 'ended'", 15)
        report["call_dropped"] = await page.text("status")
        await server.stop()  # the server goes away
        await page.click("call")
        await page.until("window.fishvoice.state.phase === 'error'", 15)
        report["server_down"] = await page.text("status")
    finally:
        await page.quit()


async def _harness(out: Path, workdir: Path, scenario: str) -> dict:
    from rtc_client import force_loopback_ice

    force_loopback_ice()  # the namespace has only lo, which aioice skips by default
    wav = workdir / "mic.wav"
    pcm, _ = speechkit.speech_with_gaps([1.0, SENTENCE, 3.0])
    _write_wav(wav, pcm)
    server = await RealServer(workdir).start()
    report: dict = {"error": None}
    page = None
    try:
        if scenario == "call":
            page = Page(await asyncio.get_running_loop().run_in_executor(
                None, lambda: _chrome(wav, workdir / "profile")))
            await _call_scenario(server, page, report)
        else:
            await _page_scenario(server, wav, workdir, report)
    except Exception as exc:  # noqa: BLE001 - reported to the test, which prints it
        report["error"] = f"{type(exc).__name__}: {exc}"
        if page is not None:
            try:
                logs = await page.run(page.driver.get_log, "browser")
                report["browser_log"] = [entry["message"] for entry in logs][-20:]
            except Exception:  # noqa: BLE001
                pass
    finally:
        if page is not None:
            await page.quit()
        await server.stop()
    out.write_text(json.dumps(report, default=str))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="browser harness (run by the tests inside unshare -n)")
    parser.add_argument("--harness", choices=["call", "page"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.mkdtemp()))
    args = parser.parse_args()
    result = asyncio.run(_harness(args.out, args.workdir, args.harness))
    print(json.dumps({k: v for k, v in result.items() if k != "events"}, default=str)[:3000])
