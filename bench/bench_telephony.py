"""Phone-call benchmark: voice-to-voice latency as the carrier sees it.

A faithful carrier peer (tests/phone_peer.py) dials the product's server (`server.app.create_app`,
real models, in a child process, on loopback), speaks an espeak-ng question as telephone-band
μ-law in paced 20 ms media frames, and times:

  1. end of the caller's speech (the last loud 20 ms frame sent) -> first reply media message received;
  2. ... -> first audible 20 ms frame played on the caller's line.

Both include VAD's end-of-turn silence, ASR, the LLM, TTS, G.711 encoding and the WebSocket.
Without --checkpoint a tiny random checkpoint is made (it speaks noise and never stops on its
own, so replies cap `max_new_tokens` with --frames).

  .venv/bin/python bench/bench_telephony.py                      # tiny checkpoint, CPU, 3 turns
  .venv/bin/python bench/bench_telephony.py --checkpoint DIR --device cuda --turns 10 --dialect telnyx
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
                        llm_max_tokens=40)
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

    def summary(values: list[float]) -> str:
        listed = ", ".join(f"{v * 1000:.0f}" for v in values)
        return f"median {statistics.median(values) * 1000:.0f} ms [{listed} ms]" if values else "n/a"

    print(f"{args.dialect} phone call, {args.turns} turns, checkpoint {args.checkpoint or 'tiny random s1-mini'}, "
          f"device {args.device}")
    print(f"  end of caller speech -> first reply media message: {summary(to_media)}")
    print(f"  end of caller speech -> first audible frame played: {summary(to_audible)}")
    print(f"  marks echoed {len(peer.marks_echoed)}, protocol violations {len(peer.violations)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dialect", default="twilio", choices=["twilio", "telnyx"])
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--frames", type=int, default=24, help="max_new_tokens per reply sentence")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    proc, url = start_server(args)
    try:
        asyncio.run(measure(url, args))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
