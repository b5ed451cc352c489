"""Realtime WebSocket benchmark, measured with the official `openai` SDK as the client.

  spoken turn: the end of the user's speech (appends are paced in real time, 20 ms each, as a
  microphone would send them) -> the first `response.output_audio.delta` (voice-to-voice at the
  client); also -> speech_stopped, -> the first input transcription delta (negative when it came
  while the user spoke), -> transcript, -> first transcript delta, and the server's own
  stage latencies (from its end-of-turn decision) in `response.done`;
  text turn: `response.create` -> first `response.output_audio.delta`.

The server (`server.app.create_app`, real models) runs in a child process, like bench_webrtc.
The server's VAD waits `silence_duration_ms` after the speech ends, which is part of the figure;
`--turn-detection semantic_vad` lets Smart Turn end the turn at a short pause instead.

  .venv/bin/python bench/bench_realtime_ws.py --runs 5 [--turn-detection semantic_vad --eagerness auto]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import bench_webrtc  # noqa: E402 - the same child-process server
from engine.agent.smart_turn import MAX_WAIT_MS  # noqa: E402

QUESTION = "What is the capital of France?"


def pcm24k(text: str, tail: float) -> tuple[bytes, float]:
    """24 kHz 16-bit speech, and how many seconds of silence trail it."""
    import speechkit

    return speechkit.pcm24k_bytes(speechkit.speech_with_gaps([0.3, text, tail])[0]), tail


async def spoken_turn(conn, audio: bytes, tail: float) -> dict[str, float]:
    chunk = 24_000 * 2 // 50  # 20 ms
    speech_end = len(audio) - int(tail * 24_000) * 2
    t_end_of_speech: list[float] = []

    async def send() -> None:  # paced like a microphone, while the events are read as they come
        t_start = time.monotonic()
        for n, i in enumerate(range(0, len(audio), chunk)):
            await asyncio.sleep(max(0.0, t_start + n * 0.02 - time.monotonic()))
            await conn.input_audio_buffer.append(audio=base64.b64encode(audio[i:i + chunk]).decode())
            if not t_end_of_speech and i + chunk >= speech_end:
                t_end_of_speech.append(time.monotonic())

    sender = asyncio.create_task(send())
    seen: dict[str, float] = {}
    server: dict[str, float] = {}
    try:
        async for event in conn:
            now = time.monotonic()
            key = {"input_audio_buffer.speech_stopped": "speech_stopped",
                   "conversation.item.input_audio_transcription.delta": "input_delta",  # < 0: while speaking
                   "conversation.item.input_audio_transcription.completed": "transcript",
                   "response.output_audio_transcript.delta": "first_token",
                   "response.output_audio.delta": "first_audio"}.get(event.type)
            if key and key not in seen:
                seen[key] = now
            if event.type == "response.done":
                server = (event.model_extra or {}).get("latency_ms", {})  # ours: from the server's end-of-turn decision
                print(f"    reply: {event.response.output[0].content[0].transcript!r}")
                break
        else:
            raise RuntimeError("the session ended early")
    finally:
        await sender  # the rest of the silence, so the next turn starts clean
    marks = {k: (t - t_end_of_speech[0]) * 1000 for k, t in seen.items()}
    marks.update({f"server_{k}": v for k, v in server.items()})
    return marks


async def text_turn(conn) -> float:
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": QUESTION}]})
    t0 = time.monotonic()
    await conn.response.create()
    first = None
    async for event in conn:
        if event.type == "response.output_audio.delta" and first is None:
            first = (time.monotonic() - t0) * 1000
        if event.type == "response.done":
            return first if first is not None else float("nan")
    raise RuntimeError("the session ended early")


def turn_detection(args: argparse.Namespace) -> dict:
    if args.turn_detection == "semantic_vad":
        return {"type": "semantic_vad", "eagerness": args.eagerness}
    return {"type": "server_vad", "silence_duration_ms": args.silence_ms}


async def main(args: argparse.Namespace) -> None:
    import openai

    proc, url = bench_webrtc.start_server(args)
    try:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        # semantic_vad may wait its max wait when Smart Turn says "incomplete": leave that much silence.
        semantic_wait = MAX_WAIT_MS[args.eagerness] / 1000 if args.turn_detection == "semantic_vad" else 0.0
        audio, tail = pcm24k(QUESTION, max(0.7, semantic_wait + 0.5))
        spoken: list[dict[str, float]] = []
        typed: list[float] = []
        for run in range(args.runs):
            async with client.realtime.connect(model="gpt-realtime") as conn:
                async for event in conn:
                    if event.type == "session.created":
                        break
                await conn.session.update(session={
                    "type": "realtime", "temperature": 0.0, "max_output_tokens": 40,
                    "sampling": {"max_new_tokens": args.tts_frames, "seed": run},
                    "audio": {"input": {"turn_detection": turn_detection(args)}}})
                spoken.append(await spoken_turn(conn, audio, tail))
                typed.append(await text_turn(conn))
        print(f"openai SDK over GET /v1/realtime, {args.runs} runs, turn_detection={turn_detection(args)}")
        for key in ["speech_stopped", "input_delta", "transcript", "first_token", "first_audio", "server_transcript",
                    "server_first_token", "server_first_audio"]:
            values = [m[key] for m in spoken if key in m]
            # The client's marks count from the end of speech; the server's from its end-of-turn decision.
            start = "server's end of turn" if key.startswith("server_") else "end of speech"
            if values:
                print(f"  {start} -> {key.removeprefix('server_'):<14} median {statistics.median(values):7.0f} ms "
                      f"(min {min(values):.0f}, max {max(values):.0f})")
        print(f"  text turn: response.create -> first audio delta: median {statistics.median(typed):7.0f} ms")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--tts-frames", type=int, default=16)
    ap.add_argument("--silence-ms", type=int, default=500, help="server_vad silence_duration_ms")
    ap.add_argument("--turn-detection", choices=["server_vad", "semantic_vad"], default="server_vad")
    ap.add_argument("--eagerness", choices=["low", "medium", "high", "auto"], default="auto",
                    help="semantic_vad eagerness")
    args = ap.parse_args()
    asyncio.run(main(args))
