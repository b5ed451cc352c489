"""Phone-call benchmark: voice-to-voice latency as the carrier sees it.

A faithful carrier peer (tests/phone_peer.py) dials the product's server (`server.app.create_app`,
real models, in a child process, on loopback), speaks an espeak-ng question as telephone-band
μ-law in paced 20 ms media frames, and times:

  1. end of the caller's speech (the last loud 20 ms frame sent) -> first reply media message received;
  2. ... -> first audible 20 ms frame played on the caller's line.

Both include VAD's end-of-turn silence, ASR, the LLM, TTS, G.711 encoding and the WebSocket.

With --tools the server gets a tools file (TELEPHONY_TOOLS) whose one tool, get_weather, is a
webhook served by this process, and a named tool_choice; the caller asks about the weather and
the phone path is timed in two legs:

  3. end of the caller's speech -> the webhook called (VAD, ASR, the model writing the arguments);
  4. the webhook answered -> the first reply media message at the carrier (the output joins the
     conversation, the follow-up response, TTS, G.711, the WebSocket).

Without --checkpoint a tiny random checkpoint is made (it speaks noise and never stops on its
own, so replies cap `max_new_tokens` with --frames).

  .venv/bin/python bench/bench_telephony.py                      # tiny checkpoint, CPU, 3 turns
  .venv/bin/python bench/bench_telephony.py --checkpoint DIR --device cuda --turns 10 --dialect telnyx
  .venv/bin/python bench/bench_telephony.py --tools --turns 3      # the server runs a webhook tool
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
TOOLS_QUESTION = "How is the weather in Paris?"
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"]}}


async def serve(args: argparse.Namespace) -> None:
    """The product's server app, loading its own models, on loopback (child process)."""
    from aiohttp import web

    from server.app import create_app
    from server.settings import Settings

    workdir = Path(tempfile.mkdtemp(prefix="bench-telephony-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        from engine.fish.tiny import make_tiny_checkpoint

        checkpoint = make_tiny_checkpoint(workdir / "tiny-s1-mini", "s1-mini", seed=0)
    settings = Settings(checkpoint=str(checkpoint), device=args.device, data_dir=workdir / "data",
                        llm_max_tokens=60 if args.tools_file else 40, telephony_tools=args.tools_file)
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    print(json.dumps({"ready": url}), flush=True)
    await asyncio.Event().wait()


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, __file__, "--serve", "--device", args.device]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    if args.tools_file:
        cmd += ["--tools-file", args.tools_file]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise RuntimeError(f"the server process exited with {proc.wait()}")
    return proc, json.loads(line)["ready"]


async def reply_finished(peer, after: float, quiet: float = 1.0, timeout: float = 120.0) -> None:
    """The reply has started and no media came for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        arrivals = [t for t, _ in peer.received if t >= after]
        if arrivals and time.monotonic() - arrivals[-1] > quiet:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("no complete reply")


async def measure(url: str, args: argparse.Namespace) -> None:
    import speechkit
    from phone_peer import CarrierPeer, telephone_speech

    line = telephone_speech(speechkit.speech_with_gaps([0.3, QUESTION, 1.0])[0])
    peer = CarrierPeer(url, args.dialect)
    status, body = await peer.dial({"mode": "agent", "max_new_tokens": args.frames})
    if status != 200:
        raise RuntimeError(f"webhook answered {status}: {body}")
    await peer.connect()
    to_media, to_audible = [], []
    try:
        for _ in range(args.turns):
            peer.say(line)
            end = await peer.voice_ended()
            await reply_finished(peer, end)
            to_media.append(peer.first_media(after=end) - end)
            audible = peer.first_audible(after=end)
            if audible is not None:
                to_audible.append(audible - end)
            await asyncio.sleep(0.5)
    finally:
        await peer.stop()

    print(f"{args.dialect} phone call, {args.turns} turns, checkpoint {args.checkpoint or 'tiny random s1-mini'}, "
          f"device {args.device}")
    print(f"  end of caller speech -> first reply media message: {summary(to_media)}")
    print(f"  end of caller speech -> first audible frame played: {summary(to_audible)}")
    print(f"  marks echoed {len(peer.marks_echoed)}, protocol violations {len(peer.violations)}")


class WeatherWebhook:
    """The tool's webhook, in this process: records when each call arrived and was answered."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float, dict]] = []  # (t called, t answered, body)

    async def start(self) -> str:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            t = time.monotonic()
            body = await request.json()
            self.calls.append((t, time.monotonic(), body))
            return web.json_response({"forecast": "Sunny, 21 degrees celsius."})

        app = web.Application()
        app.router.add_post("/weather", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/weather"  # type: ignore[union-attr]


async def measure_tools(args: argparse.Namespace, hook: WeatherWebhook) -> None:
    """Monotonic clocks are system-wide, so the webhook's times and the carrier's compare."""
    import speechkit
    from phone_peer import CarrierPeer, telephone_speech

    proc, url = start_server(args)
    try:
        line = telephone_speech(speechkit.speech_with_gaps([0.3, TOOLS_QUESTION, 1.0])[0])
        peer = CarrierPeer(url, args.dialect)
        status, body = await peer.dial({"mode": "agent", "max_new_tokens": args.frames})
        if status != 200:
            raise RuntimeError(f"webhook answered {status}: {body}")
        await peer.connect()
        to_called, to_media = [], []
        try:
            for turn in range(args.turns):
                peer.say(line)
                end = await peer.voice_ended()
                deadline = time.monotonic() + 120
                while len(hook.calls) <= turn:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the tool's webhook was never called")
                    await asyncio.sleep(0.02)
                t_called, t_answered, call = hook.calls[turn]
                await reply_finished(peer, t_answered)
                to_called.append(t_called - end)
                to_media.append(peer.first_media(after=t_answered) - t_answered)
                print(f"    turn {turn + 1}: {call['name']}({json.dumps(call['arguments'])})", flush=True)
                await asyncio.sleep(0.5)
        finally:
            await peer.stop()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"{args.dialect} phone call with a server-run webhook tool, {args.turns} turns, checkpoint "
          f"{args.checkpoint or 'tiny random s1-mini'}, device {args.device}")
    print(f"  end of caller speech -> webhook called:        {summary(to_called)}")
    print(f"  webhook answered -> first reply media message: {summary(to_media)}")
    print(f"  protocol violations {len(peer.violations)}")


async def run_tools(args: argparse.Namespace) -> None:
    hook = WeatherWebhook()
    url = await hook.start()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"tools": [{**WEATHER, "url": url}], "tool_choice": {"type": "function", "name": "get_weather"}}, f)
    args.tools_file = f.name
    try:
        await measure_tools(args, hook)
    finally:
        await hook.runner.cleanup()
        os.unlink(f.name)


def summary(values: list[float]) -> str:
    listed = ", ".join(f"{v * 1000:.0f}" for v in values)
    return f"median {statistics.median(values) * 1000:.0f} ms [{listed} ms]" if values else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dialect", default="twilio", choices=["twilio", "telnyx"])
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--frames", type=int, default=24, help="max_new_tokens per reply sentence")
    parser.add_argument("--tools", action="store_true", help="time the phone path of a server-run webhook tool")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tools-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    if args.tools:
        asyncio.run(run_tools(args))
        return
    proc, url = start_server(args)
    try:
        asyncio.run(measure(url, args))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
