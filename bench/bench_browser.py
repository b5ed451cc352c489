"""Voice-to-voice latency in a real browser: headless Chromium calls the agent over WebRTC.

What a browser user gets: end of the question's speech -> first audible reply audio, both taken
on the page's WebAudio clock. The page speaks through a WebAudio "microphone" (the question, an
espeak-ng sentence, played into a MediaStreamAudioDestinationNode that is the call's outgoing
track), so the instant the words end is known exactly; an AudioWorklet on the remote track marks
the first 128-sample block of the reply above the level. The reply has passed the network,
Chromium's own jitter buffer (NetEq) and its decoder by then; the sound card's output latency is
not counted (headless Chromium has none). The call uses the OpenAI-style endpoint
(`POST /v1/realtime/calls`, data channel `oai-events`), as a browser app would.

The server is bench_webrtc's: the product's app in a child process, tiny random TTS checkpoint,
whisper tiny.en, silero, SmolLM2. Needs Debian's `chromium` and `chromium-driver`.

  .venv/bin/python bench/bench_browser.py --turns 7 --turn-detection semantic_vad
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import bench_webrtc  # noqa: E402 - its server child process and its question, so both benchmarks ask the same

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SAMPLE_RATE = 16_000
AUDIBLE_RMS = 0.003  # bench_webrtc's aiortc client uses the same level (-50 dBFS)
VOICE_LEVEL = 0.01  # a sample above this is speech: the last one marks the end of the words

# Runs in the page (Selenium's execute_async_script). Arguments: base64 int16 PCM, its rate,
# turns, audible RMS, voice level, the offer's query string, the session.update body.
PAGE_SCRIPT = r"""
const [pcmB64, rate, turns, audible, voiceLevel, query, session] = arguments;
const done = arguments[arguments.length - 1];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(test, ms, what) {
  const t0 = performance.now();
  while (!test()) {
    if (performance.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}
(async () => {
  const ctx = new AudioContext({ sampleRate: 48000 });
  await ctx.resume();
  const bytes = Uint8Array.from(atob(pcmB64), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer);
  const question = ctx.createBuffer(1, pcm.length, rate);
  const samples = question.getChannelData(0);
  let lastVoice = 0;
  for (let i = 0; i < pcm.length; i++) {
    samples[i] = pcm[i] / 32768;
    if (Math.abs(samples[i]) > voiceLevel) lastVoice = i;
  }
  const mic = ctx.createMediaStreamDestination();

  // The meter: each render block of the remote audio above `audible`, stamped with its start time.
  const meterCode = `class Meter extends AudioWorkletProcessor {
    process(inputs) {
      const x = inputs[0] && inputs[0][0];
      if (x) { let s = 0; for (let i = 0; i < x.length; i++) s += x[i] * x[i];
               const rms = Math.sqrt(s / x.length);
               if (rms > ${audible}) this.port.postMessage(currentTime); }
      return true;
    }
  }
  registerProcessor("meter", Meter);`;
  await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([meterCode], { type: "text/javascript" })));

  const pc = new RTCPeerConnection();
  pc.addTrack(mic.stream.getAudioTracks()[0], mic.stream);
  const dc = pc.createDataChannel("oai-events");
  const events = [];
  dc.onmessage = (e) => events.push(JSON.parse(e.data));
  let remote = null;
  pc.ontrack = (e) => { remote = e.streams[0] || new MediaStream([e.track]); };
  await pc.setLocalDescription(await pc.createOffer());
  const resp = await fetch(`/v1/realtime/calls?${query}`, {
    method: "POST", body: pc.localDescription.sdp, headers: { "Content-Type": "application/sdp" } });
  const answer = await resp.text();
  if (resp.status !== 201) throw new Error(`offer refused: ${resp.status} ${answer}`);
  await pc.setRemoteDescription({ type: "answer", sdp: answer });
  await until(() => dc.readyState === "open" && remote, 15000, "the data channel and the remote track");

  // Chromium feeds a remote track into WebAudio only while a media element plays it.
  const element = new Audio();
  element.srcObject = remote;
  element.muted = true;
  await element.play().catch(() => {});
  const meter = new AudioWorkletNode(ctx, "meter");
  ctx.createMediaStreamSource(remote).connect(meter);
  const mute = ctx.createGain();
  mute.gain.value = 0;
  meter.connect(mute).connect(ctx.destination);  // keeps the meter in the rendered graph
  const loud = [];
  meter.port.onmessage = (e) => loud.push(e.data);

  dc.send(JSON.stringify({ type: "session.update", session }));
  await until(() => events.some((e) => e.type === "session.updated"), 10000, "session.updated");
  await sleep(500);
  const results = [];
  for (let turn = 0; turn < turns; turn++) {
    const seen = events.length;
    const start = ctx.currentTime + 0.1;
    const source = ctx.createBufferSource();
    source.buffer = question;
    source.connect(mic);
    source.start(start);
    const wordsEnd = start + (lastVoice + 1) / rate;
    await until(() => events.slice(seen).some((e) => e.type === "output_audio_buffer.stopped"), 120000,
                "output_audio_buffer.stopped");
    const started = events.slice(seen).find((e) => e.type === "output_audio_buffer.started") || {};
    const first = loud.find((t) => t >= wordsEnd);
    const transcript = events.slice(seen).find(
      (e) => e.type === "conversation.item.input_audio_transcription.completed");
    results.push({ latency_ms: first === undefined ? null : (first - wordsEnd) * 1000,
                   server: started.latency_ms || {}, transcript: transcript ? transcript.transcript : null });
    await sleep(500);
  }
  const errors = events.filter((e) => e.type === "error").map((e) => e.error && e.error.message);
  pc.close();
  await ctx.close();
  done({ results, errors, baseLatency: ctx.baseLatency });
})().catch((e) => done({ error: String(e && e.stack || e) }));
"""


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection",
                 "--disable-features=WebRtcHideLocalIpsWithMdns", "--disable-background-networking",
                 "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def question_pcm() -> np.ndarray:
    import speechkit

    pcm, _ = speechkit.speech_with_gaps([0.3, bench_webrtc.QUESTION, 1.0])  # 16 kHz float32, as bench_webrtc speaks it
    return (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2")


def measure(url: str, turns: int, frames: int) -> dict:
    driver = chromium()
    try:
        driver.set_script_timeout(60 + 130 * turns)
        driver.get(url + "/health")  # any page of the server's origin: the script posts its offer there
        session = {"temperature": 0.0, "max_output_tokens": 40}
        query = f"mode=agent&max_new_tokens={frames}"
        pcm64 = base64.b64encode(question_pcm().tobytes()).decode()
        return driver.execute_async_script(PAGE_SCRIPT, pcm64, SAMPLE_RATE, turns, AUDIBLE_RMS, VOICE_LEVEL,
                                           query, session)
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a tiny random s1-mini)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--turn-detection", choices=["server_vad", "semantic_vad"], default="semantic_vad")
    parser.add_argument("--turns", type=int, default=7)
    parser.add_argument("--frames", type=int, default=43, help="max_new_tokens per reply (43 = 2 s of audio)")
    args = parser.parse_args()
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            sys.exit(f"{path} is missing (apt-get install chromium chromium-driver)")
    proc, url = bench_webrtc.start_server(args)
    try:
        report = measure(url, args.turns, args.frames)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    if report.get("error"):
        sys.exit(f"the page failed: {report['error']}")
    results = report["results"]
    latencies = [r["latency_ms"] for r in results if r["latency_ms"] is not None]
    print(f"server: {url} ({args.turn_detection}; checkpoint: {args.checkpoint or 'tiny random s1-mini'}, "
          f"device {args.device}); Chromium AudioContext baseLatency {report['baseLatency'] * 1000:.0f} ms")
    median = f"{statistics.median(latencies):.0f} ms" if latencies else "n/a"
    print(f"voice-to-voice in Chromium (end of the words -> first audible reply block, page clock): median "
          f"{median} over {len(latencies)} of {len(results)} turns [{', '.join(f'{x:.0f}' for x in latencies)} ms]")
    print("  server side, from its end of turn: " + json.dumps([r["server"] for r in results]))
    print("  transcripts: " + json.dumps(sorted({r["transcript"] for r in results if r["transcript"]})))
    if report["errors"]:
        print(f"  error events: {report['errors']}")


if __name__ == "__main__":
    main()
