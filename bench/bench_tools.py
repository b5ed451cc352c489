"""Function-calling benchmark over the realtime WebSocket, with the official `openai` SDK as the client.

  call: the end of the user's speech (appends paced in real time, 20 ms each) ->
        `response.function_call_arguments.done` (session with one tool, tool_choice naming it);
  answer: the client's `response.create` after sending the call's output ->
        the first `response.output_audio.delta` of the reply that uses it.

The server (`server.app.create_app`, real models: silero, whisper tiny.en, the embedded SmolLM2,
TTS on the given or a tiny random checkpoint) runs in a child process, like bench_realtime_ws.

  .venv/bin/python bench/bench_tools.py --runs 3
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

import bench_realtime_ws  # noqa: E402 - the same speech and child-process server
import bench_webrtc  # noqa: E402

QUESTION = "What is the weather like in Paris today?"
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"]}}


async def one_run(conn, audio: bytes, tail: float) -> tuple[float, float]:
    chunk = 24_000 * 2 // 50  # 20 ms
    speech_end = len(audio) - int(tail * 24_000) * 2
    t_start = time.monotonic()
    t_end_of_speech = 0.0
    for n, i in enumerate(range(0, len(audio), chunk)):
        await asyncio.sleep(max(0.0, t_start + n * 0.02 - time.monotonic()))
        await conn.input_audio_buffer.append(audio=base64.b64encode(audio[i:i + chunk]).decode())
        if not t_end_of_speech and i + chunk >= speech_end:
            t_end_of_speech = time.monotonic()
    call = None
    async for event in conn:
        if event.type == "response.function_call_arguments.done" and call is None:
            call = event
            t_call = (time.monotonic() - t_end_of_speech) * 1000
            print(f"    call: {event.name}({event.arguments})")
        if event.type == "response.done":
            break
    if call is None:
        raise RuntimeError("no function call came back")
    await conn.conversation.item.create(item={"type": "function_call_output", "call_id": call.call_id,
                                              "output": "Sunny, 21 degrees celsius."})
    t0 = time.monotonic()
    await conn.response.create(response={"tool_choice": "none"})
    t_audio = float("nan")
    async for event in conn:
        if event.type == "response.output_audio.delta" and t_audio != t_audio:
            t_audio = (time.monotonic() - t0) * 1000
        if event.type == "response.done":
            print(f"    reply: {event.response.output[0].content[0].transcript!r}")
            return t_call, t_audio
    raise RuntimeError("the session ended early")


async def main(args: argparse.Namespace) -> None:
    import openai

    proc, url = bench_webrtc.start_server(args)
    try:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        audio, tail = bench_realtime_ws.pcm24k(QUESTION)
        calls: list[float] = []
        answers: list[float] = []
        for run in range(args.runs):
            async with client.realtime.connect(model="gpt-realtime") as conn:
                async for event in conn:
                    if event.type == "session.created":
                        break
                await conn.session.update(session={
                    "type": "realtime", "temperature": 0.0, "max_output_tokens": 40,
                    "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
                    "sampling": {"max_new_tokens": args.tts_frames, "seed": run},
                    "audio": {"input": {"turn_detection": {"type": "server_vad",
                                                           "silence_duration_ms": args.silence_ms}}}})
                t_call, t_audio = await one_run(conn, audio, tail)
                calls.append(t_call)
                answers.append(t_audio)
        print(f"openai SDK over GET /v1/realtime, {args.runs} runs, silence_duration_ms={args.silence_ms}")
        print(f"  end of speech -> function_call_arguments.done: median {statistics.median(calls):7.0f} ms "
              f"(min {min(calls):.0f}, max {max(calls):.0f})")
        print(f"  response.create after the output -> first audio delta: median {statistics.median(answers):7.0f} ms "
              f"(min {min(answers):.0f}, max {max(answers):.0f})")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--tts-frames", type=int, default=16)
    ap.add_argument("--silence-ms", type=int, default=500)
    args = ap.parse_args()
    asyncio.run(main(args))
