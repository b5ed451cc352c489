"""Realtime-call benchmark: what a caller experiences, measured at the client.

  1. voice-to-voice latency: end of speech at the client's microphone -> first audible reply
     frame at the client (includes VAD's end-of-turn silence, ASR, LLM, TTS, Opus, network);
  2. data-channel TTS time to first audio: `tts.request` sent -> first audible frame received;
  3. concurrency: how many simultaneous calls one server sustains with paced, gap-free audio
     (every call streams microphone audio in and a TTS reply out; a call fails if its outbound
     track ran dry mid-response, or a frame went out, or reached the client, more than 60 ms
     late), and what a call costs the server's CPU: seconds of CPU per call-second of listening
     (microphone in, Opus decode, VAD; silence still goes out) and per second of speech spoken
     (TTS, resampling, Opus out), read from /proc for the server process.

The server runs in a child process (the product's app, `server.app.create_app`, real models),
the aiortc clients in this one, on loopback. Without --checkpoint a tiny random checkpoint in
the published layout is made (it speaks noise, and never stops on its own, so requests cap
`max_new_tokens`).

  .venv/bin/python bench/bench_webrtc.py                      # tiny checkpoint, CPU
  .venv/bin/python bench/bench_webrtc.py --checkpoint DIR --device cuda --concurrency 1,4,16,32
  .venv/bin/python bench/bench_webrtc.py --turns 0 --tts-requests 0        # only the concurrency table
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

QUESTION = "What is the capital of France?"
TTS_TEXT = "Hello from the server."
FRAMES_PER_SECOND = 21.5  # codec frames per second of audio (44.1 kHz / 2048)


# ---------------------------------------------------------------------------- server (child process)
async def serve(args: argparse.Namespace) -> None:
    """The product's server app (`server.app.create_app`), loading its own models, on loopback."""
    from aiohttp import web

    from rtc_client import force_loopback_ice
    from server.app import create_app
    from server.settings import Settings

    force_loopback_ice()
    workdir = Path(tempfile.mkdtemp(prefix="bench-webrtc-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        from engine.fish.tiny import make_tiny_checkpoint

        checkpoint = make_tiny_checkpoint(workdir / "tiny-s1-mini", "s1-mini", seed=0)
    settings = Settings(checkpoint=str(checkpoint), device=args.device, data_dir=workdir / "data",
                        max_sessions=256, rtc_liveness_timeout=15.0, turn_detection=args.turn_detection)
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    print(json.dumps({"ready": url, "checkpoint": str(checkpoint)}), flush=True)
    await asyncio.Event().wait()


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, __file__, "--serve", "--device", args.device, "--turn-detection", args.turn_detection]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"the server process exited with {proc.wait()}")
    return proc, json.loads(line)["ready"]


# ---------------------------------------------------------------------------- measurements
def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms" if values else "n/a"


async def voice_to_voice(url: str, turns: int, frames: int) -> dict:
    import speechkit
    from rtc_client import RealtimeClient

    pcm, _ = speechkit.speech_with_gaps([0.3, QUESTION, 1.0])
    client = RealtimeClient(url)
    await client.connect(query={"mode": "agent", "max_new_tokens": frames})
    client.send({"type": "session.update", "session": {"temperature": 0.0, "max_output_tokens": 40}})
    latencies, server_parts = [], []
    try:
        for _ in range(turns):
            seen = len(client.events)
            client.mic.play(pcm)
            end = await client.mic.played()
            started = await client.wait_for("output_audio_buffer.started", after=seen, timeout=60)
            await client.wait_for("output_audio_buffer.stopped", after=seen, timeout=120)
            first = client.sink.first_audible(after=end)
            if first is not None:
                latencies.append(first - end)
            server_parts.append(started.get("latency_ms", {}))
            await asyncio.sleep(0.5)
    finally:
        await client.hang_up()
    return {"latencies": latencies, "server": server_parts}


async def tts_first_audio(url: str, requests: int, frames: int) -> dict:
    from rtc_client import RealtimeClient

    client = RealtimeClient(url)
    await client.connect(query={"mode": "tts"})
    latencies, server = [], []
    try:
        for i in range(requests):
            seen = len(client.events)
            t_sent = time.monotonic()
            client.send({"type": "tts.request", "text": TTS_TEXT, "sampling": {"max_new_tokens": frames, "seed": i}})
            started = await client.wait_for("output_audio_buffer.started", after=seen, timeout=60)
            await client.wait_for("output_audio_buffer.stopped", after=seen, timeout=120)
            first = client.sink.first_audible(after=t_sent)
            if first is not None:
                latencies.append(first - t_sent)
            server.append(started["latency_ms"].get("first_audio"))
            await asyncio.sleep(0.3)
    finally:
        await client.hang_up()
    return {"latencies": latencies, "server_first_audio_ms": server}


# ---------------------------------------------------------------------------- CPU accounting
_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads, plus those of its live child
    processes (the server's TTS process) (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:  # a child that exited between listing and reading
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)
    return own + sum(process_cpu_seconds(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


class CPUMeter:
    """CPU seconds the server (with its TTS process) and this (client) process used over a window."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.start()

    def start(self) -> None:
        self.t, self.server, self.client = time.monotonic(), process_cpu_seconds(self.server_pid), time.process_time()

    def read(self) -> tuple[float, float, float]:
        """(wall seconds, server CPU seconds, client CPU seconds) since `start`."""
        return (time.monotonic() - self.t, process_cpu_seconds(self.server_pid) - self.server,
                time.process_time() - self.client)


async def idle_cpu_rate(server_pid: int, seconds: float) -> float:
    """The server's CPU seconds per second with no call (its own background work)."""
    meter = CPUMeter(server_pid)
    await asyncio.sleep(seconds)
    wall, server, _ = meter.read()
    return server / wall


def client_lateness(arrivals: list[float], after: float) -> float:
    """Worst lateness (s) of a frame at the client: arrival behind the best 20 ms grid seen so far."""
    best, worst = None, 0.0
    times = [t for t in arrivals if t >= after]
    for i, t in enumerate(times):
        due = t - 0.02 * i  # this frame's arrival, moved back to the grid's origin
        best = due if best is None else min(best, due)
        worst = max(worst, due - best)
    return worst


# ---------------------------------------------------------------------------- concurrency
async def finished(client, event: str, timeout: float) -> dict | None:
    """The client's first `event`, or None when it never came (the call is then a failed one)."""
    try:
        return await client.wait_for(event, timeout=timeout)
    except AssertionError as exc:
        print(f"  (a call failed: {exc})", flush=True)
        return None


async def concurrent_calls(url: str, server_pid: int, calls: int, seconds: float, listen_seconds: float,
                           idle_rate: float) -> dict:
    """`calls` callers at once: first only listening (mic in, VAD), then each asking for `seconds`
    of speech. Returns per-call audio health and the server's CPU per call-second of each phase."""
    import aiohttp

    from rtc_client import RealtimeClient

    clients = [RealtimeClient(url) for _ in range(calls)]
    await asyncio.gather(*(c.connect(query={"mode": "tts"}) for c in clients))
    frames = int(seconds * FRAMES_PER_SECOND)
    try:
        await asyncio.sleep(1.0)  # connection set-up settles
        meter = CPUMeter(server_pid)
        await asyncio.sleep(listen_seconds)
        listen_wall, listen_server, listen_client = meter.read()
        listen_rate = listen_server / listen_wall  # server CPU/s with every call listening
        load_listen = os.getloadavg()[0]
        t0 = time.monotonic()
        meter.start()
        for i, client in enumerate(clients):
            client.send({"type": "tts.request", "text": "This call measures how many callers one server can serve.",
                         "sampling": {"max_new_tokens": frames, "seed": i}})
        done = await asyncio.gather(*(finished(c, "response.done", 60 + 4 * seconds * calls) for c in clients))
        await asyncio.gather(*(finished(c, "output_audio_buffer.stopped", 60) for c in clients))
        speak_wall, speak_server, speak_client = meter.read()
        load_speak = os.getloadavg()[0]
        await asyncio.sleep(0.3)
        stats = []
        async with aiohttp.ClientSession() as http:
            for client in clients:
                async with http.get(url + client.location) as resp:
                    if resp.status == 200:  # a call that ended early is gone (and counted as missing)
                        stats.append((await resp.json())["outbound"])
    finally:
        await asyncio.gather(*(c.hang_up() for c in clients), return_exceptions=True)
    ttfa = [c.sink.first_audible(after=t0) - t0 for c in clients if c.sink.first_audible(after=t0)]
    missing = sum(d is None for d in done)  # calls whose response never finished (counted, not fatal)
    done = [d or {"audio_seconds": 0.0, "response": {"status": "missing"}} for d in done]
    spans = []
    for client, d in zip(clients, done):
        first, last = client.sink.first_audible(after=t0), client.sink.last_audible()
        if first and last and d["audio_seconds"]:
            spans.append((last - first + 0.02) / d["audio_seconds"])
    audio_seconds = sum(d["audio_seconds"] for d in done)
    underruns = sum(s["underruns"] for s in stats)
    late, very_late = sum(s["late_frames"] for s in stats), sum(s["late_frames_60ms"] for s in stats)
    client_late_ms = max(client_lateness(c.sink.arrivals, t0) for c in clients) * 1000.0
    # Speaking = what the speaking phase cost beyond the same calls merely listening.
    speak_extra = speak_server - listen_rate * speak_wall
    return {"calls": calls, "ttfa": ttfa, "missing": missing, "underrun_frames": underruns, "late_frames": late,
            "late_frames_60ms": very_late, "frames": sum(s["frames"] for s in stats),
            "max_lateness_ms": max((s["max_lateness_ms"] for s in stats), default=0.0),
            "client_max_lateness_ms": client_late_ms,
            "stretch": max(spans) if spans else None, "audio_seconds": audio_seconds,
            "listen_cpu_per_call_s": (listen_rate - idle_rate) / calls,
            "speak_cpu_per_audio_s": speak_extra / audio_seconds if audio_seconds else None,
            "server_cpu_speaking": speak_server / speak_wall, "client_cpu_speaking": speak_client / speak_wall,
            "client_cpu_listening": listen_client / listen_wall, "load": (load_listen, load_speak),
            "ok": (not missing and underruns == 0 and very_late == 0 and client_late_ms <= 60.0
                   and all(d["response"]["status"] == "completed" for d in done))}


# ---------------------------------------------------------------------------- main
async def run(args: argparse.Namespace, url: str, server_pid: int) -> None:
    from rtc_client import force_loopback_ice

    force_loopback_ice()
    print(f"server: {url}, pid {server_pid} (checkpoint: {args.checkpoint or 'tiny random s1-mini'}, "
          f"device {args.device})")
    if args.turns:
        v2v = await voice_to_voice(url, args.turns, args.frames)
        print(f"voice-to-voice (end of speech -> first reply audio, at the client): median "
              f"{median_ms(v2v['latencies'])} over {len(v2v['latencies'])} turns "
              f"[{', '.join(f'{x * 1000:.0f}' for x in v2v['latencies'])} ms]")
        print(f"  server side, from VAD end of turn: {v2v['server']}")
    if args.tts_requests:
        tts = await tts_first_audio(url, args.tts_requests, args.frames)
        print(f"data-channel TTS (tts.request sent -> first audio, at the client): median "
              f"{median_ms(tts['latencies'])} [{', '.join(f'{x * 1000:.0f}' for x in tts['latencies'])} ms]; "
              f"server first audio {tts['server_first_audio_ms']} ms")
    sustained, failed = 0, False
    idle = await idle_cpu_rate(server_pid, args.listen_seconds)
    print(f"concurrent TTS-mode calls: {args.listen_seconds:.0f} s listening (mic in, VAD), then {args.seconds:.0f} s "
          f"of speech each (gap-free = no underrun, no frame > 60 ms late at the server's pacing or at the "
          f"client); server idle CPU {idle:.3f} s/s")
    print("  calls | underrun | late>60ms | max late server/client | first audio | server CPU per call-s: "
          "listening  speaking | server/client CPU busy | load | verdict")
    for calls in args.concurrency:
        r = await concurrent_calls(url, server_pid, calls, args.seconds, args.listen_seconds, idle)
        speak = f"{r['speak_cpu_per_audio_s']:.3f}" if r["speak_cpu_per_audio_s"] is not None else "n/a"
        verdict = "OK" if r["ok"] else "NOT sustained" + (f" ({r['missing']} unfinished)" if r["missing"] else "")
        print(f"  {calls:5d} | {r['underrun_frames']:8d} | {r['late_frames_60ms']:4d}/{r['frames']:<5d}| "
              f"{r['max_lateness_ms']:6.0f} / {r['client_max_lateness_ms']:4.0f} ms      | "
              f"{median_ms(r['ttfa']):>10} | {r['listen_cpu_per_call_s']:8.4f}  {speak:>9} | "
              f"{r['server_cpu_speaking']:4.2f} / {r['client_cpu_speaking']:4.2f}            | "
              f"{r['load'][1]:4.2f} | {verdict}", flush=True)
        if not r["ok"]:
            failed = True
        elif not failed:
            sustained = calls
    print(f"sustained with paced, gap-free audio: {sustained} concurrent calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a tiny random s1-mini)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--turn-detection", choices=["server_vad", "semantic_vad"], default="server_vad",
                        help="the server's default end of turn (server_vad: 500 ms of silence; semantic_vad: "
                             "Smart Turn, eagerness auto)")
    parser.add_argument("--turns", type=int, default=3, help="voice-to-voice turns (0 skips that part)")
    parser.add_argument("--tts-requests", type=int, default=5, help="data-channel TTS requests (0 skips)")
    parser.add_argument("--frames", type=int, default=43, help="max_new_tokens per request (43 = 2 s of audio)")
    parser.add_argument("--seconds", type=float, default=5.0, help="speech per call in the concurrency test")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 6, 8])
    parser.add_argument("--listen-seconds", type=float, default=4.0,
                        help="how long every call only listens before it is asked to speak (CPU measurement)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    proc, url = start_server(args)
    try:
        asyncio.run(run(args, url, proc.pid))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
